"""Adding an adapter is all or nothing on every rank: a failure while building (OLoRA on a weight
whose row-sharded QR fails, a rank pattern that only the last layer's stage finds wrong, an
exception injected on one rank in the middle of the build) raises on every rank within the
harness deadline and leaves every rank's model exactly as before (parameters, module types,
logits). One 4-rank launch: ``tp2`` (TP2 x DP2) and ``tp2-pp2``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.adapters import lora as lora_module
from dist_lora.adapters.registry import existing
from dist_lora.parallel.agreement import RankError
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

LAYOUTS = ("tp2", "tp2-pp2")
CONFIG = dict(TINY_CONFIGS["llama"], num_hidden_layers=4)
LAST = CONFIG["num_hidden_layers"] - 1


def prepare(tmp: Path) -> dict:
    """A 4-layer tiny Llama, and a copy whose last gate_proj has a zero first column: its first r
    columns are linearly dependent, so OLoRA's QR of them fails (on every TP rank alike, after the
    earlier layers' bases were already rewritten)."""
    model = save_tiny(CONFIG, tmp / "llama")
    with torch.no_grad():
        model.model.layers[LAST].mlp.gate_proj.weight[:, 0] = 0
    model.save_pretrained(str(tmp / "llama_dependent"))
    return {"llama": str(tmp / "llama"), "dependent": str(tmp / "llama_dependent")}


def _ids():
    return torch.randint(0, CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))


def _snapshot(model) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
            "types": {n: type(m) for n, m in model.named_modules()},
            "logits": models.logits(model, _ids()),
            "adapters": dict(existing(model))}


def _assert_unchanged(model, before: dict) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"], "module types changed"
    assert after["params"].keys() == before["params"].keys(), "parameters added or removed"
    changed = [n for n, p in after["params"].items() if not torch.equal(p, before["params"][n])]
    assert not changed, f"parameters changed: {changed[:3]}"
    assert after["trainable"] == before["trainable"], "trainable flags changed"
    assert torch.equal(after["logits"], before["logits"]), "logits changed"
    assert after["adapters"] == before["adapters"], "adapter registry changed"


def _fails_everywhere_and_rolls_back(model, config: dl.LoraConfig, needle: str, adapter_name: str = "default"):
    before = _snapshot(model)
    with pytest.raises((RankError, ValueError), match=needle):
        dl.add_adapter(model, config, adapter_name)
    _assert_unchanged(model, before)


@check(*LAYOUTS)
def olora_qr_failure_on_the_last_layer_rolls_back_every_rank(ctx):
    model = models.from_pretrained(ctx.data["dependent"])
    config = dl.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora")
    _fails_everywhere_and_rolls_back(model, config, "linearly dependent")
    # the same model still takes an adapter afterwards
    dl.apply_lora(model, dl.LoraConfig(r=4, target_modules=["q_proj"]))
    assert list(existing(model)) == ["default"]


@check(*LAYOUTS)
def a_rank_pattern_only_the_last_stage_finds_wrong_fails_everywhere(ctx):
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "first")
    config = dl.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa",
                           rank_pattern={f"model.layers.{LAST}.mlp.down_proj": 10_000})
    _fails_everywhere_and_rolls_back(model, config, "exceeds the smaller side", "second")


@check(*LAYOUTS)
def an_exception_injected_on_one_rank_mid_build_fails_everywhere(ctx):
    """Rank 0 fails at its third slot; DoRA's row-parallel norms are collectives later in the
    build, which its TP peer must not enter alone."""
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "first")
    real, calls = lora_module.initial_factors, []

    def failing(*args, **kwargs):
        calls.append(1)
        if ctx.groups.rank == 0 and len(calls) == 3:
            raise RuntimeError("injected build failure")
        return real(*args, **kwargs)

    lora_module.initial_factors = failing
    try:
        config = dl.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                               init_lora_weights=False)
        _fails_everywhere_and_rolls_back(model, config, "injected build failure", "second")
    finally:
        lora_module.initial_factors = real


test_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)

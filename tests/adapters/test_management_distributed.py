"""Adapter management on sharded models against PEFT: merge / unmerge, merge_and_unload and
release through ``save_pretrained``, several adapters, disabling, deleting, replica checks and
bad input. One 4-rank launch (``tp2`` = TP2 x DP2, ``tp2-sp``, ``tp2-pp2``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.adapters.registry import adapter_layers
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object, barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

LAYOUTS = ("tp2", "tp2-sp", "tp2-pp2")
MERGE_CASES = {
    "lora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj",
                                                                     "embed_tokens", "lm_head"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
}
CONFIG_A = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
CONFIG_B = dict(r=2, lora_alpha=2, target_modules=["v_proj", "up_proj", "lm_head"], init_lora_weights=False)


def _ids():
    return torch.randint(0, TINY_CONFIGS["llama"]["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))


def prepare(tmp: Path) -> dict:
    import peft

    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    ids, out = _ids(), {}
    for name, config in MERGE_CASES.items():
        model = peft_model("llama", dict(config, init_lora_weights=False))
        state = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        with torch.no_grad():
            logits = model(ids).logits
            merged = model.merge_and_unload()(ids).logits
        out[name] = {"state": state, "logits": logits, "merged": merged}
    model = peft_model("llama", CONFIG_A)
    model.add_adapter("b", peft.LoraConfig(**CONFIG_B))
    states = {a: {k: v.clone() for k, v in peft.get_peft_model_state_dict(model, adapter_name=a).items()}
              for a in ("default", "b")}
    with torch.no_grad():
        refs = {"a": model(ids).logits}
        model.set_adapter("b")
        refs["b"] = model(ids).logits
        model.base_model.set_adapter(["default", "b"])
        refs["a+b"] = model(ids).logits
        with model.disable_adapter():
            refs["base"] = model(ids).logits
    out["two"] = {"states": states, "logits": refs}
    torch.save({"ids": ids, **out}, tmp / "refs.pt")
    return {"llama": str(tmp / "llama")}


def _refs(ctx):
    return torch.load(Path(ctx.tmp) / "refs.pt")


def _with_adapter(ctx, config, state, name="default"):
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(**dict(config, init_lora_weights=False)), adapter_name=name)
    dl.set_adapter_state_dict(model, state, name)
    return model


def _base_shards(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}


@check(*LAYOUTS)
def merge_keeps_logits_and_unmerge_restores_the_base(ctx):
    refs = _refs(ctx)
    for name, config in MERGE_CASES.items():
        model = _with_adapter(ctx, config, refs[name]["state"])
        before = _base_shards(model)
        dl.merge_adapter(model, safe_merge=True)
        merged = _base_shards(model)
        changed = [n for n in merged if not torch.equal(merged[n], before[n])]
        assert changed, "merging must write into the base shards"
        assert rel_error(models.logits(model, refs["ids"]), refs[name]["logits"]) <= 1e-5, name
        dl.unmerge_adapter(model)
        after = _base_shards(model)
        for n in before:
            # W + D - D is exact up to float32 rounding of the larger of W and D.
            scale = max(1.0, (merged[n] - before[n]).abs().max().item())
            assert (after[n] - before[n]).abs().max().item() <= 1e-6 * scale, (name, n)
        assert rel_error(models.logits(model, refs["ids"]), refs[name]["logits"]) <= 1e-5, name


@check(*LAYOUTS)
def merge_and_unload_releases_a_model_transformers_loads(ctx):
    refs = _refs(ctx)
    for name, config in MERGE_CASES.items():
        model = dl.merge_and_unload(_with_adapter(ctx, config, refs[name]["state"]))
        assert not list(adapter_layers(model)) and not hasattr(model, "dist_lora_adapters")
        assert rel_error(models.logits(model, refs["ids"]), refs[name]["merged"]) <= 1e-5, name
        out = ctx.tmp / f"merged_{name}_{ctx.layout.name}"
        models.save_pretrained(model, out)
        if ctx.groups.rank == 0:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
            with torch.no_grad():
                assert rel_error(loaded(refs["ids"]).logits, refs[name]["merged"]) <= 1e-5, name
        barrier()


@check(*LAYOUTS)
def several_adapters_switch_add_disable_and_delete_like_peft(ctx):
    refs = _refs(ctx)
    two = refs["two"]
    model = _with_adapter(ctx, CONFIG_A, two["states"]["default"])
    dl.add_adapter(model, dl.LoraConfig(**CONFIG_B), "b")
    dl.set_adapter_state_dict(model, two["states"]["b"], "b")
    assert dl.active_adapters(model) == ["default"], "add_adapter must not activate"
    assert rel_error(models.logits(model, refs["ids"]), two["logits"]["a"]) <= 1e-5
    dl.set_adapter(model, "b")
    assert rel_error(models.logits(model, refs["ids"]), two["logits"]["b"]) <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora.b." in n for n in trainable), "only the active adapter trains"
    dl.set_adapter(model, ["default", "b"])
    assert rel_error(models.logits(model, refs["ids"]), two["logits"]["a+b"]) <= 1e-5
    with dl.disable_adapter(model):
        assert rel_error(models.logits(model, refs["ids"]), two["logits"]["base"]) <= 1e-5
    assert rel_error(models.logits(model, refs["ids"]), two["logits"]["a+b"]) <= 1e-5
    dl.delete_adapter(model, "default")
    assert dl.active_adapters(model) == ["b"]
    assert not any(".lora.default." in n for n, _ in model.named_parameters())
    assert rel_error(models.logits(model, refs["ids"]), two["logits"]["b"]) <= 1e-5
    model = dl.unload(model)
    assert rel_error(models.logits(model, refs["ids"]), two["logits"]["base"]) <= 1e-5


@check("tp2", "tp2-pp2")
def check_replicas_catches_a_perturbed_replica(ctx):
    refs = _refs(ctx)
    model = _with_adapter(ctx, MERGE_CASES["lora"], refs["lora"]["state"])
    dl.check_replicas(model)
    name, layer = next((n, l) for n, l in adapter_layers(model) if l.shard.kind == "column" and l.shard.tp > 1)
    factors = next(iter(layer.factors_of("default").values()))
    with torch.no_grad():
        if ctx.groups.tp_rank == 1:
            factors.lora_A[0, 0] += 1e-3  # a replicated factor drifts on one TP rank
    with pytest.raises(RankError, match=rf"{name}\.lora\.default\..*lora_A differs between tensor-parallel"):
        dl.check_replicas(model)


@check("tp2")
def check_replicas_catches_data_parallel_drift(ctx):
    refs = _refs(ctx)
    model = _with_adapter(ctx, MERGE_CASES["lora"], refs["lora"]["state"])
    _, layer = next((n, l) for n, l in adapter_layers(model) if l.shard.kind == "row")
    with torch.no_grad():
        if ctx.groups.dp_rank == 1:
            next(iter(layer.factors_of("default").values())).lora_A.mul_(1.01)
    with pytest.raises(RankError, match="differs between data-parallel replicas"):
        dl.check_replicas(model)


@check("tp2", "tp2-sp")
def dropout_training_keeps_replicated_factors_identical(ctx):
    """With lora_dropout the replicated input of column layers must be dropped identically on
    every TP rank, or A's gradient (and then A) differs between ranks."""
    from dist_lora.models.training import finalize_grads, forward_backward

    for use_dora in (False, True):  # DoRA recomputes W x of the dropped-out input
        model = models.from_pretrained(ctx.data["llama"])
        dl.apply_lora(model, dl.LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear", use_dora=use_dora,
                                           init_lora_weights=False))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = _ids()
        for _ in range(2):
            optimizer.zero_grad()
            forward_backward(model, ids, ids)
            finalize_grads(model)
            optimizer.step()
        dl.check_replicas(model)


def _unchanged(model, before: dict) -> None:
    after = {n: p for n, p in model.named_parameters()}
    assert sorted(after) == sorted(before) and not list(adapter_layers(model))


@check("tp2", "tp2-pp2")
def bad_adapter_input_fails_on_every_rank_and_changes_nothing(ctx):
    model = models.from_pretrained(ctx.data["llama"])
    before = dict(model.named_parameters())
    cases = [
        (dict(target_modules=["q_projj"]), "matched no module; modules that could match: .*q_proj"),
        (dict(target_modules=["embed_tokens"], use_dora=True), "DoRA is not supported on embedding"),
        (dict(target_modules=["linear_qkv", "q_proj"]), "both as a fused layer and by its projections"),
        (dict(target_modules=["q_proj"], modules_to_save=["nothing_here"]), "modules_to_save entry 'nothing_here'"),
        (dict(target_modules=["q_proj"], r=4 + ctx.groups.rank % 2), "config differs between ranks"),
    ]
    for kwargs, needle in cases:
        with pytest.raises((RankError, ValueError), match=needle):
            dl.apply_lora(model, dl.LoraConfig(**kwargs))
        _unchanged(model, before)
    dl.apply_lora(model, dl.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises((RankError, ValueError), match="adapter 'default' already exists"):
        dl.add_adapter(model, dl.LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="adapter 'nope' does not exist"):
        dl.set_adapter(model, "nope")
    everyone = all_gather_object(dl.active_adapters(model))
    assert everyone == [["default"]] * ctx.world_size


test_management_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)

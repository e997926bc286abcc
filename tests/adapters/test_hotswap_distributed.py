"""Hotswapping on sharded Megatron models against PEFT, in one 2-rank launch (TP2, TP2 + SP, PP2).

PEFT makes and saves the adapters on the single-device HF model and gives each one's logits.
Workers load adapter 1, enable hotswap, swap adapter 2 in (other rank and alpha, rsLoRA, rank and
alpha patterns, one target fewer), swap adapter 1 back, and must match PEFT's logits for each
while no parameter is reallocated; the swapped model exports adapter 2 exactly; a sharded
checkpoint saved at TP2 swaps in at TP2 + SP and PP2. Every limit is refused on every rank (at
PP2 some are seen by one stage only) and leaves the model as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_lora as dl
from dist_lora import AdaLoraConfig, models
from dist_lora.adapters.registry import require_adapter
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
TARGET_RANK = 8
ADAPTERS = {
    "one": dict(r=4, lora_alpha=8, target_modules=ALL),
    # other rank and alpha, rsLoRA, patterns; no k_proj (its slots become vacant)
    "two": dict(r=6, lora_alpha=5, use_rslora=True, target_modules=[m for m in ALL if m != "k_proj"],
                rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 8}, alpha_pattern={"o_proj": 11}),
    # limits
    "base": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "new_module": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "model.layers.1.self_attn.k_proj"]),
    "rank_16": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"model.layers.1.self_attn.v_proj": 16}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
}
NARROW = dict(TINY_CONFIGS["llama"], hidden_size=32)  # another base model, same module names


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    save_tiny(TINY_CONFIGS["qwen2"], tmp / "qwen2")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5))
    logits = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        model = peft_model("llama", dict(config, init_lora_weights=False))
        model.save_pretrained(tmp / "peft" / name)
        with torch.no_grad():
            logits[name] = model(ids).logits
    torch.manual_seed(7)
    peft_model("llama", dict(ADAPTERS["base"], init_lora_weights=False),
               base=hf_model(NARROW)).save_pretrained(tmp / "peft" / "other_base")
    torch.save({"ids": ids, "logits": logits}, tmp / "refs.pt")
    return {"llama": str(tmp / "llama"), "qwen2": str(tmp / "qwen2")}


def _refs(ctx):
    return torch.load(Path(ctx.tmp) / "refs.pt")


def _peft(ctx, name):
    return Path(ctx.tmp) / "peft" / name


def _storage(model) -> dict[str, int]:
    out = {f"param {n}": p.data_ptr() for n, p in model.named_parameters()}
    out.update({f"buffer {n}": b.data_ptr() for n, b in model.named_buffers()})
    return out


def _ckpt_two(ctx) -> Path:
    return Path(ctx.tmp) / "ckpt_two_tp2"


@check("tp2", "tp2-sp", "pp2")
def swaps_match_peft_without_reallocating(ctx):
    refs = _refs(ctx)
    model = models.from_pretrained(ctx.data["llama"])
    dl.import_peft(model, _peft(ctx, "one"))
    dl.enable_hotswap(model, target_rank=TARGET_RANK)  # after the first adapter: pads it
    assert rel_error(models.logits(model, refs["ids"]), refs["logits"]["one"]) <= 1e-5, "padding changed the output"
    storage, count = _storage(model), len(list(model.parameters()))
    for name in ("two", "one", "two"):
        dl.import_peft(model, _peft(ctx, name), hotswap=True)
        assert rel_error(models.logits(model, refs["ids"]), refs["logits"][name]) <= 1e-5, name
        assert _storage(model) == storage and len(list(model.parameters())) == count, f"{name} reallocated"
    assert require_adapter(model, "default").use_rslora and require_adapter(model, "default").r == 6
    if ctx.layout.name == "tp2":
        # the swapped model is adapter two: its export is PEFT's file, k_proj (vacant) left out
        out = Path(ctx.tmp) / "export_two"
        dl.export_peft(model, out)
        dl.save_adapter(model, _ckpt_two(ctx))
        if ctx.groups.rank == 0:
            import peft

            ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(_peft(ctx, "two") / "adapter_model.safetensors")
            theirs = {k: v for k, v in theirs.items() if not k.endswith("base_layer.weight")}
            assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
            loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), out).eval()
            with torch.no_grad():
                assert rel_error(loaded(refs["ids"]).logits, refs["logits"]["two"]) <= 1e-5
        barrier()


@check("tp2-sp", "pp2")
def a_sharded_checkpoint_swaps_in_on_another_layout(ctx):
    """Adapter two, saved at TP2 by the check above, swaps into adapter one (enabled before it was
    loaded) through load_adapter, reading only this layout's slices."""
    refs = _refs(ctx)
    model = models.from_pretrained(ctx.data["llama"])
    dl.enable_hotswap(model, target_rank=TARGET_RANK)  # before the first adapter: pads it when loaded
    dl.import_peft(model, _peft(ctx, "one"))
    storage = _storage(model)
    dl.load_adapter(model, _ckpt_two(ctx))  # hotswap="auto": enabled and "default" exists
    assert rel_error(models.logits(model, refs["ids"]), refs["logits"]["two"]) <= 1e-5
    dl.import_peft(model, _peft(ctx, "one"))
    assert rel_error(models.logits(model, refs["ids"]), refs["logits"]["one"]) <= 1e-5
    assert _storage(model) == storage


def _adalora_checkpoint(ctx) -> Path:
    path = Path(ctx.tmp) / f"ckpt_adalora_{ctx.layout.name}"
    if not path.exists():
        model = models.from_pretrained(ctx.data["llama"])
        dl.apply_adalora(model, AdaLoraConfig(init_r=3, target_r=1, lora_alpha=6, tinit=1, tfinal=2, total_step=9,
                                              deltaT=2, target_modules=["q_proj", "v_proj"]))
        dl.save_adapter(model, path)
    return path


def _qwen_checkpoint(ctx) -> Path:
    path = Path(ctx.tmp) / f"ckpt_qwen_{ctx.layout.name}"
    if not path.exists():
        model = models.from_pretrained(ctx.data["qwen2"])
        dl.apply_lora(model, dl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        dl.save_adapter(model, path)
    return path


@check("tp2", "pp2")
def each_limit_is_refused_on_every_rank_and_changes_nothing(ctx):
    refs = _refs(ctx)
    adalora, qwen = _adalora_checkpoint(ctx), _qwen_checkpoint(ctx)
    model = models.from_pretrained(ctx.data["llama"])
    dl.import_peft(model, _peft(ctx, "base"))
    dl.enable_hotswap(model, target_rank=TARGET_RANK)
    before = {k: v.clone() for k, v in dl.adapter_state_dict(model).items()}
    storage, config = _storage(model), require_adapter(model, "default").to_dict()
    cases = [
        (lambda: dl.import_peft(model, _peft(ctx, "new_module")), r"targets model\.layers\.1\.self_attn\.k_proj, which adapter 'default' does not"),
        (lambda: dl.import_peft(model, _peft(ctx, "rank_16")), r"has rank 16, above 8.*target_rank=16"),
        (lambda: dl.import_peft(model, _peft(ctx, "dora")), r"is DoRA; hotswapping supports plain LoRA"),
        (lambda: dl.load_adapter(model, adalora), r"is ADALORA; hotswapping supports plain LoRA"),
        (lambda: dl.import_peft(model, _peft(ctx, "other_base")), r"q_proj.lora_A.weight has shape \(4, 32\), this model needs \(4, 64\)"),
        (lambda: dl.load_adapter(model, qwen), r"saved from another model"),
        (lambda: dl.import_peft(model, _peft(ctx, "base"), adapter_name="other", hotswap=True), r"has no adapter 'other'"),
    ]
    for swap, message in cases:
        with pytest.raises(RankError, match=message):
            swap()
        after = dl.adapter_state_dict(model)
        assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before), message
        assert _storage(model) == storage and require_adapter(model, "default").to_dict() == config, message
    dl.merge_adapter(model)
    with pytest.raises(RankError, match="is merged into the base weights"):
        dl.import_peft(model, _peft(ctx, "base"))
    dl.unmerge_adapter(model)
    assert rel_error(models.logits(model, refs["ids"]), refs["logits"]["base"]) <= 1e-5


test_hotswap_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)

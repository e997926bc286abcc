"""Sharded adapter checkpoints and PEFT conversion against PEFT itself, in one 4-rank launch.

Adapters are made and saved by PEFT (``save_pretrained``) on the single-device HF model. Workers
import them onto Megatron layouts, must reproduce PEFT's logits, export files PEFT loads to the
same logits, and move adapters between layouts bit for bit. Layouts run in this order in the
same processes: tp2 (TP2 x DP2), tp4, tp1 (DP4), pp2, tp2-pp2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_lora as dl
from dist_lora import models
from dist_lora.checkpoint.sharded import read_manifest
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object, barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

FUSABLE = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "o_proj"],
               rank_pattern={"v_proj": 2, "gate_proj": 3}, alpha_pattern={"up_proj": 5})
ADAPTERS = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear": dict(r=4, lora_alpha=16, target_modules="all-linear"),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                            rank_pattern={"down_proj": 2, "model.layers.0.self_attn.k_proj": 6},
                            alpha_pattern={"q_proj": 5}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "embed_and_saved_lm_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
                                    modules_to_save=["lm_head"]),
}


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    save_tiny(TINY_CONFIGS["qwen2"], tmp / "qwen2")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name, config in list(ADAPTERS.items()) + [("fusable", FUSABLE)]:
        model = peft_model("llama", dict(config, init_lora_weights=False))
        model.save_pretrained(tmp / "peft" / name)
        with torch.no_grad():
            logits[name] = model(ids).logits
    torch.save({"ids": ids, "logits": logits}, tmp / "refs.pt")
    return {"llama": str(tmp / "llama"), "qwen2": str(tmp / "qwen2")}


def _refs(ctx):
    return torch.load(Path(ctx.tmp) / "refs.pt")


def _peft_dir(ctx, name):
    return Path(ctx.tmp) / "peft" / name


def _imported(ctx, name):
    model = models.from_pretrained(ctx.data["llama"])
    dl.import_peft(model, _peft_dir(ctx, name))
    return model


def _same_files(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    extra = {k for k in x if k.endswith("base_layer.weight")}  # base weights PEFT stores beside embedding LoRA
    assert sorted(set(x) - extra) == sorted(y), sorted(set(x) ^ set(y))
    for key in y:
        assert torch.equal(x[key], y[key]), key
    assert not any(s in k for k in y for s in ("linear_qkv", "linear_fc1", "base_layer.weight")), "fused or base keys"


@check("tp2", "pp2", "tp2-pp2")
def peft_adapters_import_with_peft_logits(ctx):
    refs = _refs(ctx)
    for name in ADAPTERS:
        logits = models.logits(_imported(ctx, name), refs["ids"])
        assert rel_error(logits, refs["logits"][name]) <= 1e-5, name


@check("tp2", "tp2-pp2")
def exports_load_in_peft_with_the_same_logits_and_bit_exact_tensors(ctx):
    refs = _refs(ctx)
    for name in ADAPTERS:
        out = Path(ctx.tmp) / f"export_{name}_{ctx.layout.name}"
        dl.export_peft(_imported(ctx, name), out, base_model_name_or_path="tiny-llama")
        if ctx.groups.rank == 0:
            import peft

            _same_files(_peft_dir(ctx, name), out)
            loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), out).eval()
            with torch.no_grad():
                assert rel_error(loaded(refs["ids"]).logits, refs["logits"][name]) <= 1e-5, name
            assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
        barrier()


@check("tp2", "tp4", "tp1")
def resharding_tp2_tp4_tp1_is_bit_exact(ctx):
    """tp2 saves; tp4 loads that and saves again; tp1 loads, and both the live export and the
    offline export of the checkpoint equal PEFT's original files bit for bit."""
    base = Path(ctx.tmp)
    for name in ("dora", "embed_and_saved_lm_head", "rslora_patterns"):
        if ctx.layout.tp == 2:
            dl.save_adapter(_imported(ctx, name), base / f"ckpt_{name}_tp2")
            continue
        model = models.from_pretrained(ctx.data["llama"])
        source = base / (f"ckpt_{name}_tp2" if ctx.layout.tp == 4 else f"ckpt_{name}_tp4")
        dl.load_adapter(model, source)
        if ctx.layout.tp == 4:
            dl.save_adapter(model, base / f"ckpt_{name}_tp4")
            continue
        dl.export_peft(model, base / f"roundtrip_{name}")
        if ctx.groups.rank == 0:
            _same_files(_peft_dir(ctx, name), base / f"roundtrip_{name}")
            dl.export_peft(source, base / f"offline_{name}")  # no process group needed
            _same_files(_peft_dir(ctx, name), base / f"offline_{name}")
        barrier()


@check("tp2-pp2")
def sharded_checkpoint_reloads_across_pipeline_stages(ctx):
    refs = _refs(ctx)
    model = _imported(ctx, "all_linear")
    path = Path(ctx.tmp) / "ckpt_pp"
    dl.save_adapter(model, path)
    manifest = read_manifest(path)
    assert manifest["layout"] == {"tp": 2, "pp": 2, "stage_layers": [1, 1]} and len(manifest["files"]) == 4
    fresh = models.from_pretrained(ctx.data["llama"])
    dl.load_adapter(fresh, path)
    assert rel_error(models.logits(fresh, refs["ids"]), refs["logits"]["all_linear"]) <= 1e-5
    with pytest.raises(RankError, match="exists; pass overwrite=True"):
        dl.save_adapter(model, path)


def _broken_copies(ctx, source: Path) -> dict[str, Path]:
    root = Path(ctx.tmp) / f"broken_{ctx.layout.name}"
    if ctx.groups.rank == 0:
        shard = "adapter-tp01-pp00.safetensors"
        for case in ("corrupted", "truncated", "missing_shard", "outside", "pickle"):
            shutil.copytree(source, root / case)
        data = bytearray((root / "corrupted" / shard).read_bytes())
        data[-10] ^= 0xFF
        (root / "corrupted" / shard).write_bytes(bytes(data))
        (root / "truncated" / shard).write_bytes((root / "truncated" / shard).read_bytes()[:-64])
        (root / "missing_shard" / shard).unlink()
        manifest = json.loads((root / "outside" / "manifest.json").read_text())
        manifest["files"]["../escape.safetensors"] = manifest["files"].pop(shard)
        (root / "outside" / "manifest.json").write_text(json.dumps(manifest))
        torch.save({"not": "safetensors"}, root / "pickle" / shard)
        from dist_lora.checkpoint.sharded import sha256_of

        manifest = json.loads((root / "pickle" / "manifest.json").read_text())
        manifest["files"][shard]["sha256"] = sha256_of(root / "pickle" / shard)  # passes the checksum
        (root / "pickle" / "manifest.json").write_text(json.dumps(manifest))
    barrier()
    return {case: root / case for case in ("corrupted", "truncated", "missing_shard", "outside", "pickle")}


@check("tp2")
def bad_checkpoints_fail_on_every_rank_and_change_nothing(ctx):
    source = Path(ctx.tmp) / "ckpt_bad_source"
    dl.save_adapter(_imported(ctx, "q_v"), source)
    expected = {
        "corrupted": "checksum mismatch", "truncated": "checksum mismatch", "missing_shard": "is missing",
        "outside": "points outside", "pickle": "not a readable safetensors file",
    }
    model = _imported(ctx, "q_v")
    before = {k: v.clone() for k, v in dl.adapter_state_dict(model).items()}
    for case, path in _broken_copies(ctx, source).items():
        listing = sorted(p.name for p in path.iterdir())
        with pytest.raises((RankError, ValueError, FileNotFoundError), match=expected[case]):
            dl.load_adapter(model, path)
        after = dl.adapter_state_dict(model)
        assert all(torch.equal(before[k], after[k]) for k in before), case
        assert sorted(p.name for p in path.iterdir()) == listing, f"{case}: files changed"
    other = models.from_pretrained(ctx.data["qwen2"])
    dl.apply_lora(other, dl.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    qwen_ckpt = Path(ctx.tmp) / "ckpt_qwen"
    dl.save_adapter(other, qwen_ckpt)
    with pytest.raises((RankError, ValueError), match="another model"):
        dl.load_adapter(model, qwen_ckpt)
    messages = all_gather_object("ok")
    assert messages == ["ok"] * ctx.world_size


@check("tp2", "tp2-pp2")
def resume_continues_with_bit_identical_losses(ctx):
    """2 steps, save, a fresh model and optimizer, load, 2 more steps == 4 uninterrupted steps.
    lora_dropout draws random masks, so the RNG states must come back too."""
    from dist_lora.models.training import finalize_grads, forward_backward
    from dist_lora.parallel.initialize import reseed

    g = torch.Generator().manual_seed(21)
    batches = [(torch.randint(0, 101, (4, 8), generator=g), torch.randint(0, 101, (4, 8), generator=g))
               for _ in range(4)]

    def fresh():
        model = models.from_pretrained(ctx.data["llama"])
        dl.apply_lora(model, dl.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear", use_dora=True))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model, optimizer, batch):
        optimizer.zero_grad()
        ids, labels = (t.chunk(ctx.groups.dp_size)[ctx.groups.dp_rank] for t in batch)
        loss = forward_backward(model, ids, labels, num_microbatches=2 if ctx.groups.pp_size > 1 else 1)
        finalize_grads(model)
        optimizer.step()
        return loss.item()

    reseed(7)  # the default generator and Megatron's tracker (dropout of TP-split inputs)
    model, optimizer = fresh()
    straight = [step(model, optimizer, b) for b in batches]
    reseed(7)
    model, optimizer = fresh()
    first = [step(model, optimizer, b) for b in batches[:2]]
    path = Path(ctx.tmp) / f"train_{ctx.layout.name}"
    dl.save_training_state(model, optimizer, path, step=2, data_position=2, extra={"note": "resume"})
    reseed(999)  # different streams: only restored RNG states give the same dropout
    model, optimizer = fresh()
    record = dl.load_training_state(model, optimizer, path)
    assert (record["step"], record["data_position"], record["extra"]) == (2, 2, {"note": "resume"})
    rest = [step(model, optimizer, b) for b in batches[record["data_position"]:]]
    assert first + rest == straight, (first + rest, straight)


@check("tp2", "tp4", "tp2-pp2", "pp2")
def offline_reshard_loads_on_the_new_layout_bit_exact(ctx):
    """tp2 saves; rank 0 re-lays the checkpoint offline (`dist-lora convert --tp 4`, `--tp 2 --pp 2`,
    `--pp 2`); the new layouts load it and export PEFT's original tensors bit for bit."""
    from dist_lora.cli import main

    base = Path(ctx.tmp)
    targets = {"tp4": ["--tp", "4"], "tp2-pp2": ["--tp", "2", "--pp", "2"], "tp1-pp2": ["--pp", "2"]}
    name = "dora"
    if ctx.layout.name == "tp2":
        dl.save_adapter(_imported(ctx, name), base / "offline_src")
        if ctx.groups.rank == 0:
            for layout, flags in targets.items():
                assert main(["convert", str(base / "offline_src"), str(base / f"offline_{layout}"), *flags]) == 0
        barrier()
        return
    model = models.from_pretrained(ctx.data["llama"])
    dl.load_adapter(model, base / f"offline_{ctx.layout.name}")
    out = base / f"offline_export_{ctx.layout.name}"
    dl.export_peft(model, out)
    if ctx.groups.rank == 0:
        _same_files(_peft_dir(ctx, name), out)
    barrier()


@check("tp2-pp2")
def peft_converts_offline_to_a_sharded_checkpoint(ctx):
    """`dist-lora convert PEFT_DIR OUT --base HF --tp 2 --pp 2` (rank 0, no process group) writes
    what this layout loads with PEFT's logits."""
    from dist_lora.cli import main

    refs = _refs(ctx)
    for name in ("rslora_patterns", "embed_and_saved_lm_head", "dora"):
        out = Path(ctx.tmp) / f"converted_{name}"
        if ctx.groups.rank == 0:
            assert main(["convert", str(_peft_dir(ctx, name)), str(out), "--base", ctx.data["llama"],
                         "--tp", "2", "--pp", "2"]) == 0
        barrier()
        model = models.from_pretrained(ctx.data["llama"])
        dl.load_adapter(model, out)
        assert rel_error(models.logits(model, refs["ids"]), refs["logits"][name]) <= 1e-5, name


@check("tp2", "tp2-pp2")
def peft_projections_import_exactly_as_fused_adapters_of_summed_rank(ctx):
    refs = _refs(ctx)
    model = models.from_pretrained(ctx.data["llama"])
    dl.import_peft(model, _peft_dir(ctx, "fusable"), fused=True)
    assert rel_error(models.logits(model, refs["ids"]), refs["logits"]["fusable"]) <= 1e-5
    from dist_lora.adapters.registry import adapter_layers

    ranks = {n.rsplit(".", 1)[1]: {f.r for f in layer.factors_of("default").values()}
             for n, layer in adapter_layers(model)}
    assert ranks["linear_qkv"] == {4 + 2} and ranks["linear_fc1"] == {3 + 4} and ranks["linear_proj"] == {4}


test_checkpoint_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)

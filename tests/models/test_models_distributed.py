"""Megatron models built from HF checkpoints against transformers' own forward, on 4 ranks.

One launch of 4 processes runs every check below on each layout it names; at world size 4,
``tp1`` is DP=4, ``tp2`` is TP=2 x DP=2, ``pp2`` is PP=2 x DP=2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora import models
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object, barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

FAMILIES = ("llama", "mistral", "qwen2", "llama_index")
ALL_LAYOUTS = ("tp1", "tp2", "tp4", "tp2-sp", "pp2", "tp2-pp2")


def prepare(tmp: Path) -> dict:
    """HF checkpoints of each family and transformers' logits on a fixed batch (the oracle)."""
    data = {}
    torch.manual_seed(7)
    for name in FAMILIES:
        family = name.split("_")[0]
        config = TINY_CONFIGS[family]
        model = save_tiny(config, tmp / name, max_shard_size="60KB" if name.endswith("index") else None)
        ids = torch.randint(0, config["vocab_size"], (2, 11))
        with torch.no_grad():
            ref = model(ids).logits
        torch.save({"ids": ids, "logits": ref}, tmp / f"{name}_ref.pt")
        data[name] = str(tmp / name)
    bad = tmp / "bad"
    for case in ("truncated", "missing_tensor", "no_weights", "gpt2", "kv2"):
        shutil.copytree(tmp / "llama", bad / case)
    file = bad / "truncated" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size - 1000])
    tensors = load_file(bad / "missing_tensor" / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, bad / "missing_tensor" / "model.safetensors", metadata={"format": "pt"})
    (bad / "no_weights" / "model.safetensors").unlink()
    torch.save({}, bad / "no_weights" / "pytorch_model.bin")
    for case, change in (("gpt2", {"model_type": "gpt2"}), ("kv2", {"num_key_value_heads": 2})):
        cfg = json.loads((bad / case / "config.json").read_text())
        cfg.update(change)
        (bad / case / "config.json").write_text(json.dumps(cfg))
    data["bad"] = str(bad)
    return data


@check(*ALL_LAYOUTS)
def logits_match_transformers(ctx):
    for name in FAMILIES:
        ref = torch.load(Path(ctx.data[name] + "_ref.pt"))
        model = models.from_pretrained(ctx.data[name])
        out = models.logits(model, ref["ids"])
        assert out.shape == ref["logits"].shape, (name, out.shape)
        diff = (out - ref["logits"]).abs().max().item()
        assert diff <= 1e-4, f"{name} on {ctx.groups.layout}: max |diff| {diff:.3e}"


@check("tp2", "tp4", "tp2-pp2")
def each_rank_reads_its_share(ctx):
    """Bytes read per rank ~ (sharded bytes) / (TP x PP) + replicated norms, not the whole file."""
    path = ctx.data["llama"]
    model = models.from_pretrained(path)
    total = (Path(path) / "model.safetensors").stat().st_size
    spec = model.dist_lora.spec
    norms = (2 * spec.num_layers + 1) * spec.hidden_size * 4
    share = total / (ctx.groups.tp_size * ctx.groups.pp_size)
    # Padding of the 101-token vocabulary is not read; the bound allows for uneven stages.
    assert model.dist_lora.bytes_read <= 1.15 * share + norms, (model.dist_lora.bytes_read, share)


@check("tp1", "tp2", "tp2-pp2")
def save_pretrained_round_trip_is_bit_exact(ctx):
    for name in ("llama", "qwen2"):
        model = models.from_pretrained(ctx.data[name])
        out = ctx.tmp / f"saved_{name}_{ctx.layout.name}"
        # A small shard size forces several files and an index.
        models.save_pretrained(model, out, max_shard_size=40_000)
        if ctx.groups.rank == 0:
            original = load_file(Path(ctx.data[name]) / "model.safetensors")
            index = json.loads((out / "model.safetensors.index.json").read_text())
            saved = {}
            for file in sorted(set(index["weight_map"].values())):
                saved.update(load_file(out / file))
            assert sorted(saved) == sorted(original), set(saved) ^ set(original)
            for key, tensor in original.items():
                assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
        barrier()
        with pytest.raises(RankError, match="exists"):
            models.save_pretrained(model, out)


@check("tp2-pp2")
def transformers_loads_saved_model(ctx):
    model = models.from_pretrained(ctx.data["llama"])
    out = ctx.tmp / "saved_for_transformers"
    models.save_pretrained(model, out)
    if ctx.groups.rank == 0:
        from transformers import AutoModelForCausalLM

        ref = torch.load(Path(ctx.data["llama"] + "_ref.pt"))
        loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.allclose(loaded(ref["ids"]).logits, ref["logits"], atol=1e-5)
    barrier()


def _fails_everywhere(ctx, path, needle):
    """``from_pretrained(path)`` raises on every rank, with ``needle`` in the message."""
    try:
        models.from_pretrained(path)
    except (RankError, OSError, ValueError, KeyError) as err:
        message = str(err)
    else:
        message = None
    messages = all_gather_object(message)
    assert all(m is not None and needle in m for m in messages), messages


@check("tp2", "tp4")
def bad_checkpoints_fail_on_every_rank(ctx):
    bad = Path(ctx.data["bad"])
    _fails_everywhere(ctx, bad / "truncated", "truncated")
    _fails_everywhere(ctx, bad / "missing_tensor", "model.layers.1.mlp.down_proj.weight")
    _fails_everywhere(ctx, bad / "no_weights", "never unpickles")
    _fails_everywhere(ctx, bad / "gpt2", "unsupported model_type 'gpt2'")
    _fails_everywhere(ctx, bad / "does_not_exist", "config.json does not exist")


@check("tp4")
def tp_that_does_not_divide_kv_heads_fails(ctx):
    _fails_everywhere(ctx, Path(ctx.data["bad"]) / "kv2", "does not divide num_key_value_heads=2")


@check("pp4")
def more_stages_than_layers_fails(ctx):
    _fails_everywhere(ctx, ctx.data["llama"], "pipeline_parallel=4 is larger than the number of layers (2)")


test_models_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)

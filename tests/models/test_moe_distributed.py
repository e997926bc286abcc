"""Mixture-of-experts models built from HF checkpoints against transformers' own forward, on 4 ranks.

Mixtral (top-k weights renormalised) and Qwen3-MoE (q / k norms, its own head_dim, top-k weights
not renormalised). At world size 4: ``tp1-ep2`` is DP4 with two experts per expert-parallel rank (expert-data-parallel
2), ``tp1-ep2-etp2`` splits each expert over two ranks, ``tp2-ep2-sp`` is TP2 + SP x DP2 with the
experts spread over each TP pair, ``tp1-pp2`` and ``tp1-pp2-ep2`` put the two layers on two
stages (and a three-layer Qwen3-MoE on uneven ones). The reference batch reaches every expert of every layer (checked when it is made).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_lora import models
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object, barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.tiny import TINY_CONFIGS, experts_reached, hf_model, save_tiny

FAMILIES = ("mixtral", "qwen3_moe")
LAYOUTS = ("tp1-ep2-etp2", "tp1-ep2", "tp2-ep2-sp", "tp1-pp2", "tp1-pp2-ep2")


def prepare(tmp: Path) -> dict:
    """HF checkpoints (per-expert and transformers' fused format) and transformers' logits."""
    data = {}
    for name in FAMILIES:
        config = TINY_CONFIGS[name]
        model = save_tiny(config, tmp / name)
        model.save_pretrained(tmp / f"{name}_fused", save_original_format=False)
        ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))
        experts = config.get("num_local_experts", config.get("num_experts"))
        assert all(r == set(range(experts)) for r in experts_reached(model, ids)), "the batch misses experts"
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, tmp / f"{name}_ref.pt")
        data[name] = str(tmp / name)
    # three layers: uneven pipeline stages ([2, 1] balanced, [1, 2] with first_stage_layers=1)
    three = {**TINY_CONFIGS["qwen3_moe"], "num_hidden_layers": 3}
    model = save_tiny(three, tmp / "qwen3_moe_3_layers")
    ids = torch.load(tmp / "qwen3_moe_ref.pt")["ids"]
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp / "qwen3_moe_3_layers_ref.pt")
    data["qwen3_moe_3_layers"] = str(tmp / "qwen3_moe_3_layers")
    # a sliding window (4) shorter than the sequence (12), on every layer
    model = save_tiny({**TINY_CONFIGS["qwen3_moe"], "use_sliding_window": True, "sliding_window": 4},
                      tmp / "qwen3_moe_window")
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp / "qwen3_moe_window_ref.pt")
    data["qwen3_moe_window"] = str(tmp / "qwen3_moe_window")
    bad = {"three_experts": {"num_local_experts": 3}, "ffn47": {"intermediate_size": 47}}
    for case, change in bad.items():
        hf_model({**TINY_CONFIGS["mixtral"], **change}).save_pretrained(tmp / case)
        data[case] = str(tmp / case)
    return data


@check(*LAYOUTS)
def logits_match_transformers(ctx):
    for name in FAMILIES:
        ref = torch.load(Path(ctx.data[name] + "_ref.pt"))
        for path in (ctx.data[name], ctx.data[name] + "_fused"):
            out = models.logits(models.from_pretrained(path), ref["ids"])
            diff = (out - ref["logits"]).abs().max().item()
            assert diff <= 1e-5, f"{path} on {ctx.groups.layout}: max |diff| {diff:.3e}"


@check("tp1-pp2", "tp1-pp2-ep2")
def uneven_pipeline_stages_match_transformers(ctx):
    ref = torch.load(Path(ctx.data["qwen3_moe_3_layers"] + "_ref.pt"))
    for first, stages in ((None, [2, 1]), (1, [1, 2])):
        model = models.from_pretrained(ctx.data["qwen3_moe_3_layers"], first_stage_layers=first)
        assert len(model.decoder.layers) == stages[ctx.groups.pp_rank]
        diff = (models.logits(model, ref["ids"]) - ref["logits"]).abs().max().item()
        assert diff <= 1e-5, f"stages {stages} on {ctx.groups.layout}: max |diff| {diff:.3e}"


@check("tp2-ep2-sp", "tp1-pp2-ep2")
def qwen3_moe_sliding_window_matches_transformers(ctx):
    ref = torch.load(Path(ctx.data["qwen3_moe_window"] + "_ref.pt"))
    plain = torch.load(Path(ctx.data["qwen3_moe"] + "_ref.pt"))
    assert (ref["logits"] - plain["logits"]).abs().max().item() > 1e-3, "the window must matter"
    out = models.logits(models.from_pretrained(ctx.data["qwen3_moe_window"]), ref["ids"])
    assert (out - ref["logits"]).abs().max().item() <= 1e-5


@check("tp1-ep2-etp2", "tp2-ep2-sp")
def allgather_dispatcher_matches_transformers(ctx):
    for name in FAMILIES:
        ref = torch.load(Path(ctx.data[name] + "_ref.pt"))
        out = models.logits(models.from_pretrained(ctx.data[name], moe_token_dispatcher="allgather"), ref["ids"])
        assert (out - ref["logits"]).abs().max().item() <= 1e-5


@check("tp1-ep2-etp2", "tp2-ep2-sp", "tp1-pp2-ep2")
def each_rank_reads_only_its_experts(ctx):
    path = Path(ctx.data["mixtral"])
    model = models.from_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    experts = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".experts." in k)
    dense = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".experts." not in k)
    g = ctx.groups
    share = experts / (g.ep_size * g.etp_size * g.pp_size) + dense / (g.tp_size * g.pp_size)
    assert model.dist_lora.bytes_read <= 1.1 * share, (model.dist_lora.bytes_read, share)


@check("tp1-ep2-etp2", "tp2-ep2-sp", "tp1-pp2-ep2")
def save_pretrained_round_trip_is_bit_exact(ctx):
    """Written in transformers' default (per-expert) format, whichever format was read."""
    sources = [(name, ctx.data[name] + suffix) for name in FAMILIES for suffix in ("", "_fused")]
    for name, source in sources:
        model = models.from_pretrained(source)
        out = ctx.tmp / f"saved_{Path(source).name}_{ctx.layout.name}"
        models.save_pretrained(model, out, max_shard_size=60_000)
        if ctx.groups.rank == 0:
            original = load_file(Path(ctx.data[name]) / "model.safetensors")
            index = json.loads((out / "model.safetensors.index.json").read_text())
            saved = {}
            for file in sorted(set(index["weight_map"].values())):
                saved.update(load_file(out / file))
            assert sorted(saved) == sorted(original), set(saved) ^ set(original)
            for key, tensor in original.items():
                assert torch.equal(saved[key], tensor), key
        barrier()
        if ctx.groups.rank == 0:
            shutil.rmtree(out)


def _fails_everywhere(path, needle, **kwargs):
    try:
        models.from_pretrained(path, **kwargs)
    except (RankError, ValueError) as err:
        message = str(err)
    else:
        message = None
    messages = all_gather_object(message)
    assert all(m is not None and needle in m for m in messages), messages


@check("tp1-ep2-etp2")
def bad_expert_layouts_fail_on_every_rank(ctx):
    _fails_everywhere(ctx.data["three_experts"], "expert_parallel=2 does not divide the number of experts (3)")
    _fails_everywhere(ctx.data["ffn47"], "expert_tensor_parallel=2 does not divide the expert FFN size (47)")
    _fails_everywhere(ctx.data["mixtral"], "moe_token_dispatcher='flex'", moe_token_dispatcher="flex")


@check("tp2")
def tensor_parallel_without_sequence_parallel_is_refused(ctx):
    _fails_everywhere(ctx.data["mixtral"], "needs sequence_parallel=True")


test_moe_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)

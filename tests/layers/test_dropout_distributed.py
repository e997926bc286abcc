"""LoRA dropout masks across tensor-parallel ranks (issue 19), in one 2-rank launch.

A rank's dropout mask covers the part of the adapter input it holds. The adapter reads the input
the base layer computes with, after the base's own input collective: on column-parallel layers
(the output layer included) the whole input, under SP the all-gathered sequence, so the ranks must
draw the *same* mask, or they compute with different inputs; on row-parallel o_proj / down_proj
each rank holds different features, so the masks must be *independent*, or the global mask
repeats with period ``1/p`` (two ranks then agree everywhere, where independent Bernoulli(1/2)
masks agree on about half the elements).

Each check hooks every adapter's dropout module, runs one training forward, and compares the
masks of TP rank 0 and 1 elementwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.adapters.registry import adapter_layers
from dist_lora.models.training import forward_backward
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
COLUMN, ROW = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"), ("o_proj", "down_proj")


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    return {"llama": str(tmp / "llama")}


def _masks(ctx) -> dict[str, torch.Tensor]:
    """Every adapter slot's kept-element mask of one training forward on this rank."""
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=4, lora_dropout=0.5, target_modules=TARGETS, init_lora_weights=False))
    masks, handles = {}, []
    for _, layer in adapter_layers(model):
        for key, factors in layer.factors_of("default").items():
            short = key if key != "all" else layer.hf_names[0].rsplit(".", 1)[-1]
            name = f"{layer.global_name}.{short}"

            def record(module, inputs, output, name=name):
                assert (inputs[0] != 0).all(), "the test needs an input without zeros"
                masks[name] = output != 0

            handles.append(factors.dropout.register_forward_hook(record))
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(4))
    forward_backward(model, ids, ids)
    for handle in handles:
        handle.remove()
    return masks


def _agreement(ctx, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    everyone = all_gather_object((ctx.groups.tp_rank, masks))
    by_rank = dict(everyone)
    return {n: (by_rank[0][n] == by_rank[1][n]).float().mean().item() for n in masks}


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@check("tp2", "tp2-sp")
def replicated_inputs_share_one_mask_and_feature_shards_draw_their_own(ctx):
    masks = _masks(ctx)
    agreement = _agreement(ctx, masks)
    assert {_short(n) for n in agreement} == set(TARGETS), sorted(agreement)
    for name, agree in agreement.items():
        if _short(name) in COLUMN:  # replicated input: the same mask on every rank
            assert agree == 1.0, (name, agree)
        else:  # o_proj / down_proj hold different input features on each rank
            assert 0.4 < agree < 0.6, (name, agree)
    # and no two slots (other layers, other projections) repeat one stream, e.g. by restarting a
    # tracker state inside Megatron's own model-parallel fork (SP): their masks agree on ~half
    names = sorted(masks)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if masks[a].shape == masks[b].shape]
    assert len(pairs) > 10, pairs
    for a, b in pairs:
        agree = (masks[a] == masks[b]).float().mean().item()
        assert 0.4 < agree < 0.6, (a, b, agree)


test_dropout_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)

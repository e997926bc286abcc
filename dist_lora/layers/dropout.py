"""Which random stream draws a slot's LoRA dropout mask, so the masks of all TP ranks together
are the mask one device would draw over the whole input.

The adapter reads the input the base layer computes with, after the base's own input collective
(:mod:`dist_lora.layers.base_path`):

=========================================  ======================  ===========================
adapter input on this rank                 mask over the ranks     drawn from
=========================================  ======================  ===========================
replicated: column layers (the whole       identical on every rank Megatron's data-parallel
input; under SP the all-gathered                                   RNG tracker state (seeded
sequence), the output layer included                               ``seed`` on every rank)
split over features: row layers            independent per rank    Megatron's model-parallel
(``o_proj`` / ``down_proj``, with or                               RNG tracker state, forked
without SP)                                                        (seeded ``seed + 2718 +
                                                                   tp_rank``)
=========================================  ======================  ===========================

With one mask for split inputs the global mask repeats with period ``1/p`` (what attention
dropout avoids the same way: Megatron forks the model-parallel tracker around it). With
independent masks for a replicated input the ranks would compute with different inputs.
At TP = 1 (plain ``torch.nn`` layers included) the default generator draws every mask. The forward calls
:func:`dropped_inputs` at one place, before the hiddens ``A x`` are formed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dist_lora.integrations.megatron import DATA_PARALLEL_RNG, MODEL_PARALLEL_RNG, get_cuda_rng_tracker
from dist_lora.layers.sharding import BaseShard

REPLICATED = "replicated"  # the same mask on every TP rank
SPLIT = "split"  # an independent mask per TP rank


def dropout_region(shard: BaseShard) -> str:
    """``SPLIT`` where each TP rank holds a different part of the adapter input (row layers: input
    features), else ``REPLICATED``."""
    return SPLIT if shard.tp > 1 and shard.kind == "row" else REPLICATED


def _stream(shard: BaseShard) -> contextlib.AbstractContextManager:
    """The tracker state to draw from at TP > 1 (none at TP = 1: the default generator). Megatron
    runs its transformer block inside a fork of the model-parallel state under SP, so a replicated
    input cannot use the default generator there: it draws from the data-parallel state, seeded
    the same on every rank."""
    if shard.tp == 1:
        return contextlib.nullcontext()
    return get_cuda_rng_tracker().fork(MODEL_PARALLEL_RNG if dropout_region(shard) == SPLIT else DATA_PARALLEL_RNG)


def dropped_inputs(x: torch.Tensor, all_factors, shard: BaseShard) -> list[torch.Tensor]:
    """Each slot's adapter input: ``x`` cast to the adapter dtype (once per dtype, so slots
    without dropout share one tensor and one matmul), through its dropout, drawn from the stream
    :func:`dropout_region` names (see module docstring)."""
    drops = any(isinstance(f.dropout, nn.Dropout) and f.dropout.training for f in all_factors)
    cast: dict[torch.dtype, torch.Tensor] = {}
    with _stream(shard) if drops else contextlib.nullcontext():
        out = []
        for factors in all_factors:
            dtype = factors.lora_A.dtype
            if dtype not in cast:
                cast[dtype] = x.to(dtype)
            out.append(factors.dropout(cast[dtype]))
        return out

"""Which random stream draws a slot's LoRA dropout mask, so the masks of all TP ranks together
are the mask one device would draw over the whole input.

=========================================  ======================  ===========================
adapter input on this rank                 mask over the ranks     drawn from
=========================================  ======================  ===========================
replicated (column layers without SP; row  identical on every rank the default generator (equal
layers with ``input_is_parallel=False``)                           on the TP ranks)
split over features (row-parallel          independent per rank    Megatron's model-parallel
``o_proj`` / ``down_proj`` without SP)                             RNG tracker state, forked
split over the sequence (every layer                               (seeded ``seed + 2718 +
under SP, the output layer included)                               tp_rank``)
=========================================  ======================  ===========================

With one mask for split inputs the global mask repeats with period ``1/p`` (what attention
dropout avoids the same way: Megatron forks the model-parallel tracker around it). With
independent masks for a replicated input the ranks would compute with different inputs.
Plain ``torch.nn`` layers (TP = 1) use the default generator. The forward calls
:func:`dropped_inputs` at one place, before the hiddens ``A x`` are formed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dist_lora.integrations.megatron import get_cuda_rng_tracker
from dist_lora.layers.sharding import BaseShard

REPLICATED = "replicated"  # the same mask on every TP rank
SPLIT = "split"  # an independent mask per TP rank


def dropout_region(shard: BaseShard) -> str:
    """``SPLIT`` where each TP rank holds a different part of the adapter input, else ``REPLICATED``."""
    if shard.tp == 1:
        return REPLICATED
    if shard.sequence_parallel or (shard.kind == "row" and shard.input_is_parallel):
        return SPLIT
    return REPLICATED


def _stream(shard: BaseShard) -> contextlib.AbstractContextManager:
    return get_cuda_rng_tracker().fork() if dropout_region(shard) == SPLIT else contextlib.nullcontext()


def dropped_inputs(x: torch.Tensor, all_factors, shard: BaseShard) -> list[torch.Tensor]:
    """Each slot's adapter input: ``x`` in the adapter dtype, through its dropout, drawn from the
    stream :func:`dropout_region` names (see module docstring)."""
    drops = any(isinstance(f.dropout, nn.Dropout) and f.dropout.training for f in all_factors)
    with _stream(shard) if drops else contextlib.nullcontext():
        return [f.dropout(x.to(f.lora_A.dtype)) for f in all_factors]

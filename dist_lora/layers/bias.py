"""``bias="lora_only"`` in forward and merge: a slot's trained copy of the base bias rows it covers.

The base layer adds its own frozen bias ``b`` (or returns it, ``skip_bias_add``). A live adapter
slot covering output rows ``R`` with trained rows ``t`` (``LoraFactors.trained_bias``) adds
``t - b[R]`` to those rows, so the output carries ``t`` where the adapter is live and ``b``
elsewhere (PEFT, where each projection is its own module, trains ``q_proj.bias`` and never
``k_proj.bias``; a fused Megatron bias cannot be trained in part, so the trained rows live apart).

Sharding: ``t`` is split like the slot's B rows. Column layers: this rank's rows of the output,
whose gradient is complete on the rank. Row layers: ``t`` is replicated; under SP each rank's
output holds its sequence shard, so ``t`` enters through ``copy_to_group`` (identity forward,
all-reduce of its gradient). No collective in forward.

Merge writes ``t`` into ``b[R]`` (keeping the replaced rows for unmerge).
"""

from __future__ import annotations

import torch

from dist_lora.parallel.collectives import copy_to_group


def add_trained_biases(y: torch.Tensor, layer, all_factors) -> torch.Tensor:
    """``y`` [.., out_local] with the live slots' trained bias rows in place of the base's."""
    bias, delta = getattr(layer.base_layer, "bias", None), None
    for factors in all_factors:
        trained = factors.trained_bias
        if trained is None:
            continue
        if layer.shard.kind == "row" and layer.shard.sequence_parallel:
            trained = copy_to_group(trained, layer.shard.tp_group)
        rows = trained - factors.slot.select(bias).detach().to(trained.dtype)
        part = factors.slot.place(rows, y.shape[-1])
        delta = part if delta is None else delta + part
    return y if delta is None else y + delta.to(y.dtype)


def _write_rows(bias: torch.Tensor, slot, values: torch.Tensor) -> None:
    if slot.block is None:
        bias.data.copy_(values.to(bias.dtype))
    else:
        bias.data.index_copy_(0, slot.rows_on(bias.device), values.to(bias.dtype))


@torch.no_grad()
def merge_trained_bias(layer, factors) -> None:
    """Write ``factors.trained_bias`` into its rows of the base bias (the old rows are kept)."""
    bias = layer.base_layer.bias
    factors.replaced_bias = factors.slot.select(bias).detach().clone()
    _write_rows(bias, factors.slot, factors.trained_bias)


@torch.no_grad()
def unmerge_trained_bias(layer, factors) -> None:
    """Put back the base bias rows that :func:`merge_trained_bias` replaced."""
    _write_rows(layer.base_layer.bias, factors.slot, factors.replaced_bias)
    factors.replaced_bias = None

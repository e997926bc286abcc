"""The base layer's own computation, run by the adapter wrapper on the local shard.

An adapter wrapper of a Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` (or of their
4-bit stand-in, :class:`~dist_lora.layers.quantized.QuantizedLinear`) does not call the base
layer: it runs the base's steps itself, so that the adapter shares the base's collectives
instead of adding its own (Megatron-Core ``tensor_parallel/layers.py``, same order, same
collectives):

==========  ===============================================  ===========================================
kind        input (:func:`enter`)                            output (:func:`leave`)
==========  ===============================================  ===========================================
column      ``copy_to_group`` (identity; backward all-       local ``[s, b, out/p]``; gathered on the last
            reduces the input gradient), or with SP          dim only if the layer gathers its output
            ``gather_first_dim`` ``[s/p, b, h] -> [s, b, h]``
            (backward reduce-scatters)
row         already split on features (``input_is_parallel``)  partial sum ``[s, b, out]``: all-reduced
            or ``split_last_dim``                            (``reduce_from_group``), with SP
                                                             reduce-scattered to ``[s/p, b, out]``
==========  ===============================================  ===========================================

Between the two, :func:`local_linear` computes ``x W_i^T`` without bias and without
communication, and the wrapper adds its adapter outputs into that local result (a column layer's
rows, a row layer's partial sum) before :func:`leave`. :func:`finish` then adds the bias as
Megatron does (column: on the local rows; row: after the reduction) or returns it for the
caller (``skip_bias_add``), in Megatron's ``(output, bias)`` convention. Adding the bias outside
Megatron's frozen-weight autograd function also gives it the gradient that function drops
(``bias="all"`` / ``"lora_only"`` on column layers).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.integrations.megatron import local_linear as megatron_local_linear
from dist_lora.layers.quantized import QuantizedLinear
from dist_lora.layers.sharding import BaseShard
from dist_lora.parallel.collectives import (
    copy_to_group,
    gather_first_dim,
    gather_last_dim,
    reduce_from_group,
    reduce_scatter_first_dim,
    split_last_dim,
)


def _expert(base: nn.Module) -> bool:
    return bool(getattr(base, "explicit_expert_comm", False))


def enter(base: nn.Module, shard: BaseShard, x: torch.Tensor) -> torch.Tensor:
    """The input every local product of the layer reads (base and adapters alike)."""
    group = shard.tp_group
    if shard.kind == "column":
        if _expert(base):
            return x
        if shard.sequence_parallel:
            return gather_first_dim(x, group)
        return x if getattr(base, "disable_grad_reduce", False) else copy_to_group(x, group)
    return x if shard.input_is_parallel else split_last_dim(x, group)


def local_weight(base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's weight shard [out_local, in_local] (dequantised for a 4-bit base)."""
    if weight is not None:
        return weight
    if isinstance(base, QuantizedLinear):
        return base.dequantized_weight()
    return base.weight


def local_linear(base: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x W_i^T`` [.., out_local]: a fresh tensor, no bias, no communication."""
    if isinstance(base, QuantizedLinear):
        if weight is not None:
            raise ValueError(f"a 4-bit {base.base_type} cannot take an external weight (tied output layers "
                             f"are not quantised)")
        return base.local_linear(x)
    return megatron_local_linear(base, x, base.weight if weight is None else weight)


def leave(base: nn.Module, shard: BaseShard, y: torch.Tensor, gather_output: bool) -> torch.Tensor:
    """The layer's output collective on the local result (see module docstring)."""
    group = shard.tp_group
    if shard.kind == "column":
        return gather_last_dim(y, group) if gather_output else y
    if _expert(base):
        return y
    return reduce_scatter_first_dim(y, group) if shard.sequence_parallel else reduce_from_group(y, group)


def finish(base: nn.Module, shard: BaseShard, y: torch.Tensor, gather_output: bool = False):
    """Bias, output collective and Megatron's ``(output, bias)`` return value."""
    bias = getattr(base, "bias", None)
    skip = bool(getattr(base, "skip_bias_add", False))
    if shard.kind == "column":
        if bias is not None and not skip:
            y = y + bias
        y = leave(base, shard, y, gather_output)
    else:
        y = leave(base, shard, y, gather_output)
        if bias is not None and not skip:
            y = y + bias
    return y, (bias if skip else None)

"""``QuantizedLinear``: a frozen 4-bit (nf4 / fp4) base for a column-parallel, row-parallel or
plain linear layer, as QLoRA uses it (https://arxiv.org/abs/2305.14314).

Each rank quantises **its own shard** of the weight (column: [out/p, in], row: [out, in/p],
plain: [out, in]) with bitsandbytes, blockwise along rows. When the shard's rows are whole
blocks, the blocks (and their absmax) are exactly those of the unsharded weight, so the sharded
model computes with the same dequantised weight as a single device would.

Storage: ``weight_packed`` uint8 [out_local * in_local / 2, 1] and ``weight_absmax`` float32
[out_local * in_local / blocksize] are frozen *buffers*; the bias stays the original (trainable
or frozen) ``Parameter``. Under DeepSpeed ZeRO-3, :meth:`QuantizedLinear.partitionable` turns
``weight_packed`` into a frozen uint8 ``Parameter``: ZeRO-3 then keeps 1/world of it per rank
and gathers it for this layer's forward and backward, as it does a float weight (DeepSpeed
casts only floating-point parameters to its compute dtype, so the bytes stay bytes). The
absmax (1/64 of the packed size at blocksize 64) stays a float32 buffer on every rank.

Compute: ``y = x W^T`` with W dequantised on the fly in the compute dtype (the dtype of the
weight it replaced). Nothing float-sized is saved for backward: the input gradient
``dL/dx = dL/dy W`` dequantises again. The collectives are Megatron's (same order, same
semantics, so outputs are bit-compatible with the float layer fed the dequantised weight):

* column: input ``copy_to_group`` (SP: ``gather_first_dim``), local matmul, output split on
  ``out``; returns ``(y, bias)`` with ``skip_bias_add`` else ``(y + bias, None)``.
* row: input split on ``in`` (``split_last_dim`` unless ``input_is_parallel``), local matmul,
  ``reduce_from_group`` (SP: ``reduce_scatter_first_dim``), then the bias.
* plain ``nn.Linear``: ``x W^T + b``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.integrations.bitsandbytes import dequantize_4bit, quantize_4bit
from dist_lora.layers.sharding import BaseShard
from dist_lora.parallel.collectives import (
    copy_to_group,
    gather_first_dim,
    reduce_from_group,
    reduce_scatter_first_dim,
    split_last_dim,
)


class _Linear4bit(torch.autograd.Function):
    """``x W^T`` with a frozen 4-bit W: backward re-dequantises instead of saving W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class QuantizedLinear(nn.Module):
    """4-bit stand-in for the base layer ``base`` described by ``shard`` (see module docstring)."""

    quantized = True
    keeps_bias_gradient = True  # the bias gets its gradient here (unlike Megatron's frozen path)

    def __init__(self, base: nn.Module, shard: BaseShard, quant_type: str = "nf4", blocksize: int = 64):
        super().__init__()
        weight = base.weight
        q = quantize_4bit(weight, quant_type, blocksize, feature=f"4-bit base of a {type(base).__name__}")
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        self.weight_shape, self.compute_dtype = q.shape, q.dtype
        self.quant_type, self.blocksize = quant_type, blocksize
        self.bias = base.bias if isinstance(getattr(base, "bias", None), nn.Parameter) else None
        self.shard = shard  # how the replaced layer was sharded (adapters added later use it)
        self.kind, self.megatron = shard.kind, shard.megatron
        self.tp_group, self.sequence_parallel = shard.tp_group, shard.sequence_parallel
        self.input_is_parallel = shard.input_is_parallel
        self.skip_bias_add = bool(getattr(base, "skip_bias_add", False))
        self.in_features, self.out_features = shard.in_features, shard.out_features
        self.base_type = type(base).__name__

    def partitionable(self) -> nn.Parameter:
        """Make ``weight_packed`` a frozen ``Parameter`` (same tensor, ``requires_grad=False``)
        so that ZeRO-3 partitions it; returns it. Idempotent."""
        packed = self.weight_packed
        if not isinstance(packed, nn.Parameter):
            del self._buffers["weight_packed"]
            self.weight_packed = nn.Parameter(packed, requires_grad=False)
        return self.weight_packed

    def dequantized_weight(self) -> torch.Tensor:
        """This rank's weight shard [out_local, in_local], dequantised to the compute dtype."""
        return dequantize_4bit(self.weight_packed, self.weight_absmax, self.weight_shape, self.compute_dtype,
                               self.quant_type, self.blocksize)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dequantised shard (DoRA norms, inspection). Writing to it changes nothing."""
        return self.dequantized_weight()

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_i^T`` on this rank's shard, no bias, no communication (the adapter wrapper runs
        the collectives, :mod:`dist_lora.layers.base_path`)."""
        return _Linear4bit.apply(x, self)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        if weight is not None:
            raise ValueError(f"a 4-bit {self.base_type} cannot take an external weight (tied output layers "
                             f"are not quantised)")
        if runtime_gather_output:
            raise ValueError("a 4-bit column-parallel layer does not gather its output")
        if not self.megatron:
            y = _Linear4bit.apply(x, self)
            return y + self.bias if self.bias is not None else y
        group = self.tp_group
        if self.kind == "column":
            x = gather_first_dim(x, group) if self.sequence_parallel else copy_to_group(x, group)
            y = _Linear4bit.apply(x, self)
        else:
            if not self.input_is_parallel:
                x = split_last_dim(x, group)
            partial = _Linear4bit.apply(x, self)
            y = reduce_scatter_first_dim(partial, group) if self.sequence_parallel else reduce_from_group(partial, group)
        if self.bias is None or self.skip_bias_add:
            return y, self.bias
        return y + self.bias, None

    def extra_repr(self) -> str:
        return (f"{self.base_type}, {self.kind}, shard {tuple(self.weight_shape)}, {self.quant_type}, "
                f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}")

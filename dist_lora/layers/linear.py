"""LoRA / rsLoRA / DoRA on linear layers: Megatron ``ColumnParallelLinear``,
``RowParallelLinear``, and plain ``torch.nn.Linear`` (a column layer with TP = 1).

LoRA: ``y = W x + s * B A x`` (https://arxiv.org/abs/2106.09685), ``s = alpha / r`` or
``alpha / sqrt(r)`` (rsLoRA). Shapes: x [s, b, in] (Megatron) or [..., in]; W [out, in].

**Column-parallel** (W split on ``out``: rank i holds W_i [out/p, in]). ``A`` [r, in] is
replicated, ``B_i`` [out/p, r] split like W (GLU ``linear_fc1`` with stride 2).

* without SP, x is replicated: ``h = copy_to_group(x A^T)`` — identity forward; backward
  all-reduces dL/dh, whose rank-i part comes only from that rank's outputs. So A's gradient is
  complete and identical on every rank, and x receives the full adapter gradient.
* with SP, x is [s/p, b, in]: ``h = gather_first_dim(x copy_to_group(A)^T)`` — the all-gather of
  the narrow [s/p, b, r] product replaces a gather of x; its backward reduce-scatters dL/dh,
  and ``copy_to_group`` sums A's gradient over the sequence shards.
* ``y_i += s * h B_i^T`` [s, b, out/p]. Per-projection adapters on fused q/k/v or gate/up add
  their [.., rows] into their rows of the fused output (``Slot.place``). The hiddens of all live
  adapters of a layer travel in one collective (concatenated along r).

**Row-parallel** (W split on ``in``: W_i [out, in/p], input x_i [s, b, in/p]). ``A_i`` [r, in/p]
is split like W, ``B`` [out, r] replicated.

* ``h = reduce_from_group(x_i A_i^T)`` (all-reduce of [s, b, r]), or with SP
  ``reduce_scatter_first_dim`` to [s/p, b, r] matching the base's reduce-scattered output.
* ``y += s * h copy_to_group(B)^T`` under SP (B's gradient is a sum over sequence shards),
  ``h B^T`` otherwise. The extra collective moves r/out of the base's reduction.

**DoRA** adds ``(m/||W + sBA|| - 1) * (W x) + m/||W + sBA|| * s B A x``: the norm is local on
column layers and all-reduced on row layers (:mod:`dist_lora.layers.dora`); the magnitude m is
split like B on column layers and replicated (``copy_to_group`` under SP) on row layers.

**Merge** folds ``s * B_i A`` (column) or ``s * B A_i`` (row) into the local shard: no gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.dora import dora_output, row_norm
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel.collectives import (
    copy_to_group,
    gather_first_dim,
    reduce_from_group,
    reduce_scatter_first_dim,
    split_last_dim,
)


class LoraLinear(AdapterLayer):
    """Adapters on a column-parallel, row-parallel or plain linear layer (see module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        live = list(self.live())
        base_bias = self._bias_in_output()
        trained_bias = self._bias_without_gradient(base_bias)
        if not live and trained_bias is None:
            return out
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        if trained_bias is not None:
            y = y + (trained_bias - trained_bias.detach())  # adds 0; routes dL/dy to the bias
        if not live:
            return (y, *rest) if rest is not None else y
        all_factors = [factors for _, factors in live]
        inputs = [factors.dropout(x.to(factors.lora_A.dtype)) for factors in all_factors]
        delta = None
        for factors, x_in, h in zip(all_factors, inputs, self._hiddens(inputs, all_factors)):
            d = factors.slot.place(self._slot_delta(x_in, h, y, base_bias, factors), y.shape[-1])
            delta = d if delta is None else delta + d
        y = y + delta.to(y.dtype)
        return (y, *rest) if rest is not None else y

    # -- forward pieces ------------------------------------------------------------------

    def _bias_in_output(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or getattr(self.base_layer, "skip_bias_add", False):
            return None
        return bias

    def _bias_without_gradient(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """A trainable bias that Megatron's frozen-weight path would leave without gradient.

        megatron-core's ``LinearWithFrozenWeight`` (used whenever the weight is frozen) adds the
        bias inside an autograd function whose backward returns no bias gradient, so
        ``bias="all"`` / ``"lora_only"`` would silently train nothing on column layers.
        """
        if (base_bias is None or not base_bias.requires_grad or not self.shard.megatron
                or self.shard.kind != "column" or getattr(self.base_layer, "keeps_bias_gradient", False)
                or self.base_layer.weight.requires_grad):
            return None
        return base_bias

    def _hiddens(self, inputs: list[torch.Tensor], all_factors: list[LoraFactors]) -> list[torch.Tensor]:
        """``A x`` of every live adapter slot, complete over TP, with ONE collective for all of
        them: the narrow [.., r_i] products are concatenated, moved together, and split again
        (q, k, v and gate, up adapters on a fused layer cost one collective, not five)."""
        shard, group = self.shard, self.shard.tp_group
        if shard.kind == "column":
            weights = [copy_to_group(f.lora_A, group) if shard.sequence_parallel else f.lora_A for f in all_factors]
            partial = torch.cat([F.linear(x, a) for x, a in zip(inputs, weights)], dim=-1)
            full = gather_first_dim(partial, group) if shard.sequence_parallel else copy_to_group(partial, group)
        else:
            if not shard.input_is_parallel:
                inputs = [split_last_dim(x, group) for x in inputs]
            partial = torch.cat([F.linear(x, f.lora_A) for x, f in zip(inputs, all_factors)], dim=-1)
            full = reduce_scatter_first_dim(partial, group) if shard.sequence_parallel else reduce_from_group(partial, group)
        return list(full.split([f.capacity for f in all_factors], dim=-1))  # capacity >= r (hotswap padding)

    def _replicated(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Row-layer replicated tensors whose gradient is a sum over sequence shards under SP."""
        if tensor is None or self.shard.kind != "row" or not self.shard.sequence_parallel:
            return tensor
        return copy_to_group(tensor, self.shard.tp_group)

    def _slot_delta(self, x, h, y, base_bias, factors: LoraFactors) -> torch.Tensor:
        """This slot's output delta [.., rows]; ``x`` is its (dropped-out) input, ``h`` its ``A x``."""
        h = factors.scale_hidden(h, self.shard)
        lora_out = F.linear(h, self._replicated(factors.lora_B), self._replicated(factors.lora_bias))
        lora_out = lora_out * factors.scaling
        if factors.lora_magnitude_vector is None:
            return lora_out
        base_out = self._dora_base_output(x, y, base_bias, factors)
        norm = row_norm(self._read_rows(factors.slot), factors.delta_weight().detach(), self.shard)
        return dora_output(base_out, lora_out, self._replicated(factors.lora_magnitude_vector), norm)

    def _dora_base_output(self, x, y, base_bias, factors: LoraFactors) -> torch.Tensor:
        """``W x`` without bias for this slot; ``x`` is the (dropped-out) adapter input, used
        instead of the base output when dropout is active, as PEFT does."""
        slot = factors.slot
        if not self.training or isinstance(factors.dropout, torch.nn.Identity):
            base = slot.select(y)
            return base - slot.select(base_bias) if base_bias is not None else base
        shard, group = self.shard, self.shard.tp_group
        weight = self._read_rows(slot)
        if shard.kind == "column":
            # W_i x is this rank's rows only, so x's gradient from it is partial: copy_to_group
            # all-reduces it (the gather's backward reduce-scatters it under SP).
            x = gather_first_dim(x, group) if shard.sequence_parallel else copy_to_group(x, group)
            return F.linear(x, weight)
        if not shard.input_is_parallel:
            x = split_last_dim(x, group)
        partial = F.linear(x, weight)
        return reduce_scatter_first_dim(partial, group) if shard.sequence_parallel else reduce_from_group(partial, group)

    # -- merge ---------------------------------------------------------------------------

    @torch.no_grad()
    def merge_candidates(self, adapter: str):
        out = []
        for factors in self.lora[adapter].values():
            rows = self._read_rows(factors.slot)
            delta = factors.delta_weight()
            merged, norm = rows + delta, None
            if factors.lora_magnitude_vector is not None:
                norm = row_norm(rows, delta, self.shard)
                merged = (factors.lora_magnitude_vector / norm).unsqueeze(1) * merged
            out.append((factors, merged, norm))
        return out

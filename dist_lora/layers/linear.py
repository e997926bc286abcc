"""LoRA / rsLoRA / DoRA on linear layers: Megatron ``ColumnParallelLinear``,
``RowParallelLinear``, and plain ``torch.nn.Linear`` (a column layer with TP = 1).

LoRA: ``y = W x + s * B A x`` (https://arxiv.org/abs/2106.09685), ``s = alpha / r`` or
``alpha / sqrt(r)`` (rsLoRA). Shapes: x [s, b, in] (Megatron) or [..., in]; W [out, in].

The adapter adds **no collective** to the base layer's: on a Megatron base the wrapper runs the
base's own steps (:mod:`dist_lora.layers.base_path`) and puts the adapter inside them.

**Column-parallel** (W split on ``out``: rank i holds W_i [out/p, in]). ``A`` [r, in] is
replicated, ``B_i`` [out/p, r] split like W (GLU ``linear_fc1`` with stride 2). The adapter reads
the base's input after its collective (``copy_to_group`` x, or the SP all-gather to
[s, b, in]) and adds ``(s x A^T) B_i^T`` [s, b, out/p] into this rank's rows of the base output,
so the input gradient of base and adapter is reduced by the base's one all-reduce (SP:
reduce-scatter). ``dL/dA = (s dL/dy_i B_i)^T x`` is then a partial sum over the TP ranks, summed
once per step by ``finalize_grads``.

**Row-parallel** (W split on ``in``: W_i [out, in/p], input x_i [s, b, in/p]). ``A_i`` [r, in/p]
is split like W, ``B`` [out, r] replicated. Everything is linear, so the adapter's partial
product joins the base's partial sum before its reduction:
``y = reduce(x_i W_i^T + (s x_i A_i^T) B^T)`` (all-reduce; SP: reduce-scatter to [s/p, b, out]).
The gradients of ``B`` (and of DoRA's magnitude, and of ``lora_bias``, which enters TP rank 0's
partial only) are partial sums over TP, summed once per step by ``finalize_grads``.

**Fused layers** (``linear_qkv``, GLU ``linear_fc1``): per-projection adapters write into their
block of the fused output in place (:mod:`dist_lora.layers.placement`); adapters that read the
same input (all of them unless each has its own dropout) compute their hiddens with one matmul
of the concatenated A's; the scaling is applied on the narrow [.., r] hidden.

**DoRA** ``y = b + (m / ||W + sBA||) * (W x + s B A x)``: the norm (:mod:`dist_lora.layers.dora`:
local on column layers, one all-reduce of an [out] vector on row layers, computed once per
optimizer step under ``forward_backward``) scales the slot's base output plus adapter output in
place; with dropout active PEFT's ``(m/n - 1) W dropout(x) + (m/n) s B A dropout(x)`` is added.

**Dropout** masks are equal on every rank where the adapter's input is replicated (column
layers read the base's input after its collective) and independent where it is split over
features (row layers): :mod:`dist_lora.layers.dropout`.

**Merge** folds ``s * B_i A`` (column) or ``s * B A_i`` (row) into the local shard: no gather.

Plain ``nn.Linear`` bases (TP = 1, e.g. a Hugging Face model under DeepSpeed ZeRO) are called
as modules (ZeRO-3 gathers their weight for their forward) and the adapters are added to their
output, bias included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.layers import base_path
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.bias import add_trained_biases
from dist_lora.layers.dora import dora_scale, norm_now, weight_norm
from dist_lora.layers.dropout import dropped_inputs
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.placement import Entry, into_slots
from dist_lora.layers.quantized import QuantizedLinear


class LoraLinear(AdapterLayer):
    """Adapters on a column-parallel, row-parallel or plain linear layer (see module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        live = [factors for _, factors in self.live()]
        if not self.shard.megatron:
            y = self.base_layer(x, *args, **kwargs)
            y = self._adapt(y, x, live, getattr(self.base_layer, "bias", None)) if live else y
            return add_trained_biases(y, self, live)  # bias="lora_only": the slots' own rows
        bias = getattr(self.base_layer, "bias", None)
        if not live and (bias is None or not bias.requires_grad):
            return self.base_layer(x, *args, **kwargs)
        return self._megatron_forward(x, live, *args, **kwargs)

    def _megatron_forward(self, x, live, weight=None, runtime_gather_output=None):
        base, shard = self.base_layer, self.shard
        gather = getattr(base, "gather_output", False) if runtime_gather_output is None else runtime_gather_output
        x_in = base_path.enter(base, shard, x)
        y = base_path.local_linear(base, x_in, weight)
        if live:
            y = self._adapt(y, x_in, live, None, weight)
        y, bias = base_path.finish(base, shard, y, gather)
        return add_trained_biases(y, self, live), bias  # bias="lora_only": the slots' own rows

    # -- the adapters inside the base's computation --------------------------------------

    def _adapter_inputs(self, x: torch.Tensor, live: list[LoraFactors]) -> list[torch.Tensor]:
        """Each slot's adapter input: ``x`` cast to the adapter's dtype (once per dtype), then the
        slot's dropout, drawn from the stream :mod:`dist_lora.layers.dropout` names. The one place
        where a slot's input is cast and dropped out."""
        return dropped_inputs(x, live, self.shard)

    def _hiddens(self, inputs: list[torch.Tensor], live: list[LoraFactors]) -> list[torch.Tensor]:
        """``x A^T`` [.., r] of every live slot (local; a partial sum on row layers). Slots that
        read the same input tensor share one matmul of their concatenated A's."""
        shared: dict[int, list[int]] = {}
        for i, inp in enumerate(inputs):
            shared.setdefault(id(inp), []).append(i)
        hiddens: list[torch.Tensor | None] = [None] * len(live)
        for members in shared.values():
            a = [live[i].lora_A for i in members]
            h = F.linear(inputs[members[0]], a[0] if len(a) == 1 else torch.cat(a))
            for i, part in zip(members, [h] if len(a) == 1 else h.split([t.shape[0] for t in a], dim=-1)):
                hiddens[i] = part
        return hiddens

    def _adapt(self, y, x, live, bias_in_y, weight=None):
        """``y`` (the fresh local base output, or a row layer's partial sum) with every live
        slot's adapter added in place; ``x`` is the input the base read, ``bias_in_y`` the bias
        a plain base already added (DoRA does not scale it)."""
        inputs = self._adapter_inputs(x, live)
        # A row layer's replicated bias joins TP rank 0's partial sum only (the others add it times
        # zero, so that every rank has its partial gradient for finalize_grads to sum).
        bias_factor = 1.0 if self.shard.kind != "row" or self.shard.rank == 0 else 0.0
        entries = []
        for factors, x_f, h in zip(live, inputs, self._hiddens(inputs, live)):
            slot = factors.slot
            h, alpha = factors.scale_hidden(h)  # the scaling rides on the matmul (alpha), never at full width
            bias = None if factors.lora_bias is None else factors.lora_bias * (factors.scaling * bias_factor)
            entry = Entry(slot, h=h, lora_b=factors.lora_B, alpha=alpha, bias=bias)
            if factors.lora_magnitude_vector is None:
                entries.append(entry)
                continue
            scale = dora_scale(factors.lora_magnitude_vector, weight_norm(self, factors, weight))
            if self.training and not isinstance(factors.dropout, nn.Identity):
                # PEFT: with dropout the DoRA term reads W dropout(x), not the base output.
                base_out = self._slot_base_output(x_f, slot, weight)
                lora_out = F.linear(h, factors.lora_B) * alpha
                lora_out = lora_out if bias is None else lora_out + bias
                scale_rows = scale.to(base_out.dtype)
                entries.append(Entry(slot, delta=(scale_rows - 1) * base_out + scale_rows * lora_out))
            elif bias_in_y is not None:  # a plain base's output holds its bias, which DoRA leaves out
                slot_bias = bias_in_y if slot.block is None else slot.select(bias_in_y)
                entry.bias = -slot_bias if bias is None else bias - slot_bias
                entry.scale = scale
                entries += [entry, Entry(slot, delta=slot_bias)]
            else:
                entry.scale = scale
                entries.append(entry)
        return into_slots(y, entries)

    def _slot_base_output(self, x: torch.Tensor, slot, weight=None) -> torch.Tensor:
        """``x W_slot^T`` without bias (local; a partial sum on row layers)."""
        rows, _ = self._norm_weight(slot, weight)
        if rows.dim() == 3:
            rows = rows.reshape(-1, rows.shape[-1])
        return F.linear(x, rows.to(x.dtype))

    def _norm_weight(self, slot, weight=None):
        base = self.base_layer
        if weight is not None or isinstance(base, QuantizedLinear):
            full = base_path.local_weight(base, weight)
        else:
            full = self.base_weight()
        stored = getattr(base, "weight_packed", None)
        return slot.weight_view(full), (full if stored is None else stored)

    def norm_inputs(self, factors: LoraFactors, weight: torch.Tensor | None = None):
        """(the slot's local weight rows [rows, in_local] or [groups, width, in_local], the tensors
        whose change invalidates its DoRA norm)."""
        rows, stored = self._norm_weight(factors.slot, weight)
        return rows, (stored, factors.lora_A, factors.lora_B)

    def held_norm_slots(self) -> list[LoraFactors]:
        """Live DoRA slots whose norm can be computed ahead of the forward (not a tied output layer,
        whose weight arrives with the call)."""
        if getattr(self.base_layer, "weight", None) is None:
            return []
        return [factors for factors in (f for _, f in self.live()) if factors.lora_magnitude_vector is not None]

    # -- merge ---------------------------------------------------------------------------

    @torch.no_grad()
    def merge_candidates(self, adapter: str):
        out = []
        for factors in self.lora[adapter].values():
            rows = self._read_rows(factors.slot)
            delta = factors.delta_weight()
            merged, norm = rows + delta, None
            if factors.lora_magnitude_vector is not None:
                norm = norm_now(self, factors)
                merged = (factors.lora_magnitude_vector / norm).unsqueeze(1) * merged
            out.append((factors, merged, norm))
        return out

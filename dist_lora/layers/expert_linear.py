"""LoRA on a routed expert's linear layers (Megatron-Core ``SequentialMLP`` experts).

Each expert ``e`` is an MLP with its own adapters, as in PEFT's ``target_parameters`` on the
fused expert tensors (https://arxiv.org/abs/2106.09685; PEFT packs the experts' factors side
by side, see :mod:`dist_lora.checkpoint.expert_keys`): ``y_e = x W_e^T + s (x A_e^T) B_e^T``.
The expert lives on one expert-parallel (EP) rank, so its factors do too; over its
expert-tensor-parallel (ETP) group it is split like a dense layer over TP, and its factors
with it. Unlike a dense layer, an expert's base layer never communicates: the MoE token
dispatcher all-gathers the expert's tokens over ETP before ``linear_fc1`` (every ETP rank sees
the same tokens) and reduce-scatters the partial outputs of ``linear_fc2`` after it (summing
over ETP, and its backward all-gathers the output gradient). The adapter must therefore not
communicate activations either; its replicated factor's gradient is a partial sum instead:

**linear_fc1** (``W_i`` [2f/p, h] = ``[gate_i; up_i]``): ``A_e`` [r, h] replicated over ETP,
``B_e`` [2f/p, r] split like W (stride 2). ``h = x A^T`` is complete on every ETP rank;
``dL/dh`` from rank ``i`` covers only its output rows, so A's gradient is summed over ETP
(``copy_to_group`` on A: identity forward, all-reduce of dA [r, h] backward). The input
gradient stays partial, as the base's does; the dispatcher's reduce-scatter sums it.

**linear_fc2** (``W_i`` [h, f/p]): ``A_e`` [r, f/p] split like W, ``B_e`` [h, r] replicated.
``(x_i A_i^T) B^T`` is a partial output that joins the base's partial output in the
dispatcher's reduce-scatter: no extra collective forward. ``dL/dy`` is complete on every ETP
rank, so B's gradient ``dy^T (x_i A_i^T)`` is partial and summed over ETP (``copy_to_group`` on
B, all-reduce of dB [h, r]).

With ETP = 1 nothing communicates. The gradients are then complete for this rank's tokens; the
expert's replicas (its expert-data-parallel group, not the dense DP group) sum them and divide by
the dense DP size (:func:`dist_lora.models.training.finalize_grads`), as Megatron-Core does for
expert weights. Merge folds ``s B_i A`` (fc1) or ``s B A_i`` (fc2) into the local shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel.collectives import copy_to_group


class ExpertLoraLinear(AdapterLayer):
    """Adapters on one routed expert's ``linear_fc1`` (column) or ``linear_fc2`` (row) layer."""

    expert: int | None = None  # the expert's global index (set when the wrapper is made)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        live = [factors for _, factors in self.live()]
        if not live:
            return out
        y, rest = out
        delta = None
        for factors in live:
            d = self._delta(x.to(factors.lora_A.dtype), factors)
            delta = d if delta is None else delta + d
        return y + delta.to(y.dtype), rest

    def _delta(self, x: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
        """``s (x A^T) B^T`` [tokens, out_local]; the replicated factor's gradient summed over ETP."""
        group = self.shard.tp_group
        lora_a, lora_b = factors.lora_A, factors.lora_B
        if self.shard.kind == "column":
            lora_a = copy_to_group(lora_a, group)
        else:
            lora_b = copy_to_group(lora_b, group)
        return F.linear(F.linear(x, lora_a), lora_b) * factors.scaling

    def tp_partial_gradients(self) -> list:
        """None: the replicated factor's gradient is summed over ETP in backward (``copy_to_group``
        above), and ``self.shard.tp_group`` is the ETP group, not the dense TP group that
        ``finalize_grads`` sums dense partial gradients over."""
        return []

    @torch.no_grad()
    def merge_candidates(self, adapter: str):
        return [(factors, self._read_rows(factors.slot) + factors.delta_weight(), None)
                for factors in self.lora[adapter].values()]

"""``SVDFactors``: AdaLoRA's singular-value form of one adapter on one slot (local shards).

``delta W = scaling * P diag(Lambda) Q`` with PEFT's names and global shapes:

============  ===============  =========================================================
tensor        global shape     sharded like
============  ===============  =========================================================
``lora_A``    Q [init_r, in]   LoRA A: replicated (column layers), split on in (row layers)
``lora_E``    Lambda [r, 1]    replicated on every TP rank
``lora_B``    P [out, init_r]  LoRA B: split on out (column layers), replicated (row layers)
============  ===============  =========================================================

``scaling = lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``, fixed as in PEFT. The
forward computes ``h = (x Q^T) * Lambda^T`` on the narrow hidden, then ``y += scaling * h P^T``
(:class:`dist_lora.layers.linear.LoraLinear`). Lambda is replicated and its gradient is a partial
sum over TP on both layer kinds (column: each rank sees only its output rows; row: each rank's
hidden is the partial ``x_i Q_i^T``), summed once per step by ``finalize_grads`` like LoRA's
replicated factors.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.sharding import REPLICATED, BaseShard, FactorLayout
from dist_lora.layers.slots import Slot


class SVDFactors(LoraFactors):
    """P, Lambda, Q of one AdaLoRA adapter slot; ``r`` is ``init_r`` (triplets, pruned by masking)."""

    key_kind = "svd"

    def __init__(self, shard: BaseShard, slot: Slot, r: int, alpha: float, scaling: float, dropout: float,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(shard, slot, r, alpha, scaling, dropout, lora_bias=False, use_dora=False, dtype=dtype,
                         device=device)
        self.ranknum = float(r)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=device))

    def layouts(self) -> dict[str, FactorLayout]:
        return {**super().layouts(), "lora_E": REPLICATED}

    def global_shapes(self, shard: BaseShard) -> dict[str, tuple[int, ...]]:
        return {**super().global_shapes(shard), "lora_E": (self.r, 1)}

    def scale_hidden(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(h * Lambda^T, scaling)`` for the hidden ``h = x Q^T`` [.., r] (see module docstring)."""
        return h * self.lora_E.view(-1).to(h.dtype), self.scaling

    def tp_partial_gradients(self, shard: BaseShard) -> list[nn.Parameter]:
        return super().tp_partial_gradients(shard) + ([self.lora_E] if shard.tp > 1 else [])

    def delta_weight(self) -> torch.Tensor:
        """``scaling * P (Q * Lambda)`` on this rank's shard: [rows_local, in_local] (no collective)."""
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E))

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        """Zero Lambda where ``keep`` [r] (bool) is False, as PEFT's ``masked_fill_`` does."""
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

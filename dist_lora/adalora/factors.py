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
forward computes ``h = (x Q^T) * Lambda^T`` after the layer's hidden collective, then
``y += scaling * h P^T`` (:class:`dist_lora.layers.linear.LoraLinear`). Lambda's gradient is a
partial sum over TP on column layers (each rank sees only its output rows) and over sequence
shards on row layers under SP, so it enters through ``copy_to_group`` there (identity forward,
all-reduce backward); on row layers without SP it is complete on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.sharding import REPLICATED, BaseShard, FactorLayout
from dist_lora.layers.slots import Slot
from dist_lora.parallel.collectives import copy_to_group


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

    def scale_hidden(self, h: torch.Tensor, shard: BaseShard) -> torch.Tensor:
        """``h * Lambda^T`` for the complete hidden ``h = x Q^T`` [.., r] (see module docstring)."""
        e = self.lora_E
        if shard.tp > 1 and (shard.kind == "column" or shard.sequence_parallel):
            e = copy_to_group(e, shard.tp_group)
        return h * e.view(-1).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * P (Q * Lambda)`` on this rank's shard: [rows_local, in_local] (no collective)."""
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E))

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        """Zero Lambda where ``keep`` [r] (bool) is False, as PEFT's ``masked_fill_`` does."""
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

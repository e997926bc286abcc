"""``Slot``: the part of a base layer's output that one adapter covers.

A plain layer has one slot, ``all``. A fused Megatron layer (``linear_qkv``, GLU ``linear_fc1``)
can carry either one adapter over the whole fused output (slot ``all`` with ``fused`` set to the
layout name, exported as q/k/v or gate/up adapters sharing one A), or per-projection adapters
("canonical", slot key = the HF projection name such as ``q_proj``) that touch only the rows of
that projection on each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_lora.layers.sharding import FactorLayout

WHOLE = "all"


@dataclass(frozen=True)
class Slot:
    key: str
    hf_names: tuple[str, ...]  # HF module names this slot exports to
    out_features: int  # global output rows covered
    b_layout: FactorLayout  # layout of lora_B rows (and magnitude / lora bias)
    rows: torch.Tensor | None = None  # this rank's output rows of the base (None: all)
    fused: str | None = None  # models.layouts name when one adapter spans a fused layer

    def select(self, out: torch.Tensor) -> torch.Tensor:
        """This slot's columns of a base output [..., local_out]."""
        return out if self.rows is None else out.index_select(-1, self.rows_on(out.device))

    def place(self, delta: torch.Tensor, width: int) -> torch.Tensor:
        """``delta`` [..., local_rows] spread into a zero tensor [..., width] at this slot's rows."""
        if self.rows is None:
            return delta
        return delta.new_zeros(*delta.shape[:-1], width).index_add(-1, self.rows_on(delta.device), delta)

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """The row indices on ``device`` (device seam: they are made on the fused weight's device;
        a model moved after its adapters were added gets a copy here)."""
        return self.rows if self.rows.device == device else self.rows.to(device)

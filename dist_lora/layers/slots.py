"""``Slot``: the part of a base layer's output that one adapter covers.

A plain layer has one slot, ``all``. A fused Megatron layer (``linear_qkv``, GLU ``linear_fc1``)
can carry either one adapter over the whole fused output (slot ``all`` with ``fused`` set to the
layout name, exported as q/k/v or gate/up adapters sharing one A), or per-projection adapters
("canonical", slot key = the HF projection name such as ``q_proj``) that touch only the rows of
that projection on each rank.

A projection's local rows form a :class:`Block`: ``groups`` repeats of a ``period`` of rows, of
which the projection holds ``width`` rows from ``offset`` (q of ``linear_qkv`` at TP=p:
``ng/p`` query groups, period ``(nq/ng + 2) * head_dim``, offset 0). So the projection's part of
an output ``[..., local_out]`` is a strided *view* ``[..., groups, width]`` (``Slot.view``): the
forward adds into it in place and its gradient is a view of the output's gradient, with no
index tensors and nothing of the full fused width allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_lora.layers.sharding import FactorLayout

WHOLE = "all"


@dataclass(frozen=True)
class Block:
    """Rows ``g * period + offset + [0, width)`` for ``g < groups`` of a local output."""

    groups: int
    period: int
    offset: int
    width: int

    def rows(self, device: torch.device) -> torch.Tensor:
        """The rows as an index tensor [groups * width] on ``device`` (group-major, the order of
        lora_B's rows)."""
        starts = torch.arange(self.groups, device=device) * self.period + self.offset
        return (starts[:, None] + torch.arange(self.width, device=device)).reshape(-1)

    def view(self, out: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The block of ``out`` along ``dim`` as a strided view [.., groups, width, ..] (no copy)."""
        dim = dim % out.dim()
        grouped = out.unflatten(dim, (self.groups, self.period))
        return grouped.narrow(dim + 1, self.offset, self.width)


@dataclass(frozen=True)
class Slot:
    key: str
    hf_names: tuple[str, ...]  # HF module names this slot exports to
    out_features: int  # global output rows covered
    b_layout: FactorLayout  # layout of lora_B rows (and magnitude / lora bias)
    block: Block | None = None  # this rank's output rows of the base (None: all)
    fused: str | None = None  # models.layouts name when one adapter spans a fused layer

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """This rank's output rows of the base (a block) as an index tensor made on ``device`` (the
        weight or output they index)."""
        return self.block.rows(device)

    def view(self, out: torch.Tensor) -> torch.Tensor:
        """This slot's part of a base output [..., local_out]: ``out`` itself, or a strided view
        [..., groups, width] of its block (writes go to ``out``)."""
        return out if self.block is None else self.block.view(out)

    def select(self, out: torch.Tensor) -> torch.Tensor:
        """This slot's columns of ``out`` [..., local_out] as [..., local_rows] (group-major, the
        order of lora_B's rows; a copy when the slot is a block)."""
        return out if self.block is None else self.block.view(out).flatten(-2)

    def place(self, delta: torch.Tensor, width: int) -> torch.Tensor:
        """``delta`` [..., local_rows] in a zero tensor [..., width] at this slot's rows."""
        if self.block is None:
            return delta
        out = delta.new_zeros(*delta.shape[:-1], width)
        self.block.view(out).copy_(delta.unflatten(-1, (self.block.groups, self.block.width)))
        return out

    def weight_view(self, weight: torch.Tensor) -> torch.Tensor:
        """This slot's rows of a local weight [local_out, in]: ``weight`` or a view [groups, width, in]."""
        return weight if self.block is None else self.block.view(weight, dim=0)

    def grouped(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-row vector of this slot [local_rows] shaped to broadcast against :meth:`view`."""
        return vector if self.block is None else vector.view(self.block.groups, self.block.width)

"""How an adapter tensor is split over the tensor-parallel group, and what a wrapped base shards.

``FactorLayout`` describes one adapter tensor (``lora_A``, ``lora_B``, magnitude, bias): the
dimension it is split on (``None``: replicated), the partition stride (2 for GLU ``linear_fc1``,
whose rank-local rows are ``[gate_i; up_i]``), and vocabulary padding. ``local`` cuts a rank's
shard out of the global tensor and ``gather`` puts the shards back; both are pure tensor code,
the communication happens in :mod:`dist_lora.parallel.collectives`.

``BaseShard`` describes the wrapped base layer: its kind (``column``, ``row``, ``embedding``),
its TP group and rank, global and local sizes, whether it runs sequence parallel, and the
callable convention (Megatron layers return ``(output, bias)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class FactorLayout:
    dim: int | None = None
    stride: int = 1
    size: int | None = None  # real (unpadded) global extent along ``dim``
    padded: int | None = None  # padded global extent along ``dim`` (vocabulary)

    def local(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the (unpadded) global tensor ``full``."""
        if self.dim is None or tp == 1 and self.padded in (None, self.size):
            return full
        if self.padded is not None and self.padded != full.shape[self.dim]:
            pad = list(full.shape)
            pad[self.dim] = self.padded - full.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad)], dim=self.dim)
        chunks = full.chunk(tp * self.stride, dim=self.dim)
        return torch.cat([chunks[rank + k * tp] for k in range(self.stride)], dim=self.dim).contiguous()

    def gather(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The unpadded global tensor from every rank's shard (in rank order)."""
        if self.dim is None:
            return shards[0]
        tp = len(shards)
        pieces = [s.chunk(self.stride, dim=self.dim) for s in shards]
        full = torch.cat([pieces[r][k] for k in range(self.stride) for r in range(tp)], dim=self.dim)
        if self.size is not None and self.size != full.shape[self.dim]:
            full = full.narrow(self.dim, 0, self.size)
        return full.contiguous()


REPLICATED = FactorLayout()


@dataclass(frozen=True)
class BaseShard:
    """What a wrapped base layer shards and how it is called.

    ``kind``: ``column`` (weight [out/p, in], output features split), ``row`` (weight
    [out, in/p], input features split, output reduced), ``embedding`` (weight [V/p, h], vocabulary
    split, output reduced; ``in_features`` is the real vocabulary, ``out_features`` the hidden
    size). Plain ``torch.nn`` layers are ``column`` / ``embedding`` with ``tp=1``.
    """

    kind: str
    tp_group: Any
    tp: int
    rank: int
    in_features: int
    out_features: int
    sequence_parallel: bool = False
    megatron: bool = False  # returns (output, bias)
    input_is_parallel: bool = True  # row layers: input already split on features
    vocab_start: int = 0  # embedding: first vocabulary row of this rank
    padded_vocab: int | None = None  # embedding / output layer: vocabulary padded to a multiple of TP

    @property
    def a_layout(self) -> FactorLayout:
        """``lora_A`` [r, in]: split on ``in`` for row layers, on the vocabulary for embeddings."""
        if self.kind == "row":
            return FactorLayout(dim=1)
        if self.kind == "embedding":
            return FactorLayout(dim=1, size=self.in_features, padded=self.padded_vocab)
        return REPLICATED

"""Task-arithmetic merges of sharded tensors: linear, TIES, DARE, magnitude pruning.

Semantics are PEFT's ``peft.utils.merge_utils`` on the *global* tensors (each task tensor is
one adapter's ``lora_A``, ``lora_B`` or delta weight, all of one global shape); this module
computes them on local shards:

* ``magnitude`` pruning keeps the ``int(density * numel)`` largest |values| of each *global*
  tensor: the threshold is an exact distributed order statistic (:mod:`.order_stats`), the
  mask is then local.
* ``random`` (DARE) pruning keeps each element with probability ``density`` and rescales the
  kept ones by ``1 / density``. The mask of the global tensor is drawn from a generator seeded
  by the caller's names, identically on every rank and replica, and each rank keeps its shard
  of it (block by block, never holding the global mask), so the result does not depend on the
  layout. (PEFT draws with torch's global RNG.)
* the majority sign (``total``: sign of the sum, ``frequency``: sign of the count of signs) and
  the disjoint merge are element-wise, hence shard-local.

``density >= 1`` prunes nothing (as PEFT).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from dist_lora.combine.order_stats import kth_largest_keys, real_part, sortable_key
from dist_lora.layers.sharding import FactorLayout

# name -> (pruning method or None, elect a majority sign and merge disjointly)
MERGES: dict[str, tuple[str | None, bool]] = {
    "linear": (None, False),
    "ties": ("magnitude", True),
    "magnitude_prune": ("magnitude", False),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
}


@dataclass(frozen=True)
class Placement:
    """How one global tensor [shape] is split: its layout over the TP group of size ``tp``."""

    layout: FactorLayout
    shape: tuple[int, ...]
    group: Any
    tp: int
    rank: int

    @property
    def sharded(self) -> bool:
        return self.layout.dim is not None and self.tp > 1


def seeded_generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``names`` (same numbers on every rank and device)."""
    digest = hashlib.sha256("/".join((str(seed),) + names).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


DARE_BLOCK_ROWS = 256  # rows drawn per generator call: part of the mask's definition


def dare_mask(shape: tuple[int, ...], density: float, seed: int, *names: str) -> torch.Tensor:
    """The global DARE keep-mask (float 0/1) of a tensor of ``shape``, named by ``names``: blocks
    of ``DARE_BLOCK_ROWS`` rows drawn in order from one seeded generator, on the CPU (the same
    mask on every device; :func:`prune` moves it)."""
    g = seeded_generator(seed, *names)
    rows, rest = shape[0], tuple(shape[1:])
    blocks = [torch.bernoulli(torch.full((min(DARE_BLOCK_ROWS, rows - r0), *rest), float(density), device="cpu"),
                              generator=g)
              for r0 in range(0, rows, DARE_BLOCK_ROWS)]
    return torch.cat(blocks) if blocks else torch.zeros(shape, device="cpu")


def local_dare_mask(where: Placement, density: float, seed: int, *names: str) -> torch.Tensor:
    """This rank's shard of :func:`dare_mask` (padding zero), holding one row block at a time
    instead of the global mask. Every rank still draws every block (the generator is sequential)."""
    layout, shape = where.layout, where.shape
    if not where.sharded or len(shape) != 2:
        return layout.local(dare_mask(shape, density, seed, *names), where.tp, where.rank)
    along = shape[layout.dim]
    view = (-1, 1) if layout.dim == 0 else (1, -1)
    positions = torch.arange(1, along + 1, device="cpu").view(view)
    index = layout.local(positions, where.tp, where.rank).reshape(-1) - 1  # -1: padding
    local = torch.zeros((index.numel(), shape[1]) if layout.dim == 0 else (shape[0], index.numel()), device="cpu")
    g = seeded_generator(seed, *names)
    for r0 in range(0, shape[0], DARE_BLOCK_ROWS):
        block = torch.bernoulli(torch.full((min(DARE_BLOCK_ROWS, shape[0] - r0), shape[1]), float(density),
                                           device="cpu"), generator=g)
        if layout.dim == 0:
            mine = (index >= r0) & (index < r0 + block.shape[0])
            local[mine] = block[index[mine] - r0]
        else:
            valid = index >= 0
            local[r0:r0 + block.shape[0], valid] = block[:, index[valid]]
    return local


def magnitude_masks(tensors: list[torch.Tensor], where: Placement, density: float) -> list[torch.Tensor]:
    """Boolean keep-masks (local) of the top ``int(density * numel)`` |values| of each global tensor."""
    numel = 1
    for n in where.shape:
        numel *= n
    k = int(density * numel)
    if k == 0:
        return [torch.zeros_like(t, dtype=torch.bool) for t in tensors]
    absolute = [real_part(t.abs(), where.layout, where.tp, where.rank) for t in tensors]
    keys = kth_largest_keys([[(a, where.sharded)] for a in absolute], [k] * len(tensors), where.group)
    return [sortable_key(t.abs()) >= key for t, key in zip(tensors, keys)]


def prune(tensors: list[torch.Tensor], method: str | None, density: float | None, where: Placement,
          seed: int, names: list[tuple[str, ...]]) -> list[torch.Tensor]:
    """Each task tensor pruned by ``method`` (``names[i]`` seeds tensor i's DARE mask)."""
    if method is None or density >= 1:
        return tensors
    if method == "magnitude":
        return [t * m for t, m in zip(tensors, magnitude_masks(tensors, where, density))]
    out = []
    for t, name in zip(tensors, names):
        mask = local_dare_mask(where, density, seed, *name)
        out.append(t * mask.to(device=t.device, dtype=t.dtype) / density)  # the CPU-drawn mask moves to t
    return out


def merge(tensors: list[torch.Tensor], weights: list[float], how: str, density: float | None,
          majority_sign_method: str, where: Placement, seed: int, names: list[tuple[str, ...]]) -> torch.Tensor:
    """PEFT's ``merge_utils.<how>`` of the global task tensors, on this rank's shards."""
    method, elect = MERGES[how]
    stacked = torch.stack(prune(tensors, method, density, where, seed, names))
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if not elect:
        return (stacked * w).sum(0)
    signs = stacked.sign()
    votes = stacked.sum(0) if majority_sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1.0)

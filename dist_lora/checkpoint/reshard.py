"""Which part of a global adapter tensor each TP rank holds, for any TP size (resharding).

A tensor with ``FactorLayout(dim, stride=k)`` is cut along ``dim`` into ``tp * k`` equal chunks
of its padded extent; rank r holds chunks ``r, r + tp, ..., r + (k-1) tp`` back to back. Real
rows end at ``size``; rows past it are vocabulary padding (zeros). ``pieces`` lists, for one
rank, which global ranges sit at which local offsets, so a loader reads exactly the saved
slices that overlap the ranges it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    local_start: int
    global_start: int
    length: int


def padded_extent(size: int, tp: int, stride: int, padded_to_tp: bool) -> int:
    return math.ceil(size / tp) * tp if padded_to_tp else size


def pieces(extent: int, tp: int, rank: int, stride: int) -> list[Piece]:
    """Global ranges of rank ``rank`` along the split dim (``extent`` = padded global size)."""
    if extent % (tp * stride):
        raise ValueError(f"extent {extent} does not split into {tp} x {stride} chunks")
    chunk = extent // (tp * stride)
    return [Piece(j * chunk, (rank + j * tp) * chunk, chunk) for j in range(stride)]


def overlaps(need: Piece, have: Piece) -> tuple[int, int, int] | None:
    """(offset in ``need``'s local range, offset in ``have``'s local range, length) of the overlap."""
    start = max(need.global_start, have.global_start)
    stop = min(need.global_start + need.length, have.global_start + have.length)
    if start >= stop:
        return None
    return (need.local_start + start - need.global_start, have.local_start + start - have.global_start,
            stop - start)

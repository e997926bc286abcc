"""Exact order statistics (k-th largest value, quantiles) of tensors sharded over a group.

A *part* is ``(local, sharded)``: this rank's piece of one global tensor, with padding already
cut off (:func:`real_part`), and whether the pieces are disjoint shards (``True``) or replicas
of the whole tensor (``False``). A query runs over the union of its parts' global elements.

No rank gathers a tensor: the search bisects on the *bit pattern* of the values (an int64 key
with the same order as the floats), and each of its <= 64 rounds all-reduces one count per
query (every query of a call in the same all-reduce). Each rank keeps only the keys still
inside the search interval, so the local work is a few passes over the shard, not one per
round. Replicated parts are counted on group
rank 0 only, so each global element is counted once. The result is exact and the same on every
rank; ties at the threshold are all kept (``torch.topk`` would keep an arbitrary subset of
them, which only matters for exactly repeated values).
"""

from __future__ import annotations

import torch

from dist_lora.layers.sharding import FactorLayout
from dist_lora.parallel import collectives as C
from dist_lora.parallel.device import collective_device

Part = tuple[torch.Tensor, bool]


def real_part(local: torch.Tensor, layout: FactorLayout, tp: int, rank: int) -> torch.Tensor:
    """``local`` without the padding columns / rows a padded layout (vocabulary) adds."""
    if layout.dim is None or layout.padded is None or layout.size is None:
        return local
    chunk = layout.padded // tp
    keep = max(0, min(chunk, layout.size - rank * chunk))
    return local.narrow(layout.dim, 0, keep)


def sortable_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float values of ``x`` (float32 / float64; -0 == +0)."""
    if x.dtype == torch.float64:
        bits = x.contiguous().view(torch.int64)
        magnitude = bits & 0x7FFFFFFFFFFFFFFF
    else:
        bits = x.float().contiguous().view(torch.int32).to(torch.int64)
        magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, bits, -magnitude)


def _device(parts: list[Part], group) -> torch.device:
    """The device of the shards (a rank holding none uses the group's collective device)."""
    return parts[0][0].device if parts else collective_device(group)


def kth_largest_keys(queries: list[list[Part]], ks: list[int], group) -> torch.Tensor:
    """For each query, the largest key ``T`` with ``#{key >= T} >= k`` over its global elements.

    ``k`` is 1-based and must be between 1 and the query's global element count. Returns an
    int64 tensor [len(queries)], identical on every rank of ``group``."""
    n = len(queries)
    first = C.group_rank(group) == 0
    device = _device([part for parts in queries for part in parts], group)
    lo = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    hi = torch.full((n,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    candidates = []  # per query: this rank's counted keys still inside [lo, hi]
    for q, parts in enumerate(queries):
        keys = [sortable_key(local).reshape(-1) for local, _ in parts]
        for k in keys:
            if k.numel():
                lo[q] = torch.minimum(lo[q], k.min())
                hi[q] = torch.maximum(hi[q], k.max())
        counted = [k for k, (_, sharded) in zip(keys, parts) if sharded or first]
        candidates.append(torch.cat(counted) if counted else torch.zeros(0, dtype=torch.int64, device=device))
    C.all_reduce_(lo, group, "min")
    C.all_reduce_(hi, group, "max")
    want = torch.tensor(ks, dtype=torch.int64, device=device)
    above = torch.zeros(n, dtype=torch.int64, device=device)  # this rank's counted keys > hi (dropped)
    while bool((lo < hi).any()):  # lo, hi are identical on every rank: same number of rounds
        # ceil((lo + hi) / 2) without overflowing int64
        mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)
        upper = [c >= mid[q] for q, c in enumerate(candidates)]
        counts = above + torch.stack([u.sum() for u in upper])
        C.all_reduce_(counts, group)
        enough = (counts >= want) & (lo < hi)
        short = (counts < want) & (lo < hi)
        for q in range(n):  # keep only keys that can still decide the answer
            if enough[q]:
                candidates[q] = candidates[q][upper[q]]
            elif short[q]:
                above[q] += upper[q].sum()
                candidates[q] = candidates[q][~upper[q]]
        lo = torch.where(enough, mid, lo)
        hi = torch.where(short, mid - 1, hi)
    return lo


def global_count(parts: list[Part], group) -> int:
    """Number of global elements of one query."""
    first = C.group_rank(group) == 0
    total = torch.tensor([sum(t.numel() for t, sharded in parts if sharded or first)], dtype=torch.int64,
                         device=_device(parts, group))
    return int(C.all_reduce_(total, group).item())


def value_at_key(parts: list[Part], key: torch.Tensor, group) -> torch.Tensor:
    """The global value whose key is ``key`` (the smallest value with key >= ``key``)."""
    best = torch.tensor([float("inf")], dtype=torch.float64, device=_device(parts, group))
    for local, _ in parts:
        chosen = local[sortable_key(local) >= key]
        if chosen.numel():
            best = torch.minimum(best, chosen.min().double().reshape(1))
    return C.all_reduce_(best, group, "min")[0]


def quantile(parts: list[Part], q: float, dtype: torch.dtype, group) -> torch.Tensor:
    """``torch.quantile(cat(global elements), q)`` (linear interpolation), computed from shards."""
    n = global_count(parts, group)
    position = torch.tensor(q, dtype=dtype, device=_device(parts, group)) * (n - 1)
    below = int(position.floor().item())
    above = int(position.ceil().item())
    keys = kth_largest_keys([parts, parts], [n - below, n - above], group)
    low = value_at_key(parts, keys[0], group).to(dtype)
    high = value_at_key(parts, keys[1], group).to(dtype)
    return torch.lerp(low, high, position - below)

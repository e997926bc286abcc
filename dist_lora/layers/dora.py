"""DoRA (weight-decomposed LoRA, https://arxiv.org/abs/2402.09353): the weight norm under TP.

``W' = m * (W + s B A) / ||W + s B A||_row``. The row norm is over input features, and is
computed from the local shards without forming ``W + s B A``:

    ||w_j + s b_j A||^2 = ||w_j||^2 + 2 s b_j . (A w_j) + s^2 b_j (A A^T) b_j^T

(one [rows, in] x [in, r] product and a pass over W, in float32). Column-parallel layers hold
whole rows, so the norm is local; row-parallel layers hold a column slice of every row, so each
term is a partial sum over the TP group and the squared partial norms are all-reduced (an [out]
vector).

As in the paper (section 4.3) and PEFT, the norm is detached: it gets no gradient, so it stays
the same while the weights do. :func:`held_norms` uses that: inside it (one optimizer step's
micro-batches, :func:`dist_lora.models.training.forward_backward`), every norm is computed once,
the row layers' partial squares of the whole stage in a single all-reduce, and the forwards read
them. Outside it each forward computes its norm. A norm is also recomputed inside the block if
the base weight or a factor was written since (their version counters and storage are part of
the key); writes through ``.data`` are not seen by version counters, which is why the cache does
not outlive the block (Megatron's mixed-precision optimizer writes the model's parameters that
way).

The norm is computed and kept in float32 on any base dtype (PEFT computes it in the adapter
dtype). A zero row gets the smallest positive float instead of 0: the vocabulary padding rows of
a TP-split output layer are zero (weight and B), and ``m / 0`` there made every gradient NaN
(their output stays zero and is never read).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from dist_lora.parallel.collectives import all_reduce_

_HELD: list[object] = []  # tokens of the open held_norms blocks (innermost last)


def partial_norm_squares(weight_rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """``||W + s B A||^2`` per row over this rank's input features, float32 [rows].

    ``weight_rows``: the slot's local weight rows [rows, in_local], or a strided view
    [groups, width, in_local] (a per-projection slot of a fused layer); ``lora_a`` [r, in_local];
    ``lora_b`` [rows, r] (group-major rows, like ``weight_rows``)."""
    w = weight_rows.float()
    a, b = lora_a.detach().float(), lora_b.detach().float()
    squares = torch.linalg.vector_norm(w, dim=-1).square().reshape(-1)
    cross = (torch.matmul(w, a.t()).reshape(-1, a.shape[0]) * b).sum(-1)
    quad = ((b @ (a @ a.t())) * b).sum(-1)
    return squares + (2.0 * scaling) * cross + (scaling * scaling) * quad


def _finish(squares: torch.Tensor) -> torch.Tensor:
    """Row norms from their squares, float32, at least the smallest positive float (see module docstring)."""
    return squares.clamp_min(0.0).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


def weight_norm(layer, factors, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The detached ``||W + s B A||_row`` of ``factors``' slot on ``layer``, float32 [rows_local]
    (complete over TP); ``weight``: a weight passed to the layer's call (tied output layer).
    Read from the :func:`held_norms` block when one is open."""
    weight_rows, key_tensors = layer.norm_inputs(factors, weight)
    key = _key(key_tensors)
    cached = getattr(factors, "norm_cache", None)
    if _HELD and cached is not None and cached[0] is _HELD[-1] and cached[1] == key:
        return cached[2]
    squares = partial_norm_squares(weight_rows, factors.lora_A, factors.lora_B, factors.scaling)
    if layer.shard.kind == "row" and layer.shard.tp > 1:
        all_reduce_(squares, layer.shard.tp_group)
    norm = _finish(squares)
    if _HELD:
        factors.norm_cache = (_HELD[-1], key, norm)
    return norm


@contextlib.contextmanager
def held_norms(slots: Sequence[tuple[object, object]]) -> Iterator[None]:
    """Compute the norm of every ``(layer, factors)`` DoRA slot now (the row layers' partial
    squares in one all-reduce per TP group) and let forwards inside the block reuse them.
    Collective over the TP group when a row-parallel slot is listed (every rank of the group
    lists the same slots: they hold the same layers)."""
    token = object()
    _HELD.append(token)
    try:
        with torch.no_grad():
            pending: dict[int, tuple[object, list]] = {}
            for layer, factors in slots:
                weight_rows, key_tensors = layer.norm_inputs(factors)
                squares = partial_norm_squares(weight_rows, factors.lora_A, factors.lora_B, factors.scaling)
                entry = (factors, _key(key_tensors), squares)
                if layer.shard.kind == "row" and layer.shard.tp > 1:
                    pending.setdefault(id(layer.shard.tp_group), (layer.shard.tp_group, []))[1].append(entry)
                else:
                    factors.norm_cache = (token, entry[1], _finish(squares))
            for group, entries in pending.values():
                flat = torch.cat([squares for _, _, squares in entries])
                all_reduce_(flat, group)
                for (factors, key, _), part in zip(entries, flat.split([s.numel() for _, _, s in entries])):
                    factors.norm_cache = (token, key, _finish(part))
        yield
    finally:
        _HELD.remove(token)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``m / ||W + s B A||`` [rows]: the factor DoRA multiplies the slot's output by."""
    return magnitude / norm.to(magnitude.dtype)


@torch.no_grad()
def norm_now(layer, factors) -> torch.Tensor:
    """The norm computed now (no cache; collective over TP for row layers), float32 [rows_local]:
    DoRA's initial magnitude, and the norm frozen at merge time."""
    weight_rows, _ = layer.norm_inputs(factors)
    squares = partial_norm_squares(weight_rows, factors.lora_A, factors.lora_B, factors.scaling)
    if layer.shard.kind == "row" and layer.shard.tp > 1:
        all_reduce_(squares, layer.shard.tp_group)
    return _finish(squares)

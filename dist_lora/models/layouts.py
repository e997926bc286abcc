"""How full Hugging Face tensors become Megatron tensor-parallel shards, and back.

Each layout has two directions:

* ``read_local(reader, names, spec, tp, rank)`` reads *only* the rows / columns that TP rank
  ``rank`` owns (safetensors slicing) and returns that rank's shard;
* ``unshard(shards, spec)`` turns the list of all TP ranks' shards (in rank order) back into the
  full HF tensors, in the order of ``names``.

Shapes (``p`` = TP size, ``d`` = head_dim, ``nq``/``ng`` = query / key-value heads,
``f`` = FFN size, ``V`` = vocabulary, ``V'`` = V padded to a multiple of p):

==============  ================================  =========================================
layout          HF tensors                        shard on rank i
==============  ================================  =========================================
replicated      ``w``                             ``w``
column          ``w`` [out, in]                   rows ``i*out/p : (i+1)*out/p``
row             ``w`` [out, in]                   columns ``i*in/p : (i+1)*in/p``
vocab           ``w`` [V, h]                      rows ``i*V'/p : (i+1)*V'/p``, zero padding
qkv             q [nq*d,.], k [ng*d,.], v [ng*d,.] groups ``i*ng/p ..``, each ``[q_g; k_g; v_g]``
glu             gate [f, h], up [f, h]            ``[gate_i; up_i]``, each ``f/p`` rows
gate_up         ``[gate; up]`` [2f, h]            ``[gate_i; up_i]``, each ``f/p`` rows
==============  ================================  =========================================

A routed expert's tensors are one expert's matrices of the fused [E, ...] HF tensors: read them
through :class:`ExpertSlice`, with ``p`` and ``i`` the expert-tensor-parallel size and rank.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from dist_lora.models.spec import ModelSpec


class SliceReader(Protocol):
    def read(self, name: str, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


class ExpertSlice:
    """Expert ``expert`` of a reader's fused [E, out, in] tensors, seen as [out, in] tensors."""

    def __init__(self, reader, expert: int):
        self.reader, self.expert = reader, expert

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.shape(name)[1:])

    def read(self, name: str, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        return self.reader.read(name, rows, cols, expert=self.expert)


def _span(total: int, parts: int, index: int) -> tuple[int, int]:
    size = total // parts
    return index * size, (index + 1) * size


def _read_replicated(reader, names, spec, tp, rank):
    return reader.read(names[0])


def _unshard_replicated(shards, spec):
    return [shards[0]]


def _read_column(reader, names, spec, tp, rank):
    return reader.read(names[0], rows=_span(reader.shape(names[0])[0], tp, rank))


def _unshard_column(shards, spec):
    return [torch.cat(shards, dim=0)]


def _read_row(reader, names, spec, tp, rank):
    return reader.read(names[0], cols=_span(reader.shape(names[0])[1], tp, rank))


def _unshard_row(shards, spec):
    return [torch.cat(shards, dim=1)]


def _read_vocab(reader, names, spec, tp, rank):
    shape = reader.shape(names[0])
    start, stop = _span(spec.padded_vocab(tp), tp, rank)
    real = reader.read(names[0], rows=(min(start, shape[0]), min(stop, shape[0])))
    if real.shape[0] == stop - start:
        return real
    padded = torch.zeros((stop - start, *shape[1:]), dtype=real.dtype, device=real.device)
    padded[: real.shape[0]] = real
    return padded


def _unshard_vocab(shards, spec):
    return [torch.cat(shards, dim=0)[: spec.vocab_size]]


def _read_qkv(reader, names, spec, tp, rank):
    d, ng = spec.head_dim, spec.num_kv_heads
    per_group = spec.num_heads // ng
    g0, g1 = _span(ng, tp, rank)
    q = reader.read(names[0], rows=(g0 * per_group * d, g1 * per_group * d))
    k = reader.read(names[1], rows=(g0 * d, g1 * d))
    v = reader.read(names[2], rows=(g0 * d, g1 * d))
    rest = q.shape[1:]
    groups = g1 - g0
    fused = torch.cat(
        [q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
        dim=1,
    )
    return fused.reshape(-1, *rest)


def _unshard_qkv(shards, spec):
    d, ng = spec.head_dim, spec.num_kv_heads
    per_group = spec.num_heads // ng
    full = torch.cat(shards, dim=0)
    rest = full.shape[1:]
    grouped = full.reshape(ng, (per_group + 2) * d, *rest)
    q = grouped[:, : per_group * d].reshape(-1, *rest)
    k = grouped[:, per_group * d : (per_group + 1) * d].reshape(-1, *rest)
    v = grouped[:, (per_group + 1) * d :].reshape(-1, *rest)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _read_glu(reader, names, spec, tp, rank):
    rows = _span(reader.shape(names[0])[0], tp, rank)
    return torch.cat([reader.read(names[0], rows=rows), reader.read(names[1], rows=rows)], dim=0)


def _unshard_glu(shards, spec):
    halves = [s.chunk(2, dim=0) for s in shards]
    return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]


def _read_gate_up(reader, names, spec, tp, rank):
    half = reader.shape(names[0])[0] // 2
    start, stop = _span(half, tp, rank)
    gate = reader.read(names[0], rows=(start, stop))
    return torch.cat([gate, reader.read(names[0], rows=(half + start, half + stop))])


def _unshard_gate_up(shards, spec):
    return [torch.cat(_unshard_glu(shards, spec), 0)]


# name -> (read_local, unshard, partition dim of the Megatron tensor or None, partition stride)
LAYOUTS = {
    "replicated": (_read_replicated, _unshard_replicated, None, 1),
    "column": (_read_column, _unshard_column, 0, 1),
    "row": (_read_row, _unshard_row, 1, 1),
    "vocab": (_read_vocab, _unshard_vocab, 0, 1),
    "qkv": (_read_qkv, _unshard_qkv, 0, 1),
    "glu": (_read_glu, _unshard_glu, 0, 2),
    "gate_up": (_read_gate_up, _unshard_gate_up, 0, 2),
}


def read_local(layout: str, reader: SliceReader, names: Sequence[str], spec: ModelSpec,
               tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of the Megatron tensor made of the HF tensors ``names``."""
    return LAYOUTS[layout][0](reader, list(names), spec, tp, rank)


def unshard(layout: str, shards: Sequence[torch.Tensor], spec: ModelSpec) -> list[torch.Tensor]:
    """The full HF tensors (in table order) from every TP rank's shard (in rank order)."""
    return LAYOUTS[layout][1](list(shards), spec)

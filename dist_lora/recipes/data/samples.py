"""Training samples cut from a token cache, and each data-parallel rank's batches.

A sample is ``data.seq_len`` positions: ``input_ids``, ``labels`` (the next token, -100 where
it does not count), and for packed samples ``position_ids`` and a document attention mask.

* :class:`Windows` (``text`` / ``jsonl``): the documents joined into one stream, cut into
  windows of ``seq_len + 1`` tokens (inputs and next-token labels), pre-training style:
  attention crosses document boundaries inside a window, as in Megatron's GPT datasets.
* :class:`Padded` (``chat`` / ``completion``): one document per sample, padded at the end
  (PAD ids, labels -100; causal attention keeps the padding invisible).
* :class:`Packed` (``data.packing: true``): whole documents placed one after another into
  samples (next-fit, in file order), each with positions from 0 and a block-diagonal causal
  mask, so no token attends to another document: the loss equals the padded one's.

A document of ``L`` tokens takes ``L - 1`` positions. One longer than ``seq_len + 1`` tokens
is refused naming its file and line, or cut to its first ``seq_len + 1`` tokens with
``data.truncate: true``.

Only the rows a rank trains on are read from the memory-mapped cache. Step ``k`` of a job with
data-parallel size ``d`` and ``B`` samples per rank uses global samples ``[k*B*d, (k+1)*B*d)``
(cycling), DP rank ``r`` the ``r``-th slice of them, so a resumed job's data position is its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_lora.models.training import IGNORE_INDEX
from dist_lora.recipes.data.cache import TokenFile


@dataclass
class Batch:
    """[b, s] ``input_ids`` / ``labels``; packed rows add ``position_ids`` [b, s] and
    ``attention_mask`` [b, 1, s, s] (True = may not attend)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def as_kwargs(self) -> dict:
        return {"position_ids": self.position_ids, "attention_mask": self.attention_mask}


def _labels(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Next-token labels of ``tokens`` [.., L]: [.., L - 1], -100 where the target does not count."""
    return np.where(mask[..., 1:] != 0, tokens[..., 1:], IGNORE_INDEX)


class Windows:
    """``seq_len + 1``-token windows of the joined documents; ``first`` .. ``first + count``."""

    def __init__(self, cache: TokenFile, seq_len: int, first: int = 0, count: int | None = None):
        self.cache, self.seq_len = cache, seq_len
        available = len(cache.tokens) // (seq_len + 1)
        if available == 0:
            raise ValueError(f"{cache.source} holds {len(cache.tokens)} tokens, fewer than one sample of "
                             f"data.seq_len + 1 = {seq_len + 1}")
        self.first, self.count = first, available - first if count is None else count

    def __len__(self) -> int:
        return self.count

    def rows(self, indices: np.ndarray) -> Batch:
        width = self.seq_len + 1
        windows = [(self.first + int(i)) * width for i in indices]
        tokens = np.stack([self.cache.tokens[w:w + width] for w in windows]).astype(np.int64)
        mask = np.stack([self.cache.mask[w:w + width] for w in windows])
        return Batch(torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(_labels(tokens, mask)))


def _fitting(cache: TokenFile, docs: np.ndarray, seq_len: int, truncate: bool) -> np.ndarray:
    """Positions each document takes (``length - 1``, cut to ``seq_len`` with ``truncate``)."""
    positions = cache.lengths[docs] - 1
    too_long = np.flatnonzero(positions > seq_len)
    if len(too_long) and not truncate:
        first = docs[too_long[0]]
        raise ValueError(f"{cache.source}:{int(cache.lines[first])}: a sample of {int(positions[too_long[0]]) + 1} "
                         f"tokens is longer than data.seq_len + 1 = {seq_len + 1} ({len(too_long)} of {len(docs)} "
                         f"samples are); raise data.seq_len, or set data.truncate: true to keep the first "
                         f"{seq_len + 1} tokens of each")
    return np.minimum(positions, seq_len)


class Padded:
    """One document per sample (``docs``: cache document indices), padded to ``seq_len``."""

    def __init__(self, cache: TokenFile, docs: np.ndarray, seq_len: int, truncate: bool):
        self.cache, self.docs, self.seq_len = cache, np.asarray(docs), seq_len
        self.positions = _fitting(cache, self.docs, seq_len, truncate)

    def __len__(self) -> int:
        return len(self.docs)

    def rows(self, indices: np.ndarray) -> Batch:
        n, pad = len(indices), self.cache.meta["pad"]
        ids = np.full((n, self.seq_len), pad, np.int64)
        labels = np.full((n, self.seq_len), IGNORE_INDEX, np.int64)
        for row, i in enumerate(indices):
            doc, width = self.docs[i], int(self.positions[i])
            start = int(self.cache.offsets[doc])
            tokens = np.asarray(self.cache.tokens[start:start + width + 1], np.int64)
            ids[row, :width] = tokens[:-1]
            labels[row, :width] = _labels(tokens, self.cache.mask[start:start + width + 1])
        return Batch(torch.from_numpy(ids), torch.from_numpy(labels))


class Packed:
    """Whole documents packed next-fit into samples of ``seq_len`` positions."""

    def __init__(self, cache: TokenFile, docs: np.ndarray, seq_len: int, truncate: bool):
        self.padded = Padded(cache, docs, seq_len, truncate)
        ends = np.cumsum(self.padded.positions)
        self.starts = [0]  # pack j holds documents starts[j] .. starts[j + 1] - 1 of ``docs``
        while self.starts[-1] < len(ends):
            base = ends[self.starts[-1] - 1] if self.starts[-1] else 0
            self.starts.append(int(np.searchsorted(ends, base + seq_len, side="right")))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def rows(self, indices: np.ndarray) -> Batch:
        seq = self.padded.seq_len
        n = len(indices)
        ids = torch.full((n, seq), self.padded.cache.meta["pad"], dtype=torch.int64)
        labels = torch.full((n, seq), IGNORE_INDEX, dtype=torch.int64)
        positions = torch.zeros((n, seq), dtype=torch.int64)
        segments = torch.full((n, seq), -1, dtype=torch.int64)
        for row, pack in enumerate(indices):
            members = np.arange(self.starts[pack], self.starts[pack + 1])
            one = self.padded.rows(members)
            at = 0
            for k, member in enumerate(members):
                width = int(self.padded.positions[member])
                ids[row, at:at + width] = one.input_ids[k, :width]
                labels[row, at:at + width] = one.labels[k, :width]
                positions[row, at:at + width] = torch.arange(width)
                segments[row, at:at + width] = k
                at += width
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        allowed = (segments.unsqueeze(-1) == segments.unsqueeze(-2)) & causal
        return Batch(ids, labels, positions, (~allowed).unsqueeze(1))


class Batches:
    """This DP rank's :class:`Batch` of ``batch`` samples for any step, cycling over ``samples``."""

    def __init__(self, samples, batch: int, dp_size: int, dp_rank: int):
        self.samples, self.batch, self.dp_size, self.dp_rank = samples, batch, dp_size, dp_rank

    def indices(self, step: int) -> np.ndarray:
        """The sample indices this rank reads at ``step``."""
        per_step = self.batch * self.dp_size
        index = (np.arange(per_step) + step * per_step) % len(self.samples)
        return index.reshape(self.dp_size, self.batch)[self.dp_rank]

    def __call__(self, step: int) -> Batch:
        return self.samples.rows(self.indices(step))


def validation_batches(samples, batch: int, dp_size: int, dp_rank: int) -> list[Batch]:
    """All of ``samples`` split over the DP ranks (rank ``r`` takes ``r, r + d, ..``) in batches of
    ``batch`` rows; every rank gets the same number of batches, the last ones filled up with rows
    whose labels are all -100 (they count for nothing in a token mean)."""
    mine = np.arange(dp_rank, len(samples), dp_size)
    rows_per_rank = -(-len(samples) // dp_size)
    count = -(-rows_per_rank // batch)
    out = []
    for k in range(count):
        chosen = mine[k * batch:(k + 1) * batch]
        filler = batch - len(chosen)
        one = samples.rows(np.concatenate([chosen, np.zeros(filler, np.int64)]).astype(np.int64))
        if filler:
            one.labels[len(chosen):] = IGNORE_INDEX
        out.append(one)
    return out

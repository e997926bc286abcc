"""Agreeing across ranks: errors raised on every rank together, and equality checks.

Code that can fail on some ranks only (bad input read on one stage, a shape one TP rank rejects)
runs inside ``with on_every_rank(what):`` so that every rank raises a :class:`RankError` naming
the failing ranks, and none goes on to a collective the others will never enter. Built on the
collectives of :mod:`dist_lora.parallel.collectives`; a ``group`` of ``None`` is the world group,
and with one rank nothing communicates.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from typing import Any, Iterator, Sequence

import torch

from dist_lora.parallel.collectives import Group, all_gather_object, all_reduce_, group_size
from dist_lora.parallel.device import collective_device


class RankError(RuntimeError):
    """An error that happened on one or more ranks, raised on all of them."""


def raise_if_any(error: BaseException | None, group: Group = None, what: str = "") -> None:
    """Collective: raise on every rank if any rank passed an error.

    Each rank calls this with the exception it caught (or ``None``). If any rank failed, every
    rank raises a ``RankError`` that names the failing ranks and their messages, so that no
    rank goes on to a collective the others will never enter.
    """
    if group_size(group) == 1:
        if error is not None:
            raise error
        return
    if not any_rank(error is not None, group):
        return
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}", group)
    lines = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
    prefix = f"{what} failed" if what else "failed"
    raise RankError(f"{prefix} on {len(lines)} rank(s):\n  " + "\n  ".join(lines)) from error


@contextlib.contextmanager
def on_every_rank(what: str = "", group: Group = None) -> Iterator[None]:
    """Collective: run the block on every rank of ``group`` and raise together.

    If the block raises on any rank, every rank raises (a ``RankError`` naming the failing
    ranks and their messages; with one rank, the original exception), so no rank goes on to a
    collective the others will never enter::

        with on_every_rank(f"loading {path}"):
            spec = read_spec(path)      # may fail on some ranks only
    """
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised on every rank below
        error = err
    raise_if_any(error, group, what)


def any_rank(flag: bool, group: Group = None) -> bool:
    """Collective: whether ``flag`` is true on any rank of ``group``."""
    if group_size(group) == 1:
        return bool(flag)
    box = torch.tensor([int(bool(flag))], dtype=torch.int32, device=collective_device(group))  # nccl: on the GPU
    return bool(all_reduce_(box, group, "max").item())


def digest(obj: Any) -> str:
    """A short stable hash of a picklable object (for cross-rank consistency checks)."""
    return hashlib.sha256(pickle.dumps(obj, protocol=4)).hexdigest()[:16]


def check_same_on_all_ranks(obj: Any, group: Group = None, what: str = "value") -> None:
    """Collective: raise on every rank if ``obj`` differs between ranks of ``group``."""
    digests = all_gather_object(digest(obj), group)
    if len(set(digests)) > 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RankError(f"{what} differs between ranks: ranks {differing} disagree with rank 0")


def all_equal_tensors(tensors: Sequence[torch.Tensor], group: Group = None) -> list[bool]:
    """Collective: for each tensor, whether its bytes are identical on every rank of ``group``."""
    hashes = [hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
              for t in tensors]
    everyone = all_gather_object(hashes, group)
    return [len({h[i] for h in everyone}) == 1 for i in range(len(tensors))]

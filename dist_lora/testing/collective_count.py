"""Count the collectives a block of code runs, as torch.distributed sees them.

Every collective of torch.distributed (dist_lora's, Megatron's, DDP's, in forward and in
backward) reaches the dispatcher as a ``c10d`` operator (``c10d.allreduce_``,
``c10d._allgather_base_``, ``c10d._reduce_scatter_base_``, ...). :func:`count_collectives` records
each one with the process group it ran on, through a ``TorchDispatchMode`` that lets the operator
run unchanged::

    with count_collectives() as seen:
        forward_backward(model, ids, labels)
    seen.counts()   # {("allreduce_", (0, 1)): 7, ("_allgather_base_", (0, 1)): 4, ...}

Backward runs inside the block on the calling thread (CPU autograd) and is counted too.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_lora.parallel.collectives import process_group_ranks


def _group_ranks(args) -> tuple[int, ...]:
    """Global ranks of the process group among an operator's arguments (passed boxed)."""
    for arg in args:
        ranks = process_group_ranks(arg)
        if ranks is not None:
            return ranks
    return ()


class CollectiveLog(TorchDispatchMode):
    """The ``c10d`` operators dispatched while active: ``(name, group ranks, element count)``."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            numel = max((t.numel() for t in tensors), default=0)
            self.calls.append((func._opname, _group_ranks(args), numel))
        return func(*args, **(kwargs or {}))

    def counts(self) -> dict[tuple[str, tuple[int, ...]], int]:
        """Number of calls per (operator, group ranks)."""
        return dict(collections.Counter((name, group) for name, group, _ in self.calls))

    def total(self) -> int:
        return len(self.calls)


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Record every torch.distributed collective run inside the block (see module docstring)."""
    log = CollectiveLog()
    with log:
        yield log

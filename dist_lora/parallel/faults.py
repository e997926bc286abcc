"""Communication failures in words: which rank was lost, which peer stopped answering, which timeout.

At start every rank records where each rank runs (host name and the address it communicates
from; :func:`record`, one all-gather). When a collective fails, :func:`describe` turns the
backend's message into one that names the rank: a peer that closed its connections (its process
died: "lost rank 3 on node2 (10.0.0.3)") or, for a timeout, the configured timeout and the peers
whose hosts do not answer any more (a cut link or a dead host) as opposed to hosts that answer
(a rank that is stuck or slow).
"""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch.distributed as dist

from dist_lora.parallel.collectives import all_gather_object, group_rank

_LOST = ("closed by peer", "Connection reset", "reset by peer", "Broken pipe", "ECONNRESET", "EPIPE")
_TIMED_OUT = ("timed out", "Timed out", "Timeout", "timeout")
_BACKENDS = ("gloo", "NCCL", "nccl", "c10d", "ProcessGroup")  # a RuntimeError from a collective names one
_PROBE_S = 2.0

_table: list[tuple[str, str]] = []  # rank -> (host, address)
_timeout_s: float | None = None


def record(host: str, address: str, timeout_s: float) -> None:
    """Collective (world): remember every rank's (host, address) and the job's timeout."""
    global _table, _timeout_s
    _table = list(all_gather_object((host, address)))
    _timeout_s = timeout_s


def forget() -> None:
    global _table, _timeout_s
    _table, _timeout_s = [], None


def timeout_s() -> float | None:
    return _timeout_s


def _names(ranks: list[int]) -> str:
    by_host: dict[tuple[str, str], list[int]] = {}
    for r in ranks:
        by_host.setdefault(_table[r], []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {host} ({address})"
             for (host, address), rs in by_host.items()]
    return "; ".join(parts)


def _answers(address: str) -> bool:
    """Whether the host at ``address`` answers at all (a refused connection is an answer)."""
    try:
        with socket.create_connection((address, 9), timeout=_PROBE_S):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Failure:
    message: str
    silent: tuple[int, ...] = ()  # ranks whose hosts do not answer any more


def describe(err: BaseException) -> Failure | None:
    """What a failed collective means, naming the lost or silent ranks; ``None`` if ``err`` is not a
    communication failure (or :func:`record` did not run)."""
    text = str(err)
    if not _table or not (isinstance(err, dist.DistError) or
                          (isinstance(err, RuntimeError) and any(b in text for b in _BACKENDS))):
        return None
    me = group_rank()
    first_line = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(err).__name__
    if any(word in text for word in _LOST):
        found = re.search(r"\[(\d+\.\d+\.\d+\.\d+)\]:\d+", text)
        ranks = [r for r, (_, a) in enumerate(_table) if found and a == found.group(1) and r != me]
        who = _names(ranks) if ranks else "a peer"
        return Failure(f"lost {who}: its process ended or its host went away ({first_line})")
    if any(word in text for word in _TIMED_OUT):
        mine = _table[me][1]
        others = sorted({a for r, (_, a) in enumerate(_table) if r != me and a != mine})
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(others)))) as pool:
            silent = {a for a, ok in zip(others, pool.map(_answers, others)) if not ok}
        ranks = [r for r, (_, a) in enumerate(_table) if a in silent]
        head = (f"a collective did not complete within the job's timeout of {_timeout_s:g} s "
                f"(DIST_LORA_TIMEOUT_S / initialize(timeout_s=...))")
        if ranks:
            return Failure(f"{head}; peers not answering: {_names(ranks)} (host down or network cut) ({first_line})",
                           tuple(ranks))
        return Failure(f"{head}; every peer host answers, so a rank is stuck or much slower (see its log) "
                       f"({first_line})")
    return None

"""Run many distributed checks per process launch, on CPU/gloo, with a deadline.

A process launch costs seconds (imports); a check costs milliseconds. So a test module
registers its checks with :func:`check`, naming the layouts each runs on, and one launch of
``world_size`` processes runs all of them: for each layout the workers re-lay Megatron's
parallel state on the same process group and run that layout's checks. Each pytest case
(``check[layout]``) then reads its verdict from the launch's results.

A rank that dies or hangs never hangs the test run: every collective has a timeout
(``DIST_LORA_TIMEOUT_S``), and the launcher kills the workers at the deadline and fails the
cases that did not finish, with the tail of each rank's log.

Usage in a test module::

    @check("tp1", "tp2", "tp2-sp", "pp2", "tp2-pp2")
    def logits_match_hf(ctx):
        ...  # ctx.groups, ctx.data (from prepare), ctx.tmp

    test_distributed = distributed_tests(__name__, world_size=4, prepare=make_reference)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dist_lora.parallel.launch_env import LOOPBACK, free_port

_REGISTRY: dict[str, list["Check"]] = {}
_LAYOUT = re.compile(r"^(?:tp(\d+))?(?:(?:^|-)pp(\d+))?(?:(?:^|-)ep(\d+))?(?:(?:^|-)etp(\d+))?(-sp)?$")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    sp: bool = False
    ep: int = 1  # expert parallel
    etp: int = 1  # expert tensor parallel

    @staticmethod
    def parse(text: str) -> "Layout":
        """``tpN[-ppM][-epE[-etpT]][-sp]``; a leading ``tp1`` may be left out (``pp2``, ``ep2-etp2``)."""
        match = _LAYOUT.match(text)
        if not match or text.startswith("-") or not any(match.groups()[:4]):
            raise ValueError(f"layout {text!r} is not of the form tpN[-ppM][-epE][-etpT][-sp]")
        tp, pp, ep, etp = (int(g) if g else 1 for g in match.groups()[:4])
        return Layout(tp, pp, bool(match.group(5)), ep, etp)

    @property
    def name(self) -> str:
        return (f"tp{self.tp}" + (f"-pp{self.pp}" if self.pp > 1 else "") + (f"-ep{self.ep}" if self.ep > 1 else "")
                + (f"-etp{self.etp}" if self.etp > 1 else "") + ("-sp" if self.sp else ""))


@dataclass(frozen=True)
class Check:
    name: str
    func: Callable
    layouts: tuple[Layout, ...]

    def case_ids(self) -> list[str]:
        return [f"{self.name}[{layout.name}]" for layout in self.layouts]


@dataclass
class Context:
    """What a check receives: the layout's groups, the prepared data, a shared scratch dir."""

    groups: Any
    layout: Layout
    data: dict
    tmp: Path
    world_size: int
    state: dict = field(default_factory=dict)  # shared between checks of one launch


def check(*layouts: str):
    """Register the decorated ``func(ctx)`` as a distributed check on ``layouts``."""

    def register(func):
        parsed = tuple(Layout.parse(text) for text in layouts)
        _REGISTRY.setdefault(func.__module__, []).append(Check(func.__name__, func, parsed))
        return func

    return register


def checks_of(module: str) -> list[Check]:
    return list(_REGISTRY.get(module, []))


@dataclass
class LaunchResult:
    results: dict[str, dict]  # case -> {"ok": bool, "error": str, "rank": int}
    logs: dict[int, str]
    problem: str | None  # timeout / crash description

    def verdict(self, case: str) -> tuple[bool, str]:
        outcome = self.results.get(case)
        if outcome is None:
            tails = "\n".join(f"--- rank {r} log tail ---\n{log[-3000:]}" for r, log in self.logs.items())
            return False, f"{case} did not finish: {self.problem or 'no result written'}\n{tails}"
        return outcome["ok"], outcome.get("error", "")


def launch(module: str, world_size: int, data: dict | None = None, tmp: str | Path | None = None,
           timeout: float = 900, collective_timeout: float | None = None, env: dict | None = None) -> LaunchResult:
    """Run every registered check of ``module`` in ``world_size`` processes; collect verdicts.

    The workers see torchrun's variables (one node: ``LOCAL_WORLD_SIZE`` = ``world_size``) plus
    ``env``; ``DIST_LORA_TEST_BACKEND`` there picks the backend (e.g. ``gloo`` for ranks sharing
    one GPU; default: nccl with CUDA, gloo without).

    ``collective_timeout`` (default 120 s, or ``$DIST_LORA_TEST_COLLECTIVE_TIMEOUT_S``) bounds
    every collective of the workers; ``$DIST_LORA_TEST_TIMEOUT_SCALE`` multiplies both deadlines
    on a machine busy with other work."""
    import tempfile

    scale = float(os.environ.get("DIST_LORA_TEST_TIMEOUT_SCALE", 1))
    if collective_timeout is None:
        collective_timeout = float(os.environ.get("DIST_LORA_TEST_COLLECTIVE_TIMEOUT_S", 120))
    timeout, collective_timeout = timeout * scale, collective_timeout * scale
    workdir = Path(tmp or tempfile.mkdtemp(prefix="dist_lora_launch_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data.json").write_text(json.dumps(data or {}))
    port = free_port()
    root = Path.cwd()
    procs, logs = [], []
    for rank in range(world_size):
        worker_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
                          DIST_LORA_TIMEOUT_S=str(collective_timeout), OMP_NUM_THREADS="1",
                          PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), **(env or {}))
        log = open(workdir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dist_lora.testing.worker", module, str(workdir)],
            env=worker_env, stdout=log, stderr=subprocess.STDOUT, cwd=root))
    problem = None
    deadline = time.monotonic() + timeout
    first_failure = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
            first_failure = now
        if now > deadline:
            problem = f"timed out after {timeout:.0f} s"
        elif first_failure is not None and now - first_failure > collective_timeout + 30:
            problem = "a rank exited with an error and the others did not finish"
        if problem:
            for p in procs:
                p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    for log in logs:
        log.close()
    codes = [p.returncode for p in procs]
    if problem is None and any(codes):
        problem = f"worker exit codes {codes}"
    merged: dict[str, dict] = {}
    for rank in range(world_size):
        path = workdir / f"results_rank{rank}.json"
        ranks = json.loads(path.read_text()) if path.exists() else {}
        for case, outcome in ranks.items():
            prev = merged.get(case, {"ok": True, "error": "", "ranks": 0})
            ok = prev["ok"] and outcome["ok"]
            error = prev["error"] + (f"\n[rank {rank}] {outcome['error']}" if not outcome["ok"] else "")
            merged[case] = {"ok": ok, "error": error, "ranks": prev["ranks"] + 1}
    for case, outcome in merged.items():
        if outcome["ranks"] < world_size:
            outcome["ok"] = False
            outcome["error"] += f"\nonly {outcome['ranks']} of {world_size} ranks reported ({problem})"
    texts = {r: (workdir / f"rank{r}.log").read_text(errors="replace") for r in range(world_size)}
    return LaunchResult(merged, texts, problem)


_CACHE: dict[tuple[str, int], LaunchResult] = {}


def distributed_tests(module: str, world_size: int, prepare: Callable[[Path], dict] | None = None,
                      timeout: float = 900, env: dict | None = None):
    """A pytest test function parametrized over every ``check[layout]`` case of ``module``.

    The first case to run launches the workers once (after ``prepare(tmp_dir)`` built the
    data they read); every case then reports its own verdict.
    """
    import pytest

    cases = [case for c in checks_of(module) for case in c.case_ids()]

    @pytest.mark.parametrize("case", cases)
    def test_distributed(case, tmp_path_factory):
        key = (module, world_size)
        if key not in _CACHE:
            tmp = tmp_path_factory.mktemp(module.rsplit(".", 1)[-1])
            data = prepare(tmp) if prepare else {}
            _CACHE[key] = launch(module, world_size, data=data, tmp=tmp, timeout=timeout, env=env)
        ok, message = _CACHE[key].verdict(case)
        if not ok:
            pytest.fail(message, pytrace=False)

    return test_distributed

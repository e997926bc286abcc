"""The Slurm job step this process runs in: its tasks, its nodes, and a rendezvous port of its own.

``srun`` starts one process per task of a *step* and describes the step in ``SLURM_STEP_*``
variables; the job's (``SLURM_JOB_NODELIST``, ``SLURM_NODELIST``) describe the whole allocation,
which a step may use only part of (``srun -N1 -r1``). So the ranks come from the step:
``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``, and the rendezvous host is the first node of
``SLURM_STEP_NODELIST``. The port, unless ``MASTER_PORT`` is set, is derived from the job *and*
step ids (two steps running at once in one job get different ports) and lies in
:data:`PORT_RANGE`, below Linux's ephemeral ports (``/proc/sys/net/ipv4/ip_local_port_range``,
32768-60999 by default) from which the kernel picks outgoing connections' local ports.

A process in a job but outside any step (a batch script or an ``salloc`` shell: ``SLURM_PROCID``
and ``SLURM_NTASKS`` set, no ``SLURM_STEP_ID``) is one process where the job has
``SLURM_NTASKS``: with more than one task that is refused at once (the others would never come).

:func:`cancel_step` is the one action here: a rank that finds a peer's host silent cancels its own
step, because srun would otherwise wait for that node's tasks until Slurm declares the node dead
(``SlurmdTimeout``, 300 s by default); after a cancel srun waits ``KillWait`` + 2 s at most.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

PORT_RANGE = (20000, 32768)  # [first, end): below the default ephemeral range 32768-60999
_STEPS_PER_JOB = 64  # consecutive job ids get disjoint blocks of ports for their first 64 steps
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


class LaunchError(RuntimeError):
    """The launcher's environment cannot give a working rendezvous; the message names the setting."""


@dataclass(frozen=True)
class SlurmStep:
    rank: int
    world_size: int
    local_rank: int
    nodes: tuple[str, ...]  # the step's nodes, in Slurm's order (the first is the rendezvous host)
    node: str  # the node this task runs on (SLURMD_NODENAME)
    job_id: int
    step_id: int

    @property
    def token(self) -> str:
        return f"slurm job {self.job_id} step {self.step_id}"


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _expand_one(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail, hosts = name[:match.start()], name[match.end():], []
    for item in match.group(1).split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"bad range {item!r}")
        for number in range(int(low), int(high or low) + 1):
            hosts += [head + str(number).zfill(len(low)) + rest for rest in _expand_one(tail)]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm host list: ``gpu[07-08,11],cpu1`` -> gpu07, gpu08, gpu11, cpu1."""
    text = nodelist.strip()
    if not text or text.count("[") != text.count("]"):
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}")
    try:
        return [host for part in _split_top(text) if part for host in _expand_one(part)]
    except ValueError as err:
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}: {err}") from None


def ephemeral_ports() -> tuple[int, int] | None:
    """This host's ephemeral port range (inclusive), or ``None`` where it cannot be read."""
    try:
        low, high = _EPHEMERAL.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def step_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of a step: the same on every node, different for concurrent steps of
    a job (and for the first steps of consecutive jobs), never in the default ephemeral range."""
    first, end = PORT_RANGE
    return first + (job_id * _STEPS_PER_JOB + step_id) % (end - first)


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def read_step(env: Mapping[str, str] = os.environ) -> SlurmStep | None:
    """The step of this task, ``None`` outside Slurm or for a lone process of a job outside any
    step; :class:`LaunchError` naming the variable where the environment is inconsistent."""
    rank = _int(env, "SLURM_PROCID")
    ntasks = _int(env, "SLURM_NTASKS")
    if ntasks is None:
        ntasks = _int(env, "SLURM_NPROCS")
    if rank is None or ntasks is None:
        return None
    step_text = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    if not step_text.isdigit():  # the batch script, an salloc shell (or an interactive step)
        if ntasks > 1:
            raise LaunchError(
                f"SLURM_PROCID={rank} and SLURM_NTASKS={ntasks} are set but this process is not in a job "
                f"step (no SLURM_STEP_ID): it was started by the batch script or an salloc shell, not by srun, "
                f"so the other {ntasks - 1} task(s) will never join. Start it with srun (one process per "
                f"task: srun python launch/finetune.py ...), or with torchrun")
        return None
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    if world is None:
        world = ntasks
    elif ntasks != world:
        raise LaunchError(
            f"SLURM_NTASKS={ntasks} but this step runs SLURM_STEP_NUM_TASKS={world} tasks: SLURM_NTASKS was "
            f"changed after srun started the step; do not set it by hand (srun sets it), or ask srun for "
            f"--ntasks={ntasks}")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is not a task of this step of {world} tasks")
    step_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_list = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    try:
        nodes = tuple(expand_nodelist(step_list or "localhost"))
        job_nodes = set(expand_nodelist(job_list)) if job_list else set(nodes)
    except ValueError as err:
        raise LaunchError(str(err)) from None
    node = env.get("SLURMD_NODENAME") or nodes[0]
    foreign = [n for n in nodes if n not in job_nodes]
    if foreign or node not in nodes:
        what = (f"names {', '.join(foreign)}, which the job does not have (SLURM_JOB_NODELIST={job_list})"
                if foreign else f"does not contain this task's node {node} (SLURMD_NODENAME)")
        raise LaunchError(
            f"SLURM_STEP_NODELIST={step_list} {what}: the step's environment does not belong to this step "
            f"(was it copied from another step or set by hand?). Let srun set the SLURM_* variables: do not "
            f"export them into a step")
    return SlurmStep(rank, world, _int(env, "SLURM_LOCALID") or 0, nodes, node,
                     _int(env, "SLURM_JOB_ID") or _int(env, "SLURM_JOBID") or 0, int(step_text))


def cancel_step(env: Mapping[str, str] = os.environ) -> str | None:
    """``scancel`` this process's Slurm step (a no-op outside a step); what was done, for the log."""
    job, step = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"), env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if not job or not step or not step.isdigit() or shutil.which("scancel") is None:
        return None
    try:
        done = subprocess.run(["scancel", f"{job}.{step}"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f"scancel {job}.{step} did not return (the controller is unreachable from here)"
    if done.returncode:
        return f"scancel {job}.{step} failed: {done.stderr.strip()}"
    return (f"cancelled Slurm step {job}.{step}, so that srun does not wait for the silent node until Slurm's "
            f"node timeout")

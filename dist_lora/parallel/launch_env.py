"""Where this process sits in the job: rank, world size and rendezvous, read from the launcher.

Supported launchers, checked in this order (the first that applies wins):

1. ``torchrun`` (and anything that sets the same variables): ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. Slurm ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of
   ``SLURM_JOB_NODELIST`` as rendezvous host. The port is ``MASTER_PORT`` when set, otherwise
   derived from ``SLURM_JOB_ID`` so that every task computes the same one without talking.
3. MPI: Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra and Intel MPI (``PMI_RANK``,
   ``PMI_SIZE``, ``MPI_LOCALRANKID``). Without ``MASTER_ADDR``/``MASTER_PORT`` rank 0 picks a
   free port and broadcasts it with mpi4py (the ``mpi`` extra).
4. Nothing: a single process on loopback with a free port.

This module reads the environment only; it never starts a process group.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LaunchEnv:
    """Rank placement and rendezvous address of this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``node[03-05,9],gpu1``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from err
    return None


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    addr = os.environ.get("MASTER_ADDR")
    port = _int_env("MASTER_PORT")
    if addr and port:
        return addr, port
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            "launched under MPI without MASTER_ADDR/MASTER_PORT and without mpi4py: install the "
            "'mpi' extra (pip install 'dist-lora[mpi]') or export MASTER_ADDR and MASTER_PORT"
        ) from err
    comm = MPI.COMM_WORLD
    choice = None
    if rank == 0:
        host = addr or (LOOPBACK if comm.Get_size() == 1 or _single_node_mpi() else socket.gethostname())
        choice = (host, port or free_port("" if host != LOOPBACK else LOOPBACK))
    return comm.bcast(choice, root=0)


def _single_node_mpi() -> bool:
    local = _int_env("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
    size = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    return local is not None and local == size


def detect() -> LaunchEnv:
    """Read rank and rendezvous from the environment (see the module docstring)."""
    rank = _int_env("RANK")
    world = _int_env("WORLD_SIZE")
    if rank is not None and world is not None:
        return LaunchEnv(
            rank=rank,
            world_size=world,
            local_rank=_int_env("LOCAL_RANK") or 0,
            master_addr=os.environ.get("MASTER_ADDR", LOOPBACK),
            master_port=_int_env("MASTER_PORT") or 29500,
            launcher="torchrun",
        )
    rank = _int_env("SLURM_PROCID")
    world = _int_env("SLURM_NTASKS", "SLURM_NPROCS")
    if rank is not None and world is not None:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
        addr = os.environ.get("MASTER_ADDR") or first_host(nodelist)
        if addr == "localhost":
            addr = LOOPBACK
        job = _int_env("SLURM_JOB_ID") or 0
        port = _int_env("MASTER_PORT") or 15000 + job % 20000
        return LaunchEnv(rank, world, _int_env("SLURM_LOCALID") or 0, addr, port, "slurm")
    rank = _int_env("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    world = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is not None and world is not None:
        local = _int_env("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
        addr, port = _mpi_rendezvous(rank)
        return LaunchEnv(rank, world, local, addr, port, "mpi")
    return LaunchEnv(0, 1, 0, LOOPBACK, free_port(), "single")

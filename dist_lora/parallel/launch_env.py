"""Where this process sits in the job: rank, world size and rendezvous, read from the launcher.

Supported launchers, checked in this order (the first that applies wins):

1. ``torchrun`` (and anything that sets the same variables): ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. MPI: Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra and Intel MPI (``PMI_RANK``,
   ``PMI_SIZE``, ``MPI_LOCALRANKID``). Without ``MASTER_ADDR``/``MASTER_PORT`` rank 0 picks a
   free port and broadcasts it with mpi4py (the ``mpi`` extra). Under ``srun --mpi=...`` both
   MPI's and Slurm's variables describe the same ranks and Slurm's rendezvous is used; where they
   differ (``mpiexec`` inside a Slurm step) MPI started this process and its ranks count.
3. Slurm ``srun``: the step's tasks and nodes (:mod:`dist_lora.parallel.slurm_env`: ranks from
   ``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``, the rendezvous on the first node of
   ``SLURM_STEP_NODELIST``, a port of the step's own unless ``MASTER_PORT`` is set; a process of
   a job outside any step is refused when the job has several tasks).
4. Nothing: a single process on loopback with a free port.

``MASTER_ADDR`` always overrides the rendezvous host, ``MASTER_PORT`` the port. This module
reads the environment only; it never starts a process group.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from dist_lora.parallel.slurm_env import LaunchError, SlurmStep, expand_nodelist, read_step, step_port

LOOPBACK = "127.0.0.1"
__all__ = ["LOOPBACK", "LaunchEnv", "LaunchError", "detect", "first_host", "free_port"]


@dataclass(frozen=True)
class LaunchEnv:
    """Rank placement and rendezvous address of this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    token: str = ""  # who the rendezvous belongs to (a Slurm job and step, or random); "" under torchrun
    origin: str = ""  # where master_addr / master_port came from, for error messages
    peers: tuple[str, ...] = ()  # the job's hosts where known (a Slurm step's nodes)
    host: str = ""  # this process's host name

    @property
    def owns_store(self) -> bool:
        """Whether rank 0 serves the store (everything but torchrun, whose agent serves it)."""
        return self.launcher != "torchrun"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``node[03-05,9],gpu1``."""
    return expand_nodelist(nodelist)[0]


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _mpi_rendezvous(rank: int) -> tuple[str, int, str]:
    addr = os.environ.get("MASTER_ADDR")
    port = _int_env("MASTER_PORT")
    if addr and port:
        return addr, port, "mpi"
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
        choice = (host, port or free_port("" if host != LOOPBACK else LOOPBACK), uuid.uuid4().hex)
    return comm.bcast(choice, root=0)


def _single_node_mpi() -> bool:
    local = _int_env("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
    size = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    return local is not None and local == size


def _slurm(step: SlurmStep) -> LaunchEnv:
    addr = os.environ.get("MASTER_ADDR")
    port = _int_env("MASTER_PORT")
    origin = "MASTER_ADDR" if addr else f"the first node of SLURM_STEP_NODELIST={os.environ.get('SLURM_STEP_NODELIST')}"
    origin += ", MASTER_PORT" if port else f", port of job {step.job_id} step {step.step_id}"
    addr = addr or step.nodes[0]
    return LaunchEnv(step.rank, step.world_size, step.local_rank, LOOPBACK if addr == "localhost" else addr,
                     port or step_port(step.job_id, step.step_id), "slurm", step.token, origin, step.nodes,
                     step.node)


def detect() -> LaunchEnv:
    """Read rank and rendezvous from the environment (see the module docstring); :class:`LaunchError`
    naming the variable where it is inconsistent."""
    host = socket.gethostname()
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
            origin="MASTER_ADDR, MASTER_PORT",
            host=host,
        )
    rank = _int_env("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    world = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is not None and world is not None:
        try:
            step = read_step()
        except LaunchError:  # e.g. mpiexec in a batch script: MPI started this process
            step = None
        if step is None or (rank, world) != (step.rank, step.world_size):
            local = _int_env("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
            addr, port, token = _mpi_rendezvous(rank)
            return LaunchEnv(rank, world, local, addr, port, "mpi", token,
                             "MASTER_ADDR, MASTER_PORT or rank 0's choice", host=host)
    step = read_step()
    if step is not None:
        return _slurm(step)
    return LaunchEnv(0, 1, 0, LOOPBACK, free_port(), "single", uuid.uuid4().hex, "a single process", host=host)

"""Rank and rendezvous detection from each launcher's environment variables."""

from __future__ import annotations

import pytest

from dist_lora.parallel.launch_env import LOOPBACK, detect, first_host

_ALL = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE",
        "PMIX_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


@pytest.fixture
def env(monkeypatch):
    for name in _ALL:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun(env):
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="2345").items():
        env.setenv(k, v)
    env.setenv("SLURM_PROCID", "0")  # torchrun inside an sbatch script: torchrun's variables win
    env.setenv("SLURM_NTASKS", "1")
    got = detect()
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == (
        3, 4, 1, "10.1.2.3", 2345, "torchrun")


def test_slurm_first_host_and_job_port(env):
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[07-08,11]",
                     SLURM_JOB_ID="123456").items():
        env.setenv(k, v)
    got = detect()
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert got.master_port == 15000 + 123456 % 20000
    env.setenv("MASTER_PORT", "4000")
    assert detect().master_port == 4000


def test_slurm_localhost_is_loopback(env):
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost").items():
        env.setenv(k, v)
    assert detect().master_addr == LOOPBACK


@pytest.mark.parametrize("rank_var,size_var,local_var", [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
])
def test_mpi_with_explicit_rendezvous(env, rank_var, size_var, local_var):
    for k, v in {rank_var: "2", size_var: "4", local_var: "0", "MASTER_ADDR": "h0", "MASTER_PORT": "7777"}.items():
        env.setenv(k, v)
    got = detect()
    assert (got.rank, got.world_size, got.master_addr, got.master_port, got.launcher) == (2, 4, "h0", 7777, "mpi")


def test_single_process(env):
    got = detect()
    assert (got.rank, got.world_size, got.master_addr, got.launcher) == (0, 1, LOOPBACK, "single")
    assert 0 < got.master_port < 65536


def test_bad_integer_is_named(env):
    env.setenv("RANK", "zero")
    env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK='zero'"):
        detect()


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("node[3-5]", "node3"), ("a[09,12-14],b2", "a09"), ("gpu-[001-004]", "gpu-001"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host

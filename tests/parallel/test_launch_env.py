"""Rank and rendezvous detection from each launcher's environment variables (no launcher runs
here; tests/parallel/test_slurm_steps.py runs the same logic under a real two-node Slurm)."""

from __future__ import annotations

import pytest

from dist_lora.parallel.launch_env import LOOPBACK, LaunchError, detect, first_host
from dist_lora.parallel.slurm_env import PORT_RANGE, ephemeral_ports, expand_nodelist, step_port

_ALL = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_JOBID",
        "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURMD_NODENAME",
        "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE",
        "PMIX_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


@pytest.fixture
def env(monkeypatch):
    for name in _ALL:
        monkeypatch.delenv(name, raising=False)

    def set_all(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    monkeypatch.set_all = set_all
    return monkeypatch


def _step(env, **extra):
    """The variables srun sets for task 1 (on gpu08) of step 3 of job 123456, 4 tasks on 2 of 3 nodes."""
    values = dict(SLURM_PROCID=1, SLURM_NTASKS=4, SLURM_NPROCS=4, SLURM_LOCALID=1, SLURM_JOB_ID=123456,
                  SLURM_STEP_ID=3, SLURM_JOB_NODELIST="gpu[07-08,11]", SLURM_NODELIST="gpu[07-08,11]",
                  SLURM_STEP_NODELIST="gpu[08,11]", SLURM_STEP_NUM_TASKS=4, SLURMD_NODENAME="gpu08")
    values.update(extra)
    env.set_all(**{k: v for k, v in values.items() if v is not None})
    for k in [k for k, v in values.items() if v is None]:
        env.delenv(k, raising=False)


def test_torchrun(env):
    env.set_all(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, MASTER_ADDR="10.1.2.3", MASTER_PORT=2345)
    _step(env)  # torchrun inside a Slurm step: torchrun's variables win
    got = detect()
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == (
        3, 4, 1, "10.1.2.3", 2345, "torchrun")
    assert not got.owns_store  # torchrun's agent serves the store


def test_slurm_step_meets_on_the_steps_first_node_on_a_port_of_its_own(env):
    _step(env)
    got = detect()
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.launcher) == (1, 4, 1, "gpu08", "slurm")
    assert got.peers == ("gpu08", "gpu11") and got.host == "gpu08" and got.token == "slurm job 123456 step 3"
    assert got.master_port == step_port(123456, 3)
    env.setenv("SLURM_STEP_ID", "4")
    assert detect().master_port != got.master_port  # a second step of the job, running at the same time
    env.set_all(MASTER_PORT=4000, MASTER_ADDR="10.0.0.1")
    assert (detect().master_port, detect().master_addr) == (4000, "10.0.0.1")


def test_step_ports_lie_below_the_ephemeral_range_and_differ_between_steps_and_jobs():
    ports = {step_port(job, step) for job in range(1000, 1200) for step in range(8)}
    assert len(ports) == 200 * 8  # 8 steps of 200 consecutive jobs never share a port
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports) and PORT_RANGE[1] <= 32768
    ephemeral = ephemeral_ports()
    if ephemeral is not None:  # this machine's /proc/sys/net/ipv4/ip_local_port_range
        assert PORT_RANGE[1] <= ephemeral[0] or PORT_RANGE[0] > ephemeral[1], ephemeral


def test_slurm_localhost_is_loopback(env):
    _step(env, SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_JOB_NODELIST="localhost",
          SLURM_NODELIST="localhost", SLURM_STEP_NODELIST="localhost", SLURMD_NODENAME="localhost")
    assert detect().master_addr == LOOPBACK


def test_a_process_of_a_job_outside_any_step_is_refused(env):
    _step(env, SLURM_PROCID=0, SLURM_STEP_ID=None, SLURM_STEP_NODELIST=None, SLURM_STEP_NUM_TASKS=None,
          SLURM_NTASKS=2, SLURM_NPROCS=2)
    with pytest.raises(LaunchError, match=r"SLURM_PROCID=0 and SLURM_NTASKS=2 .* not in a job step .* srun"):
        detect()
    env.set_all(SLURM_NTASKS=1, SLURM_NPROCS=1)  # a one-task batch script: a single process
    assert detect().launcher == "single"


@pytest.mark.parametrize("extra,needle", [
    (dict(SLURM_NTASKS=8), r"SLURM_NTASKS=8 but this step runs SLURM_STEP_NUM_TASKS=4"),
    (dict(SLURM_STEP_NODELIST="gpu[08,12]"), r"SLURM_STEP_NODELIST=gpu\[08,12\] names gpu12, which the job does not"),
    (dict(SLURMD_NODENAME="gpu07"), r"does not contain this task's node gpu07 \(SLURMD_NODENAME\)"),
    (dict(SLURM_PROCID=4), r"SLURM_PROCID=4 is not a task of this step of 4 tasks"),
    (dict(SLURM_STEP_NODELIST="gpu[08"), r"cannot parse the Slurm node list"),
])
def test_an_inconsistent_step_environment_is_named(env, extra, needle):
    _step(env, **extra)
    with pytest.raises(LaunchError, match=needle):
        detect()


def test_mpiexec_inside_a_step_counts_mpis_ranks_and_srun_mpi_slurms(env):
    _step(env, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_STEP_NUM_TASKS=1, SLURM_STEP_NODELIST="gpu08", SLURM_LOCALID=0)
    env.set_all(PMI_RANK=3, PMI_SIZE=4, MPI_LOCALRANKID=1, MASTER_ADDR="h0", MASTER_PORT=7777)
    got = detect()
    assert (got.rank, got.world_size, got.launcher) == (3, 4, "mpi")
    _step(env, SLURM_PROCID=3, SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4)  # srun --mpi=pmi2: the same ranks
    assert detect().launcher == "slurm"


@pytest.mark.parametrize("rank_var,size_var,local_var", [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
])
def test_mpi_with_explicit_rendezvous(env, rank_var, size_var, local_var):
    env.set_all(**{rank_var: 2, size_var: 4, local_var: 0, "MASTER_ADDR": "h0", "MASTER_PORT": 7777})
    got = detect()
    assert (got.rank, got.world_size, got.master_addr, got.master_port, got.launcher) == (2, 4, "h0", 7777, "mpi")


def test_single_process(env):
    got = detect()
    assert (got.rank, got.world_size, got.master_addr, got.launcher) == (0, 1, LOOPBACK, "single")
    assert 0 < got.master_port < 65536


def test_bad_integer_is_named(env):
    env.set_all(RANK="zero", WORLD_SIZE=2)
    with pytest.raises(LaunchError, match="RANK='zero'"):
        detect()


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]), ("node[3-5]", ["node3", "node4", "node5"]),
    ("a[09,12-13],b2", ["a09", "a12", "a13", "b2"]), ("gpu-[001-002]", ["gpu-001", "gpu-002"]),
    ("rack[1-2]-n[7,9]", ["rack1-n7", "rack1-n9", "rack2-n7", "rack2-n9"]),
])
def test_node_lists_expand_as_slurm_writes_them(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts and first_host(nodelist) == hosts[0]

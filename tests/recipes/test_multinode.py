"""The demo recipe across the two hosts of a real Slurm cluster (:class:`~dist_lora.testing.slurm.TwoNodeSlurm`:
a controller and two compute hosts in network namespaces on one bridge), against torchrun on one host.

- srun (TP=2, one rank per host) and the shipped ``slurm/finetune.sbatch`` give the losses and the
  released adapter of torchrun bit for bit;
- TP=2 x DP=2 (TP inside a host, DP across) and PP=2 (one stage per host) give its losses to
  float rounding, and their releases pass the peft verification;
- faults: SIGKILL of node2's rank ends the job within seconds naming the lost rank; a cut link
  (node2's port on the bridge down) ends it within the configured timeout plus Slurm's KillWait,
  naming the timeout and the silent peer; ``--resume`` on the restored cluster finishes the run
  with the uninterrupted run's losses and adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.testing import slurm
from tests.recipes.test_finetune import DEMO, ROOT, run_recipe

STEPS = ["train.steps=30", "checkpoint.every=5"]
CUT_TIMEOUT_S = 20
KILL_WAIT_S = 5  # slurm.conf KillWait: how long srun waits for an unreachable node's tasks after a cancel


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm.available(hosts=True)
    if reason:
        pytest.skip(reason)
    with slurm.TwoNodeSlurm(tmp_path_factory.mktemp("two_nodes"), extra=[f"KillWait={KILL_WAIT_S}"]) as c:
        yield c


def _env(cluster, **extra) -> dict:
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return dict(env, OMP_NUM_THREADS="1", **extra)  # one thread per rank, as torchrun sets it


def _srun(cluster, *options: str) -> list[str]:
    return cluster.command(["srun", *options, sys.executable])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torchrun on this host, TP=2: losses and released adapter."""
    tmp = tmp_path_factory.mktemp("torchrun")
    rows = run_recipe(tmp, "ref", *STEPS)
    return rows, _adapter(tmp / "ref")


def _same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_srun_across_two_hosts_equals_torchrun_on_one(cluster, reference, tmp_path):
    rows = run_recipe(tmp_path, "srun", *STEPS, launcher=_srun(cluster, "-N2", "-n2"), env=_env(cluster))
    assert _losses(rows) == _losses(reference[0])
    _same_adapter(_adapter(tmp_path / "srun"), reference[1])


def test_the_shipped_sbatch_script_runs_across_both_hosts(cluster, reference, tmp_path):
    out = tmp_path / "sbatch"
    cmd = ["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
           f"--output={tmp_path / 'job.out'}", str(ROOT / "slurm" / "finetune.sbatch"), str(DEMO), *STEPS,
           "train.stop_at=8", f"output.dir={out}", f"checkpoint.dir={out / 'checkpoints'}"]
    done = cluster.run(cmd, env=_env(cluster, SBATCH_GPUS_PER_NODE="0"), cwd=ROOT, timeout=600)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr + log[-3000:]
    job = done.stdout.strip().split(";")[0]
    shown = cluster.run(["scontrol", "show", "job", job], timeout=30).stdout
    assert "NodeList=node[1-2]" in shown and "JobState=COMPLETED" in shown, shown
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert _losses([row for row in rows if "loss" in row]) == _losses(reference[0])[:8]  # not validation rows


@pytest.mark.parametrize("name,options,overrides", [
    ("tp2-dp2", ["-N2", "--ntasks-per-node=2"], ["train.micro_batch_size=4"]),  # same 8 sequences per step
    ("pp2", ["-N2", "-n2"], ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2"]),
])
def test_other_layouts_across_hosts_give_the_losses_of_tp2(cluster, reference, tmp_path, name, options, overrides):
    rows = run_recipe(tmp_path, name, *STEPS, *overrides, launcher=_srun(cluster, *options), env=_env(cluster))
    assert torch.allclose(torch.tensor(_losses(rows)), torch.tensor(_losses(reference[0])), rtol=1e-4, atol=0)


def _rank_pid(out: Path, procid: int) -> int:
    """The PID of the finetune.py task ``procid`` writing to ``out`` (it runs under node2's slurmd)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"output.dir={out}".encode() in cmdline and f"SLURM_PROCID={procid}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no task {procid} writing to {out}")


def _start(cluster, out: Path, resume: bool, **env) -> subprocess.Popen:
    cmd = _srun(cluster, "-N2", "-n2") + [str(ROOT / "launch" / "finetune.py"), "--config", str(DEMO), *STEPS,
                                          f"output.dir={out}", f"checkpoint.dir={out / 'checkpoints'}"]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, env=_env(cluster, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _after_checkpoint(job: subprocess.Popen, out: Path, step: int) -> int:
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and int(latest.read_text().split("-")[1]) >= step):
        assert job.poll() is None and time.monotonic() < deadline, (job.poll(), job.stdout.read()[-3000:])
        time.sleep(0.05)
    return int(latest.read_text().split("-")[1])


def test_killed_rank_and_cut_link_end_the_job_in_time_and_resume_gives_the_same_run(cluster, reference, tmp_path):
    out = tmp_path / "faults"
    job = _start(cluster, out, resume=False)
    first = _after_checkpoint(job, out, 10)
    os.kill(_rank_pid(out, 1), signal.SIGKILL)
    began = time.monotonic()
    log, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.monotonic() - began < 30, log[-3000:]  # ~2 s on an idle machine
    assert "lost rank 1 on node2 (10.77.0.3)" in log, log[-3000:]

    job = _start(cluster, out, resume=True, DIST_LORA_TIMEOUT_S=str(CUT_TIMEOUT_S))
    _after_checkpoint(job, out, first + 5)
    cluster.hosts.cut("node2")
    began = time.monotonic()
    try:
        log, _ = job.communicate(timeout=CUT_TIMEOUT_S + 120)
    finally:
        cluster.hosts.restore("node2")
    ended = time.monotonic() - began
    assert job.returncode != 0 and CUT_TIMEOUT_S - 1 < ended < CUT_TIMEOUT_S + KILL_WAIT_S + 15, (ended, log[-3000:])
    assert f"within the job's timeout of {CUT_TIMEOUT_S} s" in log, log[-3000:]
    assert "peers not answering: rank 1 on node2 (10.77.0.3)" in log and "Node failure" not in log, log[-3000:]

    cluster.wait_idle(timeout=120)  # node2's slurmd cleans up the cancelled step once it is reachable again
    rows = run_recipe(tmp_path, "faults", *STEPS, launcher=_srun(cluster, "-N2", "-n2"), env=_env(cluster),
                      resume=True)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert _losses(rows) == _losses(reference[0])
    _same_adapter(_adapter(out), reference[1])

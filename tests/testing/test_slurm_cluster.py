"""The two-node Slurm harness itself: hosts as network namespaces, start / stop idempotent, nothing
left behind (daemons stopped by PID, namespaces, munge directory and files removed)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from dist_lora.testing import netns, slurm


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_two_node_cluster_starts_runs_a_step_on_both_hosts_and_leaves_nothing(tmp_path):
    reason = slurm.available(hosts=True)
    if reason:
        pytest.skip(reason)
    cluster = slurm.TwoNodeSlurm(tmp_path / "cluster")
    try:
        assert cluster.start() is cluster.start()  # idempotent
        hosts = cluster.hosts
        assert set(hosts.netns.values()) | {hosts.switch} <= _namespaces()
        step = cluster.run(["srun", "-N2", "-n2", "-l", "sh", "-c",
                            "hostname; getent hosts node1 | head -1; getent hosts node2; ip route"],
                           timeout=60)
        assert step.returncode == 0, step.stderr
        lines = step.stdout.splitlines()
        on = {n: [line.split(": ", 1)[1] for line in lines if line.startswith(f"{n}: ")] for n in ("0", "1")}
        assert on["0"][0] == "node1" and on["1"][0] == "node2"
        assert "127.0.1.1" in on["0"][1] and "10.77.0.3" in on["0"][2]  # own name on loopback, as Debian does
        assert not any(line.startswith("default") for line in on["0"] + on["1"])  # no way out but the bridge
        pids = [proc.pid for _, proc in cluster.daemons.procs]
        assert len(pids) == 4  # munged, slurmctld, two slurmd
    finally:
        cluster.stop()
        cluster.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not (set(hosts.netns.values()) | {hosts.switch}) & _namespaces()
    assert not cluster.munge.dir.exists() and not cluster.spool.exists()
    assert not list((tmp_path / "cluster" / "hosts").glob("hosts.*"))


def test_namespaces_of_a_dead_instance_are_removed(tmp_path):
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    dead = 2 ** 22 + 1  # above the default pid_max, so no such process
    stale = netns.VirtualHosts(["a"], tmp_path, tag=str(dead)).start()
    assert stale.netns["a"] in _namespaces()
    netns.remove_stale()
    assert not {stale.netns["a"], stale.switch} & _namespaces()


def test_stopping_with_a_job_running_leaves_no_step_behind(tmp_path):
    reason = slurm.available()
    if reason:
        pytest.skip(reason)
    with slurm.LoopbackSlurm(tmp_path / "cluster") as cluster:
        job = cluster.run(["sbatch", "--parsable", f"--output={tmp_path / 'job.out'}", "--wrap", "sleep 600"],
                          timeout=60).stdout.strip()
        cluster.wait_running(job)
        deadline = time.monotonic() + 30
        while not cluster._step_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = cluster._step_processes()  # slurmstepd and the batch script's sleep
        assert left
    assert not [pid for pid in left if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"

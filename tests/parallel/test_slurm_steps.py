"""The rendezvous of Slurm steps on a real two-node cluster (:class:`dist_lora.testing.slurm.TwoNodeSlurm`).

One job holds both nodes (2 tasks each); its batch script first runs a launcher without srun.
Then steps run inside it at once (``srun --jobid --overlap``): a step on part of the allocation,
two steps side by side (one named by ``MASTER_ADDR=<ip>``, one keeping its store up), and the bad
inputs: an unresolvable and an unreachable ``MASTER_ADDR``, a second step on the port the first
one serves, ``SLURM_NTASKS`` and ``SLURM_STEP_NODELIST`` that do not match the step.
Each bad input must end its step within seconds with a message naming the setting, while the
collective timeout is 600 s (a wait for it would fail the test by its own deadline).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_lora.parallel.slurm_env import PORT_RANGE, ephemeral_ports
from dist_lora.testing import slurm

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "parallel" / "rendezvous_probe.py"
FAST_S = 60  # a bad input must end its step well within this (the timeout is 600 s)

STEPS = {  # name: (srun options, command prefix); "holder" keeps its store up for "intruder"
    "holder": (["-N2", "-n2"], []),
    "part": (["-N1", "-r1", "-n2"], []),
    "by_address": (["-N2", "-n2", "--export=ALL,MASTER_ADDR=10.77.0.2"], []),
    "unresolvable": (["-N2", "-n2", "--export=ALL,MASTER_ADDR=nosuchhost"], []),
    "unreachable": (["-N2", "-n2", "--export=ALL,MASTER_ADDR=10.77.0.99"], []),
    "ntasks": (["-N1", "-n1"], ["env", "SLURM_NTASKS=3"]),
    "nodelist": (["-N1", "-n1"], ["env", "SLURM_STEP_NODELIST=node[3-4]"]),
}


def _records(out: Path, name: str) -> dict[int, dict]:
    return {int(r["procid"]): r for r in (json.loads(p.read_text()) for p in out.glob(f"{name}.*.json"))}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    reason = slurm.available(hosts=True)
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("slurm_steps")
    python = sys.executable
    with slurm.TwoNodeSlurm(out / "cluster") as cluster:
        env = dict(cluster.env, DIST_LORA_TIMEOUT_S="600", OMP_NUM_THREADS="1")
        script = out / "job.sh"
        script.write_text(f"#!/bin/sh\n{python} {PROBE} {out} nostep > {out}/nostep.log 2>&1\n"
                          f"echo $? > {out}/nostep.rc\nsleep 900\n")
        submitted = cluster.run(["sbatch", "--parsable", "-N2", "--ntasks-per-node=2", "-o", str(out / "job.out"),
                                 str(script)], env=env, cwd=ROOT, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        cluster.wait_running(job)
        procs = {}

        def step(name, options, prefix, extra_env=None):
            cmd = ["srun", f"--jobid={job}", "--overlap", *options, *prefix, python, str(PROBE), str(out), name]
            procs[name] = subprocess.Popen(cluster.command(cmd + (["300"] if name == "holder" else [])),
                                           env=dict(env, **(extra_env or {})), cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)

        for name, (options, prefix) in STEPS.items():
            step(name, options, prefix)
        deadline = time.monotonic() + 240
        while not (out / "holder.ready").exists():
            if procs["holder"].poll() is not None or time.monotonic() > deadline:
                procs["holder"].kill()
                pytest.fail(f"the holder step never got up:\n{procs['holder'].communicate()[0][-3000:]}")
            time.sleep(0.2)
        step("intruder", ["-N2", "-n2"], [], {"MASTER_PORT": (out / "holder.ready").read_text()})
        results = {}
        for name in ["intruder", *STEPS]:
            log, _ = procs[name].communicate(timeout=max(1.0, deadline + 120 - time.monotonic()))
            results[name] = {"rc": procs[name].returncode, "log": log, "ranks": _records(out, name)}
            if name == "intruder":
                (out / "holder.release").touch()
        while not (out / "nostep.rc").exists():
            assert time.monotonic() < deadline, "the batch script's launcher did not end"
            time.sleep(0.2)
        results["nostep"] = {"rc": int((out / "nostep.rc").read_text()), "log": (out / "nostep.log").read_text(),
                             "ranks": _records(out, "nostep")}
        cluster.run(["scancel", job], env=env, timeout=30)
    return results


def _ok(result: dict, ranks: int = 2) -> list[dict]:
    assert result["rc"] == 0, result["log"][-3000:]
    rows = [result["ranks"][r] for r in sorted(result["ranks"])]
    assert len(rows) == ranks and all(row["total"] == ranks * (ranks + 1) / 2 for row in rows), rows
    return rows


def _refused(result: dict, *needles: str, ranks: int = 2) -> None:
    """Every rank stopped by itself within seconds, with a message containing ``needles``."""
    assert result["rc"] != 0 and len(result["ranks"]) == ranks, result["log"][-3000:]
    for row in result["ranks"].values():
        assert all(n in row.get("error", "") for n in needles), (needles, row, result["log"][-2000:])
        assert row["seconds"] < FAST_S, row


def test_a_step_on_part_of_the_allocation_meets_on_its_own_first_node(outcome):
    rows = _ok(outcome["part"])
    assert {r["host"] for r in rows} == {"node2"} and rows[0]["master_addr"] == "node2"


def test_two_steps_at_once_get_their_own_ports_outside_the_ephemeral_range(outcome):
    a, b = _ok(outcome["holder"]), _ok(outcome["part"])
    assert {r["host"] for r in a} == {"node1", "node2"}
    ports = {a[0]["master_port"], b[0]["master_port"]}
    assert len(ports) == 2 and all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports), ports
    ephemeral = ephemeral_ports()
    assert ephemeral is None or all(not ephemeral[0] <= p <= ephemeral[1] for p in ports), (ports, ephemeral)


def test_gloo_is_bound_to_the_bridge_although_each_host_resolves_its_name_to_loopback(outcome):
    rows = _ok(outcome["holder"])  # node1 resolves node1 (MASTER_ADDR) to 127.0.1.1
    assert {r["gloo_ifname"] for r in rows} == {"eth0"}, rows


def test_master_addr_as_an_ip_address_needs_no_name_resolution(outcome):
    rows = _ok(outcome["by_address"])
    assert rows[0]["master_addr"] == "10.77.0.2"


def test_a_launcher_outside_any_step_is_refused_at_once(outcome):
    _refused(outcome["nostep"], "SLURM_NTASKS=4", "not in a job step", "srun", ranks=1)


def test_an_unresolvable_master_addr_is_named_with_the_fix(outcome):
    _refused(outcome["unresolvable"], "MASTER_ADDR=nosuchhost", "does not resolve", "/etc/hosts")


def test_an_unreachable_master_addr_fails_within_seconds(outcome):
    result = outcome["unreachable"]
    _refused(result, "MASTER_ADDR=10.77.0.99")
    assert "not an address of this host" in result["ranks"][0]["error"]
    assert "unreachable" in result["ranks"][1]["error"] or "does not answer" in result["ranks"][1]["error"]


def test_a_port_served_by_another_step_is_refused_on_both_ranks(outcome):
    port = _ok(outcome["holder"])[0]["master_port"]
    result = outcome["intruder"]
    _refused(result, f"MASTER_PORT={port}")
    assert "already in use" in result["ranks"][0]["error"]
    assert "belongs to slurm job" in result["ranks"][1]["error"]  # and did not join the holder's group


def test_slurm_ntasks_that_is_not_the_steps_is_named(outcome):
    _refused(outcome["ntasks"], "SLURM_NTASKS=3", "SLURM_STEP_NUM_TASKS=1", ranks=1)


def test_a_step_node_list_the_job_does_not_have_is_named(outcome):
    _refused(outcome["nodelist"], "SLURM_STEP_NODELIST=node[3-4]", "node3, node4", "which the job does not have",
             ranks=1)

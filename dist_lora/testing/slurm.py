"""A real one-node Slurm on loopback for integration tests (Debian's slurm-wlm + munge).

``LoopbackSlurm`` writes a minimal ``slurm.conf`` into a scratch directory (free ports, no
accounting, ``proctrack/linuxproc``, ``select/cons_tres`` over this machine's CPUs), starts
``munged`` (as user munge), ``slurmctld`` and ``slurmd -N localhost``, waits until the node is
idle, and stops exactly the daemons it started (by PID) on exit. ``available()`` says why it
cannot run where the packages are missing or we are not root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from dist_lora.parallel.launch_env import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "srun")


def available() -> str | None:
    """``None`` if a loopback Slurm can be started here, else the reason it cannot."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if not Path("/etc/munge/munge.key").exists():
        return "munge has no key (/etc/munge/munge.key)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LoopbackSlurm:
    def __init__(self, workdir: str | Path, cpus: int | None = None):
        self.dir = Path(workdir)
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))

    def _config(self) -> str:
        d = self.dir
        return "\n".join([
            "ClusterName=distlora", "SlurmctldHost=localhost(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "ReturnToService=2", "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""])

    def __enter__(self) -> "LoopbackSlurm":
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "slurm.conf").write_text(self._config())
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        self._start(["runuser", "-u", "munge", "--", _binary("munged"), "--foreground", "--force"])
        time.sleep(0.5)
        self._start([_binary("slurmctld"), "-D", "-i"])
        time.sleep(1.0)
        self._start([_binary("slurmd"), "-D", "-N", "localhost"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if "idle" in state:
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the loopback Slurm node never became idle; see {self.dir}/slurmctld.log and slurmd.log")

    def _start(self, cmd: list[str]) -> None:
        log = open(self.dir / f"{Path(cmd[-3] if cmd[0] == 'runuser' else cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

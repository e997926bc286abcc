"""Real Slurm clusters on this one machine for integration tests (Debian's slurm-wlm + munge).

Two shapes share the pieces here (a private ``munged``, the ``slurm.conf`` writer, daemons
started and stopped by PID):

- ``LoopbackSlurm``: one node, ``localhost`` on ``127.0.0.1``, daemons in the machine's own
  network (free ports);
- ``TwoNodeSlurm``: a controller host ``ctl`` and two compute hosts ``node1`` / ``node2``, each a
  network namespace on a private bridge (:mod:`dist_lora.testing.netns`); ``slurmctld`` runs on
  ``ctl``, one ``slurmd`` on each node, and client commands (``srun``, ``sbatch``) run on ``ctl``
  as on a login node. Tasks on a node see that node's network only, so a rendezvous that names
  the wrong host, or gloo bound to loopback, fails here as it would on real machines.

Both start one ``munged`` of their own (its socket in a directory of its own, shared by every
daemon and client through ``AuthInfo=socket=``), so they never touch a system munged or each
other. Both are context managers; ``start`` and ``stop`` are idempotent and ``stop`` stops
exactly the daemons started (by PID) and removes namespaces and files; ``start`` also clears what
an instance whose test process died left behind (its munged, namespaces and the daemons in them).
``available()`` says why a cluster cannot run where the packages are missing or we are not root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from dist_lora.parallel.launch_env import free_port
from dist_lora.testing import netns

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch")


def available(hosts: bool = False) -> str | None:
    """``None`` if a Slurm cluster (with ``hosts``: the two-node one) can start here, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if shutil.which("setpriv") is None:
        return "setpriv is missing (apt-get install util-linux); munged runs as user munge through it"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if not Path("/etc/munge/munge.key").exists():
        return "munge has no key (/etc/munge/munge.key)"
    return netns.available() if hosts else None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class _Daemons:
    """Processes started with their output in ``dir/<name>.out``, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: Sequence[str], env: dict) -> subprocess.Popen:
        with open(self.dir / f"{name}.out", "w") as log:
            proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


class _Munge:
    """A munged of our own: socket, PID, seed and log in ``/run/distlora-munge-<tag>`` (owned by munge)."""

    def __init__(self, tag: str):
        self.dir = Path(f"/run/distlora-munge-{tag}")
        self.socket = self.dir / "munge.socket"

    def start(self, daemons: _Daemons, env: dict) -> None:
        self.remove_stale()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o755, parents=True)
        shutil.chown(self.dir, "munge", "munge")
        d = self.dir
        daemons.start("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", _binary("munged"),
                                 "--foreground", "--force",
                                 f"--socket={self.socket}", f"--pid-file={d}/munged.pid", f"--seed-file={d}/seed",
                                 f"--log-file={d}/munged.log"], env)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.socket}; see {d}/munged.log")
            time.sleep(0.1)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def remove_stale() -> None:
        """Stop the munged (by the PID in its directory) and remove the munge and spool directories
        of instances whose creating process no longer runs."""
        for folder in [*Path("/run").glob("distlora-munge-*"), *Path("/run").glob("distlora-slurm-*")]:
            owner = folder.name.split("-")[2]
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            try:
                pid = int((folder / "munged.pid").read_text())
                if str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
            shutil.rmtree(folder, ignore_errors=True)


def slurm_conf(directory: Path, controller: tuple[str, str], nodes: Sequence[tuple[str, str]], cpus: int,
               munge_socket: Path, spool: Path, ports: tuple[int, int] = (6817, 6818),
               extra: Sequence[str] = ()) -> str:
    """A minimal ``slurm.conf``: no accounting, ``proctrack/linuxproc``, ``select/cons_tres`` over CPUs;
    ``controller`` and ``nodes`` are (name, address); per-node files use ``%n``. ``spool`` holds
    slurmstepd's Unix sockets, whose paths must stay under 108 bytes (so not below a test's tmp_path)."""
    d = directory
    names = ",".join(name for name, _ in nodes)
    return "\n".join([
        "ClusterName=distlora", f"SlurmctldHost={controller[0]}({controller[1]})", "SlurmUser=root",
        "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=2",
        "ReturnToService=2", "MpiDefault=none",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={spool}/%n",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.%n.log", *extra,
        *(f"NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN" for name, addr in nodes),
        f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP", ""])


class _Cluster:
    """What both shapes share: the work directory, munged, the daemons, waiting for idle nodes."""

    nodes: tuple[str, ...] = ()

    def __init__(self, workdir: str | Path, cpus: int | None = None):
        self.dir = Path(workdir).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))
        self.daemons = _Daemons(self.dir)
        tag = f"{os.getpid()}-{abs(hash(str(self.dir))) % 10 ** 6}"
        self.munge = _Munge(tag)
        self.spool = Path(f"/run/distlora-slurm-{tag}")
        self.started = False

    def _conf(self) -> str:
        raise NotImplementedError

    def _start_daemons(self) -> None:
        raise NotImplementedError

    def command(self, argv: Sequence[str]) -> list[str]:
        """A client command (``srun``, ``sbatch``, ``sinfo``...) as this cluster's users run it."""
        return list(argv)

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        return subprocess.run(self.command(argv), capture_output=True, text=True, **kwargs)

    def start(self):
        if self.started:
            return self
        self.stop()
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        try:
            self.munge.start(self.daemons, self.env)
            (self.dir / "slurm.conf").write_text(self._conf())
            self._start_daemons()
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (raises naming the logs to read)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30).stdout
            rows = dict(line.split()[:2] for line in state.splitlines() if line.strip())
            if all(rows.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes never became idle ({state.strip()!r}); see {self.dir}/*.log and *.out")

    def wait_running(self, job: str, timeout: float = 60) -> None:
        """Until job ``job`` runs (steps can then be started in it with ``srun --jobid``)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["squeue", "-h", "-j", job, "-o", "%T"], timeout=30).stdout.strip()
            if state == "RUNNING":
                return
            time.sleep(0.2)
        raise RuntimeError(f"job {job} is {state or 'gone'}, not running; see {self.dir}/slurmctld.log")

    def _step_processes(self) -> list[int]:
        """PIDs of the processes slurmd started for this cluster (slurmstepd and the tasks: they
        carry this cluster's SLURM_CONF), which outlive slurmd."""
        mine = f"SLURM_CONF={self.dir / 'slurm.conf'}".encode()
        daemons = {proc.pid for _, proc in self.daemons.procs}
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in daemons or int(proc.name) == os.getpid():
                continue
            try:
                if mine in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Cancel every job, stop the daemons and then whatever they left running, all by PID."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.daemons.procs):
            try:
                self.run(["scancel", "--full", "--user=root"], timeout=30)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(["squeue", "-h"], timeout=30).stdout.strip():
                    time.sleep(0.2)
            except subprocess.TimeoutExpired:
                pass  # the controller does not answer: the processes are killed below all the same
        self.daemons.stop()
        for pid in self._step_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.munge.remove()
        shutil.rmtree(self.spool, ignore_errors=True)
        self.started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LoopbackSlurm(_Cluster):
    """One node, ``localhost`` (127.0.0.1), daemons on free ports of this machine."""

    nodes = ("localhost",)

    def _conf(self) -> str:
        return slurm_conf(self.dir, ("localhost", "127.0.0.1"), [("localhost", "127.0.0.1")], self.cpus,
                          self.munge.socket, self.spool, ports=(free_port(), free_port()))

    def _start_daemons(self) -> None:
        conf = str(self.dir / "slurm.conf")
        self.daemons.start("slurmctld", [_binary("slurmctld"), "-D", "-c", "-f", conf], self.env)
        time.sleep(1.0)
        self.daemons.start("slurmd", [_binary("slurmd"), "-D", "-N", "localhost", "-f", conf], self.env)


class TwoNodeSlurm(_Cluster):
    """``ctl`` (slurmctld, clients) and compute hosts ``node1`` / ``node2`` in network namespaces.

    ``hosts`` is the :class:`~dist_lora.testing.netns.VirtualHosts` (``hosts.address[name]``,
    ``hosts.cut(name)`` / ``hosts.restore(name)``). ``extra`` lines go into ``slurm.conf``.
    """

    nodes = ("node1", "node2")

    def __init__(self, workdir: str | Path, cpus: int | None = None, extra: Sequence[str] = ()):
        super().__init__(workdir, cpus)
        self.cpus = max(2, self.cpus)
        self.extra = list(extra)
        self.hosts = netns.VirtualHosts(["ctl", *self.nodes], self.dir / "hosts",
                                        tag=f"{os.getpid()}x{abs(hash(str(self.dir))) % 10 ** 4}")

    def _conf(self) -> str:
        a = self.hosts.address
        return slurm_conf(self.dir, ("ctl", a["ctl"]), [(n, a[n]) for n in self.nodes], self.cpus,
                          self.munge.socket, self.spool, extra=self.extra)

    def _start_daemons(self) -> None:
        self.hosts.start()
        conf = str(self.dir / "slurm.conf")
        self.daemons.start("slurmctld", self.hosts.command("ctl", [_binary("slurmctld"), "-D", "-c", "-f", conf]),
                           self.env)
        time.sleep(1.0)
        for node in self.nodes:
            self.daemons.start(f"slurmd.{node}", self.hosts.command(node, [_binary("slurmd"), "-D", "-N", node,
                                                                           "-f", conf]), self.env)

    def command(self, argv: Sequence[str], host: str = "ctl") -> list[str]:
        return self.hosts.command(host, argv)

    def stop(self) -> None:
        super().stop()
        self.hosts.stop()

"""Several hosts on one machine: a network namespace per host, joined by a bridge (for tests).

``VirtualHosts(["ctl", "node1", "node2"])`` creates, for each host, a network namespace with one
interface ``eth0`` on a private subnet (``10.77.0.1``, ``.2``, ...; no default route, IPv6 off),
plugged into a Linux bridge that lives in a namespace of its own (the machine's own network is
never touched, so concurrent instances do not collide), and an ``/etc/hosts`` file per host
written as Debian writes it: the host's own name on ``127.0.1.1`` first, then every host on its
bridge address. So a host resolves its own name to loopback, as on a default installation; that
is what makes cross-host gloo pick the wrong interface unless it is told otherwise.

``command(host, argv)`` is ``argv`` run "on" that host: ``nsenter --net`` into the namespace,
then ``unshare --mount --uts`` to bind the host's hosts file over ``/etc/hosts`` and set its host
name. (``ip netns exec`` would remount ``/sys``, after which slurmd 22.05 stops with "No
filesystem mounted on /sys/fs/cgroup"; ``nsenter`` keeps the machine's ``/sys``.) Processes
started that way keep the namespace until they exit; stop them before :meth:`stop`.

``cut(host)`` / ``restore(host)`` take the host's link on the bridge down and up (a pulled cable:
packets are dropped, nothing is refused). Names carry ``tag`` (default: this process's PID):
:meth:`start` and :meth:`stop` are idempotent, and :func:`remove_stale` deletes what an instance
whose process died left behind. Needs root, ``ip`` (iproute2), ``nsenter`` and ``unshare``
(util-linux).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Sequence

PREFIX = "distlora"
SUBNET = "10.77.0"
_ENTER = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'


def available() -> str | None:
    """``None`` if namespaces can be made here, else the reason they cannot."""
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install iproute2 util-linux mount)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete the namespaces of instances whose creating process no longer runs, after killing the
    processes still inside them (by PID, from ``ip netns pids``: daemons a crashed test left)."""
    for name in _namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)(x\d+)?-.*", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "delete", name, check=False)


class VirtualHosts:
    """Hosts ``names`` (in order ``SUBNET.1``, ``.2``, ...) on one bridge; see the module docstring."""

    def __init__(self, names: Sequence[str], workdir: str | Path, tag: str | None = None):
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and non-empty, got {list(names)}")
        self.names = list(names)
        self.tag = tag or str(os.getpid())
        self.dir = Path(workdir)
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.switch = f"{PREFIX}{self.tag}-switch"
        self.netns = {name: f"{PREFIX}{self.tag}-{name}" for name in self.names}
        self.port = {name: f"port{i}" for i, name in enumerate(self.names)}  # bridge side, in the switch
        self.started = False

    def hosts_file(self, host: str) -> Path:
        return self.dir / f"hosts.{host}"

    def start(self) -> "VirtualHosts":
        if self.started:
            return self
        self.stop()  # whatever a failed start of the same tag left behind
        remove_stale()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for name in self.names:
                ns = self.netns[name]
                _ip("netns", "add", ns)
                _ip("-n", self.switch, "link", "add", self.port[name], "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _ip("-n", self.switch, "link", "set", self.port[name], "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "sh", "-c",
                                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"], check=False)
                others = "".join(f"{self.address[h]}\t{h}\n" for h in self.names)
                self.hosts_file(name).write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n{others}")
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as run on ``host`` (its network, its ``/etc/hosts``, its host name)."""
        if host not in self.netns:
            raise ValueError(f"unknown host {host!r}; hosts: {', '.join(self.names)}")
        return ["nsenter", f"--net=/run/netns/{self.netns[host]}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", _ENTER, str(self.hosts_file(host)), host, *argv]

    def cut(self, host: str) -> None:
        """Take ``host``'s link down: its packets are dropped from now on."""
        _ip("-n", self.switch, "link", "set", self.port[host], "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port[host], "up")

    def stop(self) -> None:
        """Delete the namespaces (and with them the veths and the bridge) and the hosts files."""
        existing = set(_namespaces())
        for ns in [*self.netns.values(), self.switch]:
            if ns in existing:
                _ip("netns", "delete", ns, check=False)
        for name in self.names:
            self.hosts_file(name).unlink(missing_ok=True)
        self.started = False

    def __enter__(self) -> "VirtualHosts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

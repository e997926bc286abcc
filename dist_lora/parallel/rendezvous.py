"""Where a job's ranks meet, checked before anyone waits there.

Before the process group starts, every rank resolves ``MASTER_ADDR`` (a name that does not
resolve fails at once, naming the fix), rank 0 checks that it is an address of its own host, and
the other ranks check that the host answers (a refused connection means "rank 0 not up yet" and
is retried; an unreachable or silent host fails within seconds). Rank 0 then serves the TCP store
(a port in use fails at once) and writes who the store belongs to (``token``: the Slurm job and
step, or a random one); a rank that reaches a store of another job or step, or of a job of
another size, stops instead of joining it.

Gloo binds each rank to an address that it announces to its peers; by default the one the host
name resolves to, which on a default Debian/Ubuntu installation is 127.0.1.1, unreachable from
other hosts. :func:`gloo_interface` names the interface that holds the address this host uses to
reach ``MASTER_ADDR`` (or, on rank 0's host, another host of the step), for ``GLOO_SOCKET_IFNAME``.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import ipaddress
import json
import socket
import struct
import time
from typing import Sequence

import torch.distributed as dist

from dist_lora.parallel.slurm_env import PORT_RANGE, LaunchError, ephemeral_ports

OWNER_KEY = "dist_lora/owner"
_SIOCGIFADDR = 0x8915
_PROBE_S = 5.0  # one connection attempt (longer than ARP's 3 s, so a missing host reports EHOSTUNREACH)
_SILENT_S = 10.0  # a host that neither answers nor refuses for this long is unreachable


def resolve(addr: str, origin: str) -> str:
    """The IPv4 address of ``addr`` (``origin`` says where the name came from, for the message)."""
    try:
        return socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as err:
        raise LaunchError(
            f"MASTER_ADDR={addr} ({origin}) does not resolve on {socket.gethostname()}: {err}. Make the rendezvous "
            f"host's name resolve on every node (DNS or /etc/hosts), or export MASTER_ADDR=<its IP address> for "
            f"every rank (srun --export=ALL,MASTER_ADDR=10.0.0.1 ...)") from None


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def is_local(ip: str) -> bool:
    """Whether ``ip`` is an address of this host (it can be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, 0))
            return True
        except OSError:
            return False


def source_address(ip: str) -> str | None:
    """The local address this host would send from to reach ``ip`` (``None``: no route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((ip, 9))
            return sock.getsockname()[0]
        except OSError:
            return None


def interface_of(ip: str) -> str | None:
    """The network interface that holds the IPv4 address ``ip``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def gloo_interface(master_ip: str, peers: Sequence[str] = ()) -> str | None:
    """The interface gloo should use: the one holding the address that reaches ``master_ip``; where
    that is loopback (rank 0's own host resolving its name to 127.0.x.x), the one that reaches the
    first of ``peers`` (other hosts of the job) that resolves. ``None`` when nothing better than
    loopback is known (gloo's default then applies)."""
    local = source_address(master_ip)
    if local is None or is_loopback(local):
        local = None
        for peer in peers:
            try:
                peer_ip = socket.getaddrinfo(peer, None, socket.AF_INET)[0][4][0]
            except OSError:
                continue
            candidate = source_address(peer_ip)
            if candidate is not None and not is_loopback(candidate):
                local = candidate
                break
    return interface_of(local) if local is not None else None


def check_master_is_here(addr: str, ip: str, origin: str) -> None:
    """Rank 0 serves the rendezvous: ``MASTER_ADDR`` must be an address of its host."""
    if not is_local(ip):
        raise LaunchError(
            f"rank 0 runs on {socket.gethostname()}, but MASTER_ADDR={addr} ({origin}) is {ip}, not an address of "
            f"this host: rank 0 serves the rendezvous, so MASTER_ADDR must name rank 0's host. Unset MASTER_ADDR "
            f"under srun (the first node of the step is used) or point it at rank 0's host")


def wait_reachable(addr: str, ip: str, port: int, deadline: float, origin: str) -> None:
    """Until something listens on ``ip:port``: retried while the host refuses (rank 0 not up yet),
    :class:`LaunchError` within seconds when the host is unreachable or silent."""
    silent_since = None
    while True:
        try:
            with socket.create_connection((ip, port), timeout=_PROBE_S):
                return
        except ConnectionRefusedError:
            silent_since = None
        except OSError as err:
            unreachable = err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL)
            silent_since = silent_since or time.monotonic()
            if unreachable or time.monotonic() - silent_since > _SILENT_S:
                why = "is unreachable" if unreachable else f"does not answer (no reply for {_SILENT_S:.0f} s)"
                raise LaunchError(
                    f"MASTER_ADDR={addr} ({origin}, {ip}) {why} from {socket.gethostname()}: {err}. Check that "
                    f"the host is up and reachable on port {port} from every node (firewall, network), or set "
                    f"MASTER_ADDR to an address of rank 0's host that the other nodes reach") from None
        if time.monotonic() > deadline:
            raise LaunchError(f"nothing listened on MASTER_ADDR={addr}:{port} ({origin}) before the timeout: rank 0 "
                              f"did not start its rendezvous (see its log)")
        time.sleep(0.2)


def _port_help(port: int, origin: str) -> str:
    ephemeral = ephemeral_ports()
    clash = (f"; it lies in this host's ephemeral range {ephemeral[0]}-{ephemeral[1]} "
             f"(/proc/sys/net/ipv4/ip_local_port_range), from which outgoing connections take ports"
             if ephemeral and ephemeral[0] <= port <= ephemeral[1] else "")
    return (f"MASTER_PORT={port} ({origin}) is already in use on {socket.gethostname()}{clash}. Another job or step "
            f"listens there: set MASTER_PORT to a free port (e.g. in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1}), or leave "
            f"it unset under srun (each step then gets a port of its own)")


def open_store(addr: str, port: int, rank: int, world_size: int, token: str, timeout_s: float,
               origin: str) -> dist.Store:
    """The job's TCP store, served by rank 0, after the checks of the module docstring."""
    ip = resolve(addr, origin)
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        check_master_is_here(addr, ip, origin)
        try:
            store = dist.TCPStore(addr, port, world_size, True, timeout=timeout, wait_for_workers=False)
        except dist.DistNetworkError as err:
            if "EADDRINUSE" in str(err) or "in use" in str(err):
                raise LaunchError(_port_help(port, origin)) from None
            raise
        store.set(OWNER_KEY, json.dumps({"token": token, "world_size": world_size}))
        return store
    wait_reachable(addr, ip, port, time.monotonic() + timeout_s, origin)
    store = dist.TCPStore(addr, port, world_size, False, timeout=timeout, wait_for_workers=False)
    try:
        store.wait([OWNER_KEY], datetime.timedelta(seconds=min(timeout_s, 30)))
    except dist.DistError:
        raise LaunchError(f"MASTER_ADDR={addr}:{port} ({origin}) is served by a program that is not a dist_lora "
                          f"rendezvous: {_port_help(port, origin)}") from None
    owner = json.loads(store.get(OWNER_KEY))
    if owner["token"] != token:
        raise LaunchError(f"the rendezvous on {addr}:{port} belongs to {owner['token']}, not to this {token}: "
                          f"{_port_help(port, origin)}")
    if owner["world_size"] != world_size:
        raise LaunchError(f"rank 0 of {token} expects {owner['world_size']} ranks, this rank {world_size}: the ranks "
                          f"were started with different world sizes (SLURM_NTASKS / WORLD_SIZE); start every rank "
                          f"with one launcher command")
    return store


def address_of(interface: str) -> str | None:
    """The IPv4 address of ``interface`` (the first of a comma-separated ``GLOO_SOCKET_IFNAME``)."""
    name = interface.split(",")[0].strip()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])

"""The checks before the process group starts, on this machine's loopback (one process, real TCP
stores and sockets); across hosts they run in tests/parallel/test_slurm_steps.py."""

from __future__ import annotations

import socket
import time

import pytest

from dist_lora.parallel import faults, rendezvous
from dist_lora.parallel.launch_env import LOOPBACK, LaunchError, free_port


def test_an_unresolvable_name_is_named_with_the_fix():
    with pytest.raises(LaunchError, match=r"MASTER_ADDR=no-such-host.invalid \(MASTER_ADDR\) does not resolve.*"
                                          r"/etc/hosts.*MASTER_ADDR=<its IP address>"):
        rendezvous.resolve("no-such-host.invalid", "MASTER_ADDR")


def test_rank_0_refuses_a_master_addr_of_another_host():
    rendezvous.check_master_is_here(LOOPBACK, LOOPBACK, "x")
    with pytest.raises(LaunchError, match=r"MASTER_ADDR=192.0.2.1 .* not an address of this host"):
        rendezvous.check_master_is_here("192.0.2.1", "192.0.2.1", "MASTER_ADDR")


def test_a_refusing_host_is_waited_for_until_the_deadline():
    port = free_port()
    began = time.monotonic()
    with pytest.raises(LaunchError, match=f"nothing listened on MASTER_ADDR={LOOPBACK}:{port}"):
        rendezvous.wait_reachable(LOOPBACK, LOOPBACK, port, time.monotonic() + 1.0, "test")
    assert 1.0 <= time.monotonic() - began < 5


def test_a_port_in_use_and_a_foreign_store_are_refused():
    port = free_port()
    store = rendezvous.open_store(LOOPBACK, port, 0, 2, "job A", 30, "MASTER_PORT")
    with pytest.raises(LaunchError, match=f"MASTER_PORT={port} \\(MASTER_PORT\\) is already in use"):
        rendezvous.open_store(LOOPBACK, port, 0, 2, "job B", 30, "MASTER_PORT")
    with pytest.raises(LaunchError, match=f"belongs to job A, not to this job B.*MASTER_PORT={port}"):
        rendezvous.open_store(LOOPBACK, port, 1, 2, "job B", 30, "MASTER_PORT")
    with pytest.raises(LaunchError, match="expects 2 ranks, this rank 3"):
        rendezvous.open_store(LOOPBACK, port, 1, 3, "job A", 30, "MASTER_PORT")
    client = rendezvous.open_store(LOOPBACK, port, 1, 2, "job A", 30, "MASTER_PORT")
    client.set("k", "v")
    assert store.get("k") == b"v"


def test_a_listener_that_is_not_a_store_is_refused():
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(LaunchError, match="already in use"):
            rendezvous.open_store(LOOPBACK, port, 0, 2, "job", 30, "MASTER_PORT")


def test_gloo_interface_holds_the_address_that_reaches_master():
    assert rendezvous.gloo_interface(LOOPBACK) is None  # nothing better than loopback is known
    assert rendezvous.interface_of(LOOPBACK) == "lo" and rendezvous.address_of("lo") == LOOPBACK


def test_failures_name_the_lost_rank_and_the_silent_peers(monkeypatch):
    monkeypatch.setattr(faults, "_table", [("node1", "127.0.0.1"), ("node2", "192.0.2.7"), ("node2", "192.0.2.7")])
    monkeypatch.setattr(faults, "_timeout_s", 20.0)
    lost = faults.describe(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [192.0.2.7]:4242. "
                                        "This is typically caused by a remote worker crashing."))
    assert lost.message.startswith("lost ranks 1, 2 on node2 (192.0.2.7): its process ended") and not lost.silent
    began = time.monotonic()
    silent = faults.describe(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms"))
    assert "within the job's timeout of 20 s" in silent.message and silent.silent == (1, 2)
    assert "peers not answering: ranks 1, 2 on node2 (192.0.2.7)" in silent.message
    assert time.monotonic() - began < 5
    assert faults.describe(ValueError("Timed out")) is None and faults.describe(RuntimeError("timeout=3")) is None

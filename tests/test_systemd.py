"""lasthop.systemd: the notify protocol against a fake NOTIFY_SOCKET (a unix
datagram socket this test reads, as systemd would), and the shipped unit."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lasthop.systemd import Notifier, unit_text


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def messages(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_ready_status_and_watchdog_reach_the_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.enabled and n.watchdog_every == 1.0
    n.ready("12 entries; 1 uplinks, 2 VM ports")
    assert messages(sock) == {
        "READY": "1",
        "STATUS": "12 entries; 1 uplinks, 2 VM ports",
        "MAINPID": str(os.getpid()),
    }
    n.status("13 entries")
    assert messages(sock) == {"STATUS": "13 entries"}
    n.watchdog(now=100.0)
    assert messages(sock) == {"WATCHDOG": "1"}
    n.watchdog(now=100.5)  # within half the interval: no ping
    n.watchdog(now=101.0)
    assert messages(sock) == {"WATCHDOG": "1"}
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # exactly two pings
    n.close()


def test_reloading_carries_the_monotonic_time(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    n.reloading()
    got = messages(sock)
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    n.close()


def test_an_abstract_socket_name_is_used_as_such() -> None:
    name = f"lasthop-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).send(ready=1)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_every is None
    assert n.send(ready=1) is False


def test_the_watchdog_of_another_process_is_not_ours() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_every is None


def test_the_unit_runs_the_agent_as_a_notify_service_that_reloads() -> None:
    """The unit's command lines are this install's `lasthop` with the config;
    Type=notify, the watchdog, ExecReload, restart on failure and hardening are set."""
    text = unit_text(Path("/etc/lasthop/x.toml"), "/opt/lh/bin/lasthop")
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
    assert lines["Type"] == "notify"
    assert lines["ExecStart"] == (
        "/opt/lh/bin/lasthop --log-format text --log-level info run --config /etc/lasthop/x.toml"
    )
    assert lines["ExecReload"] == "/opt/lh/bin/lasthop reload --config /etc/lasthop/x.toml"
    assert lines["Restart"] == "on-failure"
    assert int(lines["WatchdogSec"]) > 0
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "CapabilityBoundingSet"):
        assert key in lines
    assert "@" not in text.replace("@system-service", "")  # every placeholder filled

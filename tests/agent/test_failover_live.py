"""Instant fail-over end to end: a firewall fails over to a new MAC (its
MAC changes and, with arp_notify, the kernel announces the address from
the new one: a gratuitous ARP) while a connection the VM serves is idle;
the VM then speaks first, and its bytes reach the firewall's new MAC.

    fw (10.0.0.1, MAC A -> B) ── fw0 ┐            1. fw connects, sends "hello"
                                      br0 (host)   2. fw: MAC A -> B, gratuitous ARP
    vm (10.0.0.2, server)     ── vm0 ┘            3. vm sends "late": to A, or B?

Without follow_failover the entry still says A: the reply is sent to a MAC
no one has, and never arrives (the firewall never speaks again to re-learn
it). With it, the agent sees the announcement on fw0 and the reply goes to
B. On a hostile segment a MAC the allow-list does not name moves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agentlib import ROOT_MARKS, BridgedSite, Netns, Sandbox, lasthop, wait_for

pytestmark = ROOT_MARKS

NEW_MAC = "02:fa:00:00:01:0b"  # the firewall's standby unit
EVIL_MAC = "02:ba:d0:00:00:01"  # a host on the segment the allow-list does not name
QUIET_S = 3.0  # how long the negative cases listen for bytes that must not come

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
assert conn.recv(64) == b"hello"
print("accepted", flush=True)
sys.stdin.readline()  # the test says when: after the fail-over
conn.sendall(b"late")
print("sent", flush=True)
sys.stdin.readline()
"""

CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello")
print("connected", flush=True)
s.settimeout(float(sys.argv[3]))
try:
    print(s.recv(64).decode() or "closed", flush=True)
except TimeoutError:
    print("timeout", flush=True)
"""


def _spawn(ns: Netns, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


@pytest.fixture
def site(box: Sandbox) -> Iterator[BridgedSite]:
    s = BridgedSite(box)
    yield s
    s.close()


@pytest.mark.parametrize(
    ("follow", "announcer", "arrives"),
    [
        (False, NEW_MAC, False),
        (True, NEW_MAC, True),
        (True, EVIL_MAC, False),
    ],
    ids=["without-follow_failover", "follow_failover", "untrusted-announcer"],
)
def test_server_first_bytes_reach_the_new_mac(
    box: Sandbox, site: BridgedSite, follow: bool, announcer: str, arrives: bool
) -> None:
    config = box.logs / "failover.toml"
    config.write_text(
        "[[uplink]]\n"
        'name = "fw0"\n'
        f"allow_last_hops = {json.dumps([site.fw_mac, NEW_MAC])}\n"
        f"follow_failover = {'true' if follow else 'false'}\n"
        'firewall_addresses = ["10.0.0.1/32"]\n'
    )
    agent = box.agent("--config", str(config), "--bridge", "br0", netns=site.host)
    server = _spawn(site.vm, SERVER, str(site.PORT))
    client: subprocess.Popen[str] | None = None
    try:
        assert _line(server) == "listening"
        client = _spawn(
            site.fw, CLIENT, site.VM_IP, str(site.PORT), str(10.0 if arrives else QUIET_S)
        )
        assert _line(client) == "connected" and _line(server) == "accepted"
        wait_for(lambda: _entry_mac(site) == site.fw_mac)  # learned from MAC A
        site.fw.exec("sysctl", "-q", "-w", "net.ipv4.conf.eth0.arp_notify=1")
        site.fw.ip("link", "set", "eth0", "address", announcer)  # the announcement goes out
        log = agent.log
        if follow:  # the agent took the announcement (a move, or a refusal)
            word = "moved from" if arrives else "ignored an announcement"
            wait_for(lambda: word in log.read_text())
        assert server.stdin is not None
        server.stdin.write("go\n")
        server.stdin.flush()
        assert _line(server) == "sent"
        assert _line(client) == ("late" if arrives else "timeout")
        stats = json.loads(lasthop("stats", "--netns", site.host.name, "--json").stdout)
        assert stats["interfaces"]["vm0"].get("hop_followed", 0) == (1 if arrives else 0)
        if arrives:
            assert _entry_mac(site) == NEW_MAC
    finally:
        for proc in (server, client):
            if proc is not None:
                proc.kill()
                proc.wait()


def _entry_mac(site: BridgedSite) -> str | None:
    result = lasthop("show", "--netns", site.host.name, "--json")
    assert result.returncode == 0, result.stderr
    rows = [c for c in json.loads(result.stdout) if c["proto"] == "tcp" and c["dport"] == site.PORT]
    return rows[0]["mac"] if rows else None

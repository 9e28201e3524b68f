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

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

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


def _config(box: Sandbox, site: BridgedSite, *, follow: bool) -> Path:
    """fw0 an uplink whose allow-list names the firewall's MAC and NEW_MAC."""
    config = box.logs / "failover.toml"
    config.write_text(
        "[[uplink]]\n"
        'name = "fw0"\n'
        f"allow_last_hops = {json.dumps([site.fw_mac, NEW_MAC])}\n"
        f"follow_failover = {'true' if follow else 'false'}\n"
        'firewall_addresses = ["10.0.0.1/32"]\n'
    )
    return config


@contextlib.contextmanager
def _idle_connection(site: BridgedSite, *, arrives: bool) -> Iterator[Callable[[], None]]:
    """The firewall's TCP connection to the VM's server, its entry learned
    from the firewall's MAC, then idle. Yields *late*: the server sends its
    next bytes, and the client gets them (*arrives*) or times out; the VM
    port counted hop_followed once, or never."""
    server = _spawn(site.vm, SERVER, str(site.PORT))
    client: subprocess.Popen[str] | None = None
    try:
        assert _line(server) == "listening"
        client = _spawn(
            site.fw, CLIENT, site.VM_IP, str(site.PORT), str(10.0 if arrives else QUIET_S)
        )
        assert _line(client) == "connected" and _line(server) == "accepted"
        wait_for(lambda: _entry_mac(site) == site.fw_mac)  # learned from MAC A

        def late() -> None:
            assert server.stdin is not None and client is not None
            server.stdin.write("go\n")
            server.stdin.flush()
            assert _line(server) == "sent"
            assert _line(client) == ("late" if arrives else "timeout")
            stats = json.loads(lasthop("stats", "--netns", site.host.name, "--json").stdout)
            assert stats["interfaces"]["vm0"].get("hop_followed", 0) == (1 if arrives else 0)

        yield late
    finally:
        for proc in (server, client):
            if proc is not None:
                proc.kill()
                proc.wait()


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
    config = _config(box, site, follow=follow)
    agent = box.agent("--config", str(config), "--bridge", "br0", netns=site.host)
    with _idle_connection(site, arrives=arrives) as late:
        site.fw.exec("sysctl", "-q", "-w", "net.ipv4.conf.eth0.arp_notify=1")
        site.fw.ip("link", "set", "eth0", "address", announcer)  # the announcement goes out
        log = agent.log
        if follow:  # the agent took the announcement (a move, or a refusal)
            word = "moved from" if arrives else "ignored an announcement"
            wait_for(lambda: word in log.read_text())
        late()
        if arrives:
            assert _entry_mac(site) == NEW_MAC


def _entry_mac(site: BridgedSite) -> str | None:
    result = lasthop("show", "--netns", site.host.name, "--json")
    assert result.returncode == 0, result.stderr
    rows = [c for c in json.loads(result.stdout) if c["proto"] == "tcp" and c["dport"] == site.PORT]
    return rows[0]["mac"] if rows else None


# ---------------------------------------------------------------- the host's neighbour table
#
#   fw (10.0.0.1, MAC A -> B, no announcement) ── fw0 ┐
#                                                      br0 (host: ip neigh 10.0.0.1 -> B)
#   vm (10.0.0.2, server)                      ── vm0 ┘
#
# The firewall changes its MAC without a word on the wire (arp_notify off);
# only the host's neighbour table says where its address went.


@pytest.mark.parametrize(
    ("entry_mac", "arrives"),
    [(NEW_MAC, True), (EVIL_MAC, False)],
    ids=["trusted-mac", "untrusted-mac"],
)
def test_a_neighbour_entry_moves_the_hop_with_no_announcement(
    box: Sandbox, site: BridgedSite, entry_mac: str, arrives: bool
) -> None:
    """The host's neighbour entry for the firewall's address names a new MAC
    (here `ip neigh replace`; a host that asks learns it the same way): with
    no ARP or NA seen, the idle connection's next bytes go to the new MAC.
    An entry naming a MAC the allow-list does not name moves nothing."""
    config = _config(box, site, follow=True)
    # the owner before the agent starts: its seed dump reads it
    site.host.ip("neigh", "replace", site.FW_IP, "lladdr", site.fw_mac, "dev", "br0")
    agent = box.agent("--config", str(config), "--bridge", "br0", netns=site.host)
    with _idle_connection(site, arrives=arrives) as late:
        site.fw.exec("sysctl", "-q", "-w", "net.ipv4.conf.eth0.arp_notify=0")
        site.fw.ip("link", "set", "eth0", "address", entry_mac)  # silently
        site.host.ip("neigh", "replace", site.FW_IP, "lladdr", entry_mac, "dev", "br0")
        word = "moved from" if arrives else "ignored an entry of the host's neighbour table"
        wait_for(lambda: word in agent.log.read_text())
        assert "ignored an announcement of 10.0.0.1" not in agent.log.read_text()
        if arrives:
            assert "(entry of the host's neighbour table)" in agent.log.read_text()
        late()
        assert _entry_mac(site) == (NEW_MAC if arrives else site.fw_mac)


HOST_IP = "10.0.0.254"  # the host's own address on br0: its kernel resolves the firewall


def _neigh_state(site: BridgedSite) -> str:
    return site.host.ip("neigh", "show", site.FW_IP, "dev", "br0").strip()


def test_a_failed_neighbour_stops_its_entries_until_it_answers(box: Sandbox) -> None:
    """The firewall stops answering ARP; the host's neighbour entry for it
    goes FAILED: the VM's replies of its connections take the host's path
    (counted hop_unreachable, not redirected). It answers again, the entry
    is REACHABLE with the same MAC: its replies are redirected again."""
    site = BridgedSite(box)
    config = box.logs / "failover.toml"
    config.write_text(
        '[[uplink]]\nname = "fw0"\nfollow_failover = true\nfirewall_addresses = ["10.0.0.1/32"]\n'
    )
    site.host.ip("addr", "add", f"{HOST_IP}/24", "dev", "br0")
    # ask once, quickly: FAILED within a fraction of a second
    site.host.exec("sysctl", "-q", "-w", "net.ipv4.neigh.br0.retrans_time_ms=100")
    try:
        site.serve()
        agent = box.agent("--config", str(config), "--bridge", "br0", netns=site.host)
        port = site.exchange("udp", n=2)
    finally:
        site.close()  # the echo server: the VM's late answers below are ours
    site.keep_firewall_mac()

    def host_asks() -> None:
        site.host.exec("ping", "-c", "1", "-W", "1", site.FW_IP, check=False)

    host_asks()  # REACHABLE, A: the agent learns who owns the address
    wait_for(lambda: "REACHABLE" in _neigh_state(site) or "STALE" in _neigh_state(site))
    site.fw.ip("link", "set", "eth0", "arp", "off")  # the firewall stops answering
    site.host.ip("neigh", "flush", "dev", "br0")  # forgotten: nothing changes yet
    host_asks()  # INCOMPLETE, then FAILED (which the kernel may soon collect)
    wait_for(lambda: "does not answer" in agent.log.read_text())
    said = lasthop(
        "explain", "--netns", site.host.name, "udp", f"{site.FW_IP}:{port}",
        f"{site.VM_IP}:{site.PORT}", "--json",
    )  # fmt: skip
    assert said.returncode == 0, said.stderr
    assert json.loads(said.stdout)["hop_unreachable"] is True
    before = site.vm_counters()
    site.answer_late(port)
    wait_for(
        lambda: site.vm_counters().get("hop_unreachable", 0) == before.get("hop_unreachable", 0) + 1
    )
    assert site.vm_counters().get("redirected", 0) == before.get("redirected", 0)

    site.fw.ip("link", "set", "eth0", "arp", "on")
    host_asks()
    wait_for(lambda: "answers again" in agent.log.read_text())
    site.answer_late(port)
    wait_for(lambda: site.vm_counters().get("redirected", 0) == before.get("redirected", 0) + 1)
    assert site.vm_counters().get("hop_unreachable", 0) == before.get("hop_unreachable", 0) + 1

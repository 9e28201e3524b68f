"""An L3 uplink end to end: requests arrive over a tun link (a stand-in for a
WireGuard, GRE or IPsec peer: no Ethernet header), the VM's routing sends its
replies to its default gateway, a firewall that never saw the connection --
and lasthop sends them back into the tun link instead.

    peer ns                                  host ns (routed)
    (client 198.51.100.20)
      wg0 10.99.0.2 <== TunLink ==> wg0 10.99.0.1 [lh_uplink_l3]
                                    vm1 192.0.2.1 [lh_vmport] --veth-- vm ns: 192.0.2.11 (echo)
                                    fw0 10.98.0.1 [lh_uplink] --veth-- fw ns (drops)
                                    route 198.51.100.0/24 via fw0 (the VM's way out)

Without lasthop the echo dies at the firewall; with it, it comes back through
the tun link (TTL one less: the host routed it), v4 and v6.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from agentlib import tc_program
from lasthop.lab import runner
from lasthop.lab.namespaces import delete, existing, ip_batch, open_socket, run, sysctl
from lasthop.lab.tunlink import TunEnd, TunLink

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

PEER, HOST, VM, FW = "lhl3-peer", "lhl3-host", "lhl3-vm", "lhl3-fw"
ECHO_PORT = 7
CLIENT = {4: "198.51.100.20", 6: "2001:db8:100::20"}
VM_ADDR = {4: "192.0.2.11", 6: "2001:db8:2::11"}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def build() -> None:
    for ns in (PEER, HOST, VM, FW):
        ip_batch(None, [f"netns add {ns}"])
    ip_batch(None, [
        f"link add vm1 netns {HOST} type veth peer name eth0 netns {VM}",
        f"link add fw0 netns {HOST} type veth peer name eth0 netns {FW}",
    ])  # fmt: skip
    for ns in (PEER, HOST, VM, FW):
        sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
    sysctl(HOST, {
        "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
        # requests from the client arrive on wg0, yet the route back is via fw0
        "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
    })  # fmt: skip
    ip_batch(VM, [
        "link set lo up", "link set eth0 up",
        "addr add 192.0.2.11/24 dev eth0", "addr add 2001:db8:2::11/64 dev eth0 nodad",
        "route add default via 192.0.2.1", "route add default via 2001:db8:2::1",
    ])  # fmt: skip
    ip_batch(FW, ["link set lo up", "link set eth0 up", "addr add 10.98.0.2/30 dev eth0",
                  "addr add fd98::2/64 dev eth0 nodad"])  # fmt: skip
    ip_batch(HOST, [
        "link set lo up", "link set vm1 up", "link set fw0 up",
        "addr add 192.0.2.1/24 dev vm1", "addr add 2001:db8:2::1/64 dev vm1 nodad",
        "addr add 10.98.0.1/30 dev fw0", "addr add fd98::1/64 dev fw0 nodad",
        "route add 198.51.100.0/24 via 10.98.0.2", "route add 2001:db8:100::/64 via fd98::2",
    ])  # fmt: skip


def address_tun() -> None:
    sysctl(HOST, {"net.ipv4.conf.wg0.rp_filter": 0})
    ip_batch(HOST, ["link set wg0 up", "addr add 10.99.0.1/30 dev wg0",
                    "addr add fd99::1/64 dev wg0 nodad"])  # fmt: skip
    ip_batch(PEER, [
        "link set lo up", "link set wg0 up",
        "addr add 10.99.0.2/30 dev wg0", "addr add fd99::2/64 dev wg0 nodad",
        "addr add 198.51.100.20/32 dev lo", "addr add 2001:db8:100::20/128 dev lo nodad",
        "route add 192.0.2.0/24 dev wg0 src 198.51.100.20",
        "route add 2001:db8:2::/64 dev wg0 src 2001:db8:100::20",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def l3_lab() -> Iterator[TunLink]:
    leftover = [n for n in (PEER, HOST, VM, FW) if n in existing()]
    delete(leftover)
    link = TunLink(TunEnd(PEER, "wg0"), TunEnd(HOST, "wg0"))
    try:
        build()
        link.start()
        address_tun()
        yield link
    finally:
        link.stop()
        delete([PEER, HOST, VM, FW])


class Echo:
    """A UDP echo server inside the VM namespace (*ns*), both families."""

    def __init__(self, ns: str = VM) -> None:
        self.socks = []
        for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = open_socket(ns, family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, ECHO_PORT))
            s.settimeout(0.2)
            self.socks.append(s)
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(s,)) for s in self.socks]
        for t in self.threads:
            t.start()

    def _serve(self, s: socket.socket) -> None:
        while not self.done.is_set():
            try:
                data, peer = s.recvfrom(65535)  # whole, however large
            except TimeoutError:
                continue
            s.sendto(data, peer)

    def close(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join()
        for s in self.socks:
            s.close()


def echoed(
    family: int,
    tries: int = 20,
    port: int = 40001,
    *,
    ns: str = PEER,
    client: dict[int, str] = CLIENT,
    vm: dict[int, str] = VM_ADDR,
) -> bool:
    """Whether a UDP datagram from the client in *ns* (source *port*) to the
    VM comes back (up to *tries* datagrams of one connection, 0.25 s apart);
    by default the peer's client and this lab's VM."""
    s = open_socket(ns, AF[family], socket.SOCK_DGRAM)
    try:
        s.bind((client[family], port))
        s.settimeout(0.25)
        for i in range(tries):
            s.sendto(b"ping %d" % i, (vm[family], ECHO_PORT))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            if data.startswith(b"ping"):
                return True
        return False
    finally:
        s.close()


@pytest.mark.parametrize("family", [4, 6])
def test_replies_go_back_into_the_l3_link(l3_lab: TunLink, family: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without lasthop the VM's answer takes its route (the firewall, which
    drops it); with lasthop it goes back into the tun link it came from."""
    echo = Echo()
    try:
        assert not echoed(family, tries=4), "answered without lasthop: the lab proves nothing"
        argv = runner.lasthop_argv(
            "run", "--netns", HOST, "--uplink", "wg0", "--uplink", "fw0", "--vm-port", "vm1",
            "--routed",
        )  # fmt: skip
        agent = runner.AgentProcess(argv, tmp_path / "lasthop.log")
        agent.start()
        try:
            assert echoed(family), agent.stderr[-2000:]
            shown = json.loads(run(runner.lasthop_argv("show", "--netns", HOST, "--json")).stdout)
            mine = [e for e in shown if e["dst"] == VM_ADDR[family]]
            assert [e["uplink"] for e in mine] == ["wg0"]  # the last hop: the L3 link itself
        finally:
            agent.stop()
            run(runner.lasthop_argv("detach", "--netns", HOST))
    finally:
        echo.close()


def test_a_reload_adding_the_l3_link_loads_its_program(l3_lab: TunLink, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An agent started with Ethernet uplinks only has no lh_uplink_l3 loaded
    (the echo still dies at the firewall); `lasthop reload` with wg0 added
    loads it, attaches it to wg0, and the replies come back through it."""
    config = tmp_path / "lasthop.toml"
    base = '[[vm_port]]\nname = "vm1"\n'
    config.write_text(f'routed = true\n[[uplink]]\nname = "fw0"\n{base}')
    echo = Echo()
    try:
        argv = runner.lasthop_argv("run", "--config", str(config), "--netns", HOST)
        agent = runner.AgentProcess(argv, tmp_path / "lasthop.log")
        agent.start()
        try:
            # another connection than the one tried below: the VM port remembers this one
            assert not echoed(4, tries=4, port=40002), "answered without wg0: proves nothing"
            assert tc_program(HOST, "wg0") is None
            config.write_text(
                f'routed = true\n[[uplink]]\nname = "fw0"\n[[uplink]]\nname = "wg0"\n{base}'
            )
            run(runner.lasthop_argv("reload", "--netns", HOST))
            assert tc_program(HOST, "wg0") == "lh_uplink_l3"
            for family in (4, 6):
                assert echoed(family), agent.stderr[-2000:]
        finally:
            agent.stop()
            run(runner.lasthop_argv("detach", "--netns", HOST))
    finally:
        echo.close()

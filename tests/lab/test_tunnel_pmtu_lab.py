"""Every packet of a connection follows it through a VXLAN, an MPLS and an L3
uplink (issue 9, item 6), end to end: a large UDP answer that the VM's stack
fragments reaches the client whole (the later fragments, without ports, get
the first one's tunnel key, labels or link), and a path-MTU error from beyond
the firewall reaches the VM, whose next replies are smaller.

    overlay (VXLAN):  cl2 ── fw2 ─ vxlan fd00:ff::2 ─ sw ─ up0 ─ vx0 ─ br0 ── vm1
                       └ fw2's route to cl2: mtu 1280 (a narrower link beyond it)
    MPLS:             client ── ler0 ══ MplsPeer (narrow 1280) ══ Ether/MPLS ══ mpls0 ── vm1
    L3 (tun):         client ── wg0 ══ TunLink (narrow 1280) ══ wg0 ── vm1

    the path-MTU error's way back, each lab:
      narrow link ── "fragmentation needed" / "packet too big", quoting the VM's reply
        ──▶ uplink (inner frame / labels popped / L3 link) ── lh_uplink ──▶ vm1

The error is about a connection no VM port holds (a client's, learned): the
data path leaves it to the bridge or routing (`icmp_error_forwarded`), which
deliver it by address; for a service's connection it would send it to the
VM's port itself (tests/bpf/test_tunnel_frags.py). Each check fails without
its part: the VM's first 1400-byte reply through the narrow link is lost
(asserted), and only an error that reached the VM (its route cache then
holds the link's MTU, asserted) makes the next one fit.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_l3_lab import HOST as L3_HOST
from test_l3_lab import PEER as L3_PEER
from test_l3_lab import VM as L3_VM
from test_l3_lab import Echo, l3_lab  # noqa: F401  (a fixture, used by name)
from test_mpls_lab import CLIENT as MPLS_CLIENT
from test_mpls_lab import CLIENT_NS as MPLS_CLIENT_NS
from test_mpls_lab import CONFIG as MPLS_CONFIG
from test_mpls_lab import HOST as MPLS_HOST
from test_mpls_lab import LABELS, LER, mpls_lab  # noqa: F401  (a fixture, used by name)
from test_mpls_lab import VM as MPLS_VM
from test_mpls_lab import VM_ADDR as MPLS_VM_ADDR

from lasthop.lab import Lab, Plan, runner
from lasthop.lab.mplspeer import MplsPeer
from lasthop.lab.namespaces import eventually, ip_batch, open_socket, run
from lasthop.lab.plan import ECHO_PORT, FW_LAN
from lasthop.lab.pmtu import Narrow
from lasthop.lab.tunlink import TunLink

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
BIG = 4000  # a large UDP answer: three fragments on a 1500-byte link
FITS = 1400  # fits the VM's 1500-byte link, not the 1280-byte one beyond the firewall
NARROW_MTU = 1280
MPLS_MTU = 1600  # the host's MPLS link carries 1500-byte packets under labels
L3_CLIENT = {4: "198.51.100.20", 6: "2001:db8:100::20"}
L3_VM_ADDR = {4: "192.0.2.11", 6: "2001:db8:2::11"}
ROUTER = ("198.51.100.1", "2001:db8:100::1")  # the router in front of the narrow link


def udp_echo(
    ns: str, family: int, client: str, vm: str, size: int, tries: int = 5, port: int = 0
) -> bool:
    """Whether a UDP datagram of *size* bytes from *client* (in *ns*) to the
    VM's echo port comes back whole (one datagram of the same bytes), in up to
    *tries* sends 0.5 s apart."""
    payload = bytes(i % 251 for i in range(size))
    s = open_socket(ns, AF[family], socket.SOCK_DGRAM)
    try:
        s.bind((client, port))
        s.settimeout(0.5)
        for _ in range(tries):
            s.sendto(payload, (vm, ECHO_PORT))
            try:
                data, _ = s.recvfrom(65535)
            except TimeoutError:
                continue
            if data == payload:
                return True
        return False
    finally:
        s.close()


def path_mtu(ns: str, family: int, dst: str) -> int | None:
    """The MTU the VM's route cache holds toward *dst*, or None (none learned)."""
    out = run(["ip", "-n", ns, f"-{family}", "route", "get", dst]).stdout
    found = re.search(r"\bmtu (\d+)", out)
    return int(found.group(1)) if found else None


def forget_path_mtus(ns: str) -> None:
    """The VM's route cache emptied: the next test learns its own."""
    for family in (4, 6):
        run(["ip", "-n", ns, f"-{family}", "route", "flush", "cache"])


def stats_totals(ns: str) -> dict[str, int]:
    out = json.loads(run(runner.lasthop_argv("stats", "--netns", ns, "--json")).stdout)
    return out["totals"]  # type: ignore[no-any-return]


def errors_handled(totals: dict[str, int]) -> int:
    return totals.get("icmp_error_forwarded", 0) + totals.get("icmp_error_redirected", 0)


def narrow_path_works(ns: str, family: int, client: str, vm: str, vm_ns: str) -> None:
    """Through a narrow link: the VM's first reply that fits its own link
    (DF set) is lost, the router's error reaches the VM (its route cache holds
    the narrow MTU), and the next reply -- now in fragments -- arrives whole."""
    assert path_mtu(vm_ns, family, client) is None
    assert not udp_echo(ns, family, client, vm, FITS, tries=1), "fit through the narrow link"
    assert eventually(lambda: path_mtu(vm_ns, family, client) == NARROW_MTU, 5.0), run(
        ["ip", "-n", vm_ns, f"-{family}", "route", "get", client]
    ).stdout
    assert udp_echo(ns, family, client, vm, FITS)


# ---------------------------------------------------------------- the overlay (VXLAN)


@pytest.fixture
def overlay_lab(lab_name: str) -> Lab:
    return Lab.up(Plan(lab_name, overlay=True))


def test_fragments_and_path_mtu_through_the_overlay(overlay_lab: Lab) -> None:
    """cl1 (fw1: an IPv4 endpoint) and cl2 (fw2: an IPv6 endpoint, fw1's MAC):
    a 4000-byte UDP answer comes back whole, every fragment sent into vx0
    with its connection's tunnel key; then fw2's route to cl2 narrows to
    1280 bytes and its errors reach vm1 through the tunnel, v4 and v6."""
    plan = overlay_lab.plan
    vm = plan.vm(1)
    with runner.AgentRunner(plan):
        for n, family in ((1, 4), (2, 4), (2, 6)):
            cl = plan.client(n)
            assert udp_echo(cl.ns, family, cl.addr.of(family), vm.addr.of(family), BIG), (n, family)
        totals = runner.stats(plan)["totals"]
        assert totals["fragment_followed"] >= 3 and totals["encap_redirected"] > 0, totals
        fw, cl = plan.firewall(2), plan.client(2)
        ip_batch(fw.ns, [
            f"route replace {cl.addr.v4.rsplit('.', 1)[0]}.0/24 dev {FW_LAN} mtu {NARROW_MTU}",
            f"route replace {cl.addr.v6.rsplit(':', 1)[0]}:/64 dev {FW_LAN} metric 256 "
            f"mtu {NARROW_MTU}",
        ])  # fmt: skip
        for family in (4, 6):
            narrow_path_works(cl.ns, family, cl.addr.of(family), vm.addr.of(family), vm.ns)
        assert errors_handled(runner.stats(plan)["totals"]) >= 2


# ---------------------------------------------------------------- an L3 link (tun)


def _l3_agent(tmp_path: Path) -> runner.AgentProcess:
    argv = runner.lasthop_argv(
        "run", "--netns", L3_HOST, "--uplink", "wg0", "--uplink", "fw0", "--vm-port", "vm1",
        "--routed",
    )  # fmt: skip
    return runner.AgentProcess(argv, tmp_path / "lasthop.log")


@contextlib.contextmanager
def _serving(
    agent: runner.AgentProcess, host: str, vm: str, peer: TunLink | MplsPeer
) -> Iterator[runner.AgentProcess]:
    """*agent* started on *host*, an echo in *vm*; afterwards the peer's
    narrow link, the agent, its filters and pins, the echo and the path MTUs
    the VM learned are all gone."""
    echo = Echo(vm)
    try:
        agent.start()
        yield agent
    finally:
        peer.narrow = None
        agent.stop()
        run(runner.lasthop_argv("detach", "--netns", host))
        echo.close()
        forget_path_mtus(vm)


@pytest.fixture
def l3_agent(l3_lab: TunLink, tmp_path: Path) -> Iterator[runner.AgentProcess]:  # noqa: F811
    with _serving(_l3_agent(tmp_path), L3_HOST, L3_VM, l3_lab) as agent:
        yield agent


@pytest.mark.parametrize("family", [4, 6])
def test_a_large_answer_comes_back_through_the_l3_link_whole(
    l3_lab: TunLink,  # noqa: F811
    l3_agent: runner.AgentProcess,
    family: int,
) -> None:
    """The VM's fragments all go back into the tun link (TTL - 1), the later
    ones after the first: the client reassembles the 4000 bytes."""
    client, vm = L3_CLIENT[family], L3_VM_ADDR[family]
    assert udp_echo(L3_PEER, family, client, vm, BIG), l3_agent.stderr[-2000:]
    assert stats_totals(L3_HOST)["fragment_followed"] >= 2


@pytest.mark.parametrize("family", [4, 6])
def test_a_path_mtu_error_from_beyond_the_l3_link_reaches_the_vm(
    l3_lab: TunLink,  # noqa: F811
    l3_agent: runner.AgentProcess,
    family: int,
) -> None:
    l3_lab.narrow = Narrow(NARROW_MTU, ROUTER)
    narrow_path_works(L3_PEER, family, L3_CLIENT[family], L3_VM_ADDR[family], L3_VM)
    assert l3_lab.narrow.sent >= 1
    assert errors_handled(stats_totals(L3_HOST)) >= 1


# ---------------------------------------------------------------- MPLS


@pytest.fixture
def mpls_agent(mpls_lab: MplsPeer, tmp_path: Path) -> Iterator[runner.AgentProcess]:  # noqa: F811
    ip_batch(MPLS_HOST, [f"link set mpls0 mtu {MPLS_MTU}"])
    ip_batch(LER, [f"link set eth0 mtu {MPLS_MTU}"])
    config = tmp_path / "lasthop.toml"
    config.write_text(MPLS_CONFIG)
    agent = runner.AgentProcess(
        runner.lasthop_argv("run", "--config", str(config), "--netns", MPLS_HOST),
        tmp_path / "lasthop.log",
    )
    with _serving(agent, MPLS_HOST, MPLS_VM, mpls_lab):
        mpls_lab.received.clear()
        yield agent


@pytest.mark.parametrize("family", [4, 6])
def test_a_large_answer_comes_back_under_the_labels_whole(
    mpls_lab: MplsPeer,  # noqa: F811
    mpls_agent: runner.AgentProcess,
    family: int,
) -> None:
    """Every fragment of the VM's answer -- the later ones without ports --
    leaves under the request's labels (S and TTL right): the client
    reassembles the 4000 bytes."""
    client, vm = MPLS_CLIENT[family], MPLS_VM_ADDR[family]
    assert udp_echo(MPLS_CLIENT_NS, family, client, vm, BIG), mpls_agent.stderr[-2000:]
    assert len(mpls_lab.received) >= 3, mpls_lab.received
    assert {c.labels for c in mpls_lab.received} == {LABELS}
    assert all(c.ok for c in mpls_lab.received), mpls_lab.received
    assert stats_totals(MPLS_HOST)["fragment_followed"] >= 2


@pytest.mark.parametrize("family", [4, 6])
def test_a_path_mtu_error_from_beyond_the_label_edge_reaches_the_vm(
    mpls_lab: MplsPeer,  # noqa: F811
    mpls_agent: runner.AgentProcess,
    family: int,
) -> None:
    mpls_lab.narrow = Narrow(NARROW_MTU, ROUTER)
    narrow_path_works(MPLS_CLIENT_NS, family, MPLS_CLIENT[family], MPLS_VM_ADDR[family], MPLS_VM)
    assert mpls_lab.narrow.sent >= 1
    assert errors_handled(stats_totals(MPLS_HOST)) >= 1

"""Fixtures of the data-path tests: a private network namespace with veth
pairs for the ifindexes the programs see, the test build of the object
(LH_TRACE_REDIRECT), and a Datapath reset before each case.

BPF_PROG_TEST_RUN resolves ctx.ifindex in the caller's namespace, so every
test here runs inside the private namespace (entered per test, left after).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from packets import (
    IP_VM_1,
    MAC_SPARE,
    MAC_UPLINK_1,
    MAC_UPLINK_2,
    MAC_VM_1,
    MAC_VMPORT_1,
    MAC_VMPORT_2,
)

pytest.register_assert_rewrite("bpf.harness")


from .harness import Datapath, HopSlots, Iface  # noqa: E402

FRAG_TABLE_SIZE = 64  # lh_frags in the tests: small, so a flood of fragment ids overflows it

# name, MAC, role, counter slot (0: left unconfigured)
TOPOLOGY = (
    ("up1", MAC_UPLINK_1, 1, 1),
    ("up2", MAC_UPLINK_2, 1, 2),
    ("vm1", MAC_VMPORT_1, 2, 3),
    ("vm2", MAC_VMPORT_2, 2, 4),
    ("spare", MAC_SPARE, 0, 0),
)


def _disable_ipv6() -> None:
    """No router solicitations or MLD reports on the test links (run inside the netns)."""
    for conf in ("all", "default"):
        Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1")


class TestNetns:
    """A network namespace of our own, entered with enter()/leave()."""

    __test__ = False

    def __init__(self, name: str) -> None:
        from pyroute2 import netns

        self.name = name
        self._netns = netns
        netns.create(name)
        self.enter()
        try:
            _disable_ipv6()
        finally:
            self.leave()

    def enter(self) -> None:
        self._netns.pushns(self.name)

    def leave(self) -> None:
        self._netns.popns()

    def add_veths(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        """veth pairs (name, MAC), peers named <name>p, all up; returns name -> ifindex."""
        from pyroute2 import NetNS

        out = {}
        with NetNS(self.name) as ns:
            for name, mac in pairs:
                ns.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
                idx = ns.link_lookup(ifname=name)[0]
                peer = ns.link_lookup(ifname=f"{name}p")[0]
                ns.link("set", index=idx, address=mac, state="up")
                ns.link("set", index=peer, state="up")
                out[name], out[f"{name}p"] = idx, peer
        return out

    def route_vm1(self) -> None:
        """A routed host's view of VM 1: forwarding on, VM 1's address routed
        to vm1 with its guest's MAC as a permanent neighbour (what the fast
        path's bpf_fib_lookup checks on a routed host)."""
        import subprocess

        subprocess.run(
            ["ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
        )
        for cmd in (
            ["route", "add", f"{IP_VM_1}/32", "dev", "vm1"],
            ["neigh", "add", IP_VM_1, "lladdr", MAC_VM_1, "dev", "vm1", "nud", "permanent"],
        ):
            subprocess.run(["ip", "-n", self.name, *cmd], check=True)

    def del_links(self, names: list[str]) -> None:
        from pyroute2 import NetNS

        with NetNS(self.name) as ns:
            for name in names:
                for idx in ns.link_lookup(ifname=name):
                    ns.link("del", index=idx)

    def remove(self) -> None:
        self._netns.remove(self.name)


@pytest.fixture(scope="session")
def test_netns() -> Iterator[TestNetns]:
    ns = TestNetns(f"lh-test-{os.getpid()}")
    try:
        yield ns
    finally:
        ns.remove()


@pytest.fixture(scope="session")
def topology(test_netns: TestNetns) -> dict[str, Iface]:
    from lasthop import abi

    index = test_netns.add_veths([(name, mac) for name, mac, _, _ in TOPOLOGY])
    test_netns.route_vm1()
    return {
        name: Iface(name, index[name], mac, abi.Role(role), slot)
        for name, mac, role, slot in TOPOLOGY
    }


@pytest.fixture(scope="session")
def test_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The object built with the redirect trace (lh_trace[0] = last redirect target)."""
    from lasthop import build

    return build.build(
        tmp_path_factory.mktemp("bpf") / "lasthop-test.bpf.o", defines={"LH_TRACE_REDIRECT": "1"}
    )


@pytest.fixture(scope="session")
def loaded(test_object: Path, topology: dict[str, Iface]) -> Iterator[Datapath]:
    from lasthop.libbpf import BpfObject

    obj = BpfObject(
        test_object,
        pin_root=None,
        max_entries={
            "lh_conns4": 1024,
            "lh_pending4": 1024,
            "lh_conns": 1024,
            "lh_pending": 1024,
            "lh_frags": FRAG_TABLE_SIZE,
        },
    )
    try:
        yield Datapath(obj, topology)
    finally:
        obj.close()


@pytest.fixture
def dp(loaded: Datapath, test_netns: TestNetns) -> Iterator[Datapath]:
    """The data path, reset, with this test running inside the test namespace."""
    test_netns.enter()
    try:
        loaded.reset()
        yield loaded
    finally:
        test_netns.leave()


@pytest.fixture
def descs(dp: Datapath) -> Iterator[HopSlots]:
    """lh_hop_descs (tunnel and MPLS hops) by id, emptied before and after:
    Datapath.reset leaves it."""
    slots = HopSlots(dp.obj.map("lh_hop_descs"))
    slots.clear()
    yield slots
    slots.clear()

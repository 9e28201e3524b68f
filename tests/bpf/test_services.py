"""Services in the data path: a new connection to a virtual address gets a
VM from the service's Maglev table, keeps it for every later packet, and
moves only when its VM is down; a connection a VM opens brings the server's
replies back to that VM.

Each test checks the verdict, the redirect target, the exact bytes that
leave, the counters and the entry. Tables are written with
lasthop.services.write_table (the agent's swap) and the VM the data path
must choose is predicted with lasthop.maglev (the jhash2 mirror).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lasthop import abi
from lasthop.datapath import MAP_NAMES, Maps
from lasthop.services.lookup import read_table, write_table
from lasthop.services.maglev import Member, build_table, slot_of
from lasthop.services.manager import ServiceManager
from lasthop.services.model import HealthCheck, Service, ServiceVm
from packets import (
    IP6_CLIENT_B,
    IP_CLIENT_A,
    IP_CLIENT_B,
    MAC_FW_A,
    MAC_FW_B,
    MAC_UPLINK_1,
    MAC_VM_1,
    MAC_VM_2,
    PORT_CLIENT,
    PORT_DNS,
    PORT_HTTP,
    eth,
)

from .conftest import TestNetns
from .harness import (
    SLOT0,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    UPLINK,
    VMPORT,
    Datapath,
    Iface,
    Key,
    mac_bytes,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
HOP = abi.F_ENTRY_HOP_KNOWN
ORIGIN = abi.F_ENTRY_VM_ORIGIN

# The service: a virtual address the VMs hold on their loopback.
VIP = "192.0.2.100"
VIP6 = "2001:db8:2::100"
PORT_HTTPS = 443
MAC_VM_3 = "52:54:00:00:00:03"
MAC_VMPORT_3 = "02:00:00:00:02:03"
VM_MACS = {"vm1": MAC_VM_1, "vm2": MAC_VM_2, "vm3": MAC_VM_3}
POOL = ("vm1", "vm2", "vm3")
# Full proxy: a server behind the uplink that the VMs open connections to.
IP_SERVER = "203.0.113.50"
MAC_FW_S = "02:fa:00:00:00:5e"  # the firewall in front of the server network
PORT_PROXY_1 = 50001
PORT_PROXY_2 = 50002


# ---------------------------------------------------------------- frames


def svc4(
    sport: int = PORT_CLIENT, flags: str = "S", dport: int = PORT_HTTP, src: str = IP_CLIENT_B
) -> Packet:
    """A client's TCP packet to the virtual address, through firewall B, to the host."""
    return (
        eth(MAC_FW_B, MAC_UPLINK_1)
        / IP(src=src, dst=VIP, ttl=60)
        / TCP(sport=sport, dport=dport, flags=flags, seq=1000)
    )


def svc6_udp(sport: int = PORT_CLIENT) -> Packet:
    return (
        eth(MAC_FW_B, MAC_UPLINK_1)
        / IPv6(src=IP6_CLIENT_B, dst=VIP6, hlim=60)
        / UDP(sport=sport, dport=PORT_DNS)
        / b"query"
    )


def vip_reply(vm: str, sport: int = PORT_CLIENT) -> Packet:
    """The VM answers from the virtual address, to its own default gateway (firewall A)."""
    return (
        eth(VM_MACS[vm], MAC_FW_A)
        / IP(src=VIP, dst=IP_CLIENT_B)
        / TCP(sport=PORT_HTTP, dport=sport, flags="SA", seq=5000, ack=1001)
    )


def to_vm(frame: Packet, vm: str, *, routed: bool = False) -> Packet:
    """*frame* as it must leave for *vm*: destination MAC := the guest's; a routed
    host also puts its port's MAC as the source and takes one off the TTL."""
    out = Ether(bytes(frame))
    out[Ether].dst = VM_MACS[vm]
    if routed:
        out[Ether].src = {
            "vm1": "02:00:00:00:02:01",
            "vm2": "02:00:00:00:02:02",
            "vm3": MAC_VMPORT_3,
        }[vm]
        if IP in out:
            out[IP].ttl -= 1
            del out[IP].chksum
        else:
            out[IPv6].hlim -= 1
    return Ether(bytes(out))


def conn_key(frame: Packet) -> abi.ConnKey:
    return abi.ConnKey.from_buffer_copy(Key(frame).pack())


# ---------------------------------------------------------------- set-up


class Services:
    """The data path with three VM ports, and the service maps under test control."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.services = dp.obj.map("lh_services")
        self.maglev = dp.obj.map("lh_maglev")

    def clear(self) -> None:
        for key in list(self.services.keys()):
            self.services.delete(key)
        for sid in range(abi.MAX_SERVICES):
            self.maglev.delete(struct.pack("=I", sid))

    def reset(self, *, settings: int = abi.F_SET_SERVICES, routed: bool = False) -> None:
        self.dp.reset()
        self.clear()
        for vm in POOL:
            self.vm_port(vm, routed=routed)
        self.dp.set_settings(settings)

    def vm_port(self, vm: str, *, flags: int = 0, routed: bool = False) -> None:
        flags |= abi.F_IFACE_ROUTED if routed else 0
        self.dp.configure(vm, flags=flags, vm_mac=VM_MACS[vm])

    def service(
        self, sid: int, addr: str, table: list[int], *, proto: int = 0, port: int = 0
    ) -> None:
        """lh_services[(addr, proto, port)] = sid, with *table* swapped into lh_maglev[sid]."""
        write_table(self.maglev, sid, table)
        family = abi.FAMILY_V6 if ":" in addr else abi.FAMILY_V4
        key = abi.SvcKey(port=socket.htons(port), proto=proto, family=family)
        packed = socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
        ctypes.memmove(key.addr, packed.ljust(16, b"\0"), 16)
        self.services.update(bytes(key), bytes(abi.SvcInfo(id=sid)))

    def pool_table(self, *vms: str) -> list[int]:
        return build_table([Member(vm, self.ifindex(vm)) for vm in vms])

    def all_to(self, vm: str | None) -> list[int]:
        """A table that sends every connection to *vm* (None: no VM)."""
        return [self.ifindex(vm) if vm else 0] * abi.MAGLEV_SIZE

    def ifindex(self, name: str) -> int:
        return self.dp.ifaces[name].ifindex

    def name(self, ifindex: int) -> str | None:
        return self.dp.by_index.get(ifindex)

    def send(self, prog: str, iface: str, frame: Packet) -> Sent:
        before = self.dp.counter_values()
        self.dp.trace.update(struct.pack("=I", 0), struct.pack("=I", 0))
        run = self.dp.run(prog, bytes(frame), iface)
        after = self.dp.counter_values()
        deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        return Sent(run.retval, self.dp.redirected_to(), run.data, deltas)

    def entry(self, frame: Packet, *, reverse: bool = False) -> abi.ConnEntry | None:
        """The connection's entry, confirmed (lh_conns) or pending (lh_pending)."""
        key = Key(frame, reverse=reverse).pack()
        raw = self.dp.conns.lookup(key) or self.dp.pending.lookup(key)
        return abi.ConnEntry.from_buffer_copy(raw[: ctypes.sizeof(abi.ConnEntry)]) if raw else None

    def grant_vip(self, *vms: str) -> None:
        """The virtual address in lh_vm_addrs for *vms*, as the agent grants its pool members."""
        for vm in vms:
            self.dp.add_vm_addr(vm, VIP, abi.VmAddrOrigin.SERVICE)

    def vm_of(self, frame: Packet) -> str | None:
        e = self.entry(frame)
        assert e is not None, "no entry"
        return self.name(e.vm_ifindex) if e.vm_ifindex else None

    def manager(self, path: Path, *, walker: bool = True) -> ServiceManager:
        """The agent's manager on these maps; with *walker*, lh_svc_walk loaded
        (the agent's case), else none (an older agent's pins: it walks itself)."""
        maps = Maps({name: self.dp.obj.map(name) for name in MAP_NAMES})
        if walker:
            maps.svc_walker = self.dp.obj.program("lh_svc_walk")
        return ServiceManager("test", lambda: contextlib.nullcontext(maps), path=path)


class Sent:
    def __init__(
        self,
        verdict: int,
        redirect: str | None,
        data: bytes,
        counters: dict[tuple[str, abi.Counter], int],
    ) -> None:
        self.verdict, self.redirect, self.data, self.counters = verdict, redirect, data, counters

    def assert_to_vm(self, frame: Packet, vm: str, *, routed: bool = False) -> None:
        assert (self.verdict, self.redirect) == (TC_ACT_REDIRECT, vm)
        assert self.data == bytes(to_vm(frame, vm, routed=routed))


@pytest.fixture(scope="module")
def svc_dp(
    loaded: Datapath, test_netns: TestNetns, topology: dict[str, Iface]
) -> Iterator[Services]:
    """The shared data path plus a third VM port, vm3."""
    extra = {}
    if "vm3" not in topology:
        index = test_netns.add_veths([("vm3", MAC_VMPORT_3)])
        extra["vm3"] = Iface("vm3", index["vm3"], MAC_VMPORT_3, abi.Role.VM_PORT, 5)
    dp = Datapath(loaded.obj, {**topology, **extra})
    svc = Services(dp)
    try:
        yield svc
    finally:
        test_netns.enter()
        try:
            svc.clear()
            dp.set_settings(0)
        finally:
            test_netns.leave()
        if extra:
            test_netns.del_links(list(extra))


@pytest.fixture
def sv(svc_dp: Services, test_netns: TestNetns) -> Iterator[Services]:
    test_netns.enter()
    try:
        svc_dp.reset()
        yield svc_dp
    finally:
        svc_dp.clear()
        test_netns.leave()


# ---------------------------------------------------------------- selection


def test_a_new_connection_gets_the_vm_the_table_names(sv: Services) -> None:
    """SYN to the virtual address: the VM in slot jhash(key) % 65537, dst MAC := the guest's."""
    table = sv.pool_table(*POOL)
    sv.service(0, VIP, table, proto=socket.IPPROTO_TCP, port=PORT_HTTP)
    frame = svc4()
    vm = sv.name(table[slot_of(conn_key(frame))])
    assert vm is not None
    sent = sv.send(UPLINK, "up1", frame)
    sent.assert_to_vm(frame, vm)
    assert sent.counters == {("up1", C.LEARNED): 1, ("up1", C.SVC_SELECTED): 1}
    e = sv.entry(frame)
    assert e is not None
    assert (sv.name(e.vm_ifindex), sv.name(e.ifindex), bytes(e.mac), e.flags) == (
        vm,
        "up1",
        mac_bytes(MAC_FW_B),
        HOP,
    )


def test_the_agents_prediction_matches_the_data_path_for_many_keys(sv: Services) -> None:
    """For 300 connections the data path picks exactly the VM lasthop.maglev predicts."""
    table = sv.pool_table(*POOL)
    sv.service(0, VIP, table, proto=socket.IPPROTO_TCP, port=PORT_HTTP)
    chosen = set()
    for sport in range(20000, 20300):
        frame = svc4(sport=sport)
        vm = sv.name(table[slot_of(conn_key(frame))])
        sent = sv.send(UPLINK, "up1", frame)
        assert (sent.verdict, sent.redirect) == (TC_ACT_REDIRECT, vm), f"sport {sport}"
        chosen.add(vm)
    assert chosen == set(POOL)


def test_routed_host_rewrites_source_mac_and_ttl(sv: Services) -> None:
    """Routed: source MAC := the VM port's, TTL - 1 with the checksum patched."""
    sv.reset(routed=True)
    sv.service(0, VIP, sv.all_to("vm2"))
    frame = svc4()
    sent = sv.send(UPLINK, "up1", frame)
    sent.assert_to_vm(frame, "vm2", routed=True)


def test_ipv6_udp_service(sv: Services) -> None:
    """An IPv6 UDP service: the datagram goes to the VM its table names."""
    table = sv.pool_table(*POOL)
    sv.service(3, VIP6, table, proto=socket.IPPROTO_UDP, port=PORT_DNS)
    frame = svc6_udp()
    vm = sv.name(table[slot_of(conn_key(frame))])
    assert vm is not None
    sent = sv.send(UPLINK, "up1", frame)
    sent.assert_to_vm(frame, vm)
    assert sent.counters == {("up1", C.LEARNED): 1, ("up1", C.SVC_SELECTED): 1}


def test_lookup_prefers_port_then_protocol_then_address(sv: Services) -> None:
    """(addr, tcp, 80) beats (addr, tcp, any) beats (addr, any, any)."""
    sv.service(0, VIP, sv.all_to("vm1"), proto=socket.IPPROTO_TCP, port=PORT_HTTP)
    sv.service(1, VIP, sv.all_to("vm2"), proto=socket.IPPROTO_TCP)
    sv.service(2, VIP, sv.all_to("vm3"))
    assert sv.send(UPLINK, "up1", svc4(dport=PORT_HTTP)).redirect == "vm1"
    assert sv.send(UPLINK, "up1", svc4(dport=PORT_HTTPS)).redirect == "vm2"
    udp = eth(MAC_FW_B, MAC_UPLINK_1) / IP(src=IP_CLIENT_B, dst=VIP) / UDP(sport=5, dport=PORT_HTTP)
    assert sv.send(UPLINK, "up1", udp).redirect == "vm3"
    echo = eth(MAC_FW_B, MAC_UPLINK_1) / IP(src=IP_CLIENT_B, dst=VIP) / ICMP(id=9, seq=1)
    assert sv.send(UPLINK, "up1", echo).redirect == "vm3"


def test_services_are_not_looked_up_without_the_settings_flag(sv: Services) -> None:
    """F_SET_SERVICES clear: a packet to the address is learned and passed as any other."""
    sv.reset(settings=0)
    sv.service(0, VIP, sv.all_to("vm1"))
    frame = svc4()
    sent = sv.send(UPLINK, "up1", frame)
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_OK, None, bytes(frame))
    assert sent.counters == {("up1", C.LEARNED): 1}
    assert sv.vm_of(frame) is None


def test_the_reply_goes_back_to_the_last_hop(sv: Services) -> None:
    """The chosen VM answers to its own gateway (firewall A): the reply leaves to firewall B."""
    sv.service(0, VIP, sv.all_to("vm2"))
    sv.send(UPLINK, "up1", svc4())
    reply = vip_reply("vm2")
    sent = sv.send(VMPORT, "vm2", reply)
    expected = Ether(bytes(reply))
    expected[Ether].dst = MAC_FW_B
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_REDIRECT, "up1", bytes(expected))
    assert sent.counters == {("vm2", C.REDIRECTED): 1}


# ---------------------------------------------------------------- pinning


def test_later_packets_follow_the_entry_not_the_table(sv: Services) -> None:
    """After the pool changes, an established connection stays with its VM."""
    sv.service(0, VIP, sv.all_to("vm1"))
    sv.send(UPLINK, "up1", svc4())
    write_table(sv.maglev, 0, sv.all_to("vm3"))  # the pool changed: vm1 is out
    ack = svc4(flags="A")
    sent = sv.send(UPLINK, "up1", ack)
    sent.assert_to_vm(ack, "vm1")
    assert sent.counters == {("up1", C.REFRESHED): 1, ("up1", C.SVC_PINNED): 1}
    # while a new connection follows the new table
    assert sv.send(UPLINK, "up1", svc4(sport=PORT_CLIENT + 1)).redirect == "vm3"


def test_the_swap_replaces_the_whole_table(sv: Services) -> None:
    """write_table swaps a complete new table in: reading it back gives every slot."""
    table = sv.pool_table(*POOL)
    sv.service(7, VIP, sv.all_to(None))
    write_table(sv.maglev, 7, table)
    assert read_table(sv.maglev, 7) == table


# ---------------------------------------------------------------- no VM, VM down


def test_no_backend_passes_and_remembers_nothing(sv: Services) -> None:
    """No healthy VM: the packet passes unchanged and no entry is made, so a
    retransmitted SYN gets a VM once one is back."""
    sv.service(0, VIP, sv.all_to(None))
    frame = svc4()
    sent = sv.send(UPLINK, "up1", frame)
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_OK, None, bytes(frame))
    assert sent.counters == {("up1", C.SVC_NO_BACKEND): 1}
    assert sv.entry(frame) is None
    write_table(sv.maglev, 0, sv.all_to("vm2"))
    sv.send(UPLINK, "up1", frame).assert_to_vm(frame, "vm2")


def test_a_down_vms_connection_is_reassigned(sv: Services) -> None:
    """VM down (F_IFACE_VM_DOWN): its connection moves to the table's choice now."""
    sv.service(0, VIP, sv.all_to("vm2"))
    sv.send(UPLINK, "up1", svc4())
    write_table(sv.maglev, 0, sv.all_to("vm3"))  # the agent takes vm2 out first ...
    sv.vm_port("vm2", flags=abi.F_IFACE_VM_DOWN)  # ... then marks it down
    ack = svc4(flags="A")
    sent = sv.send(UPLINK, "up1", ack)
    sent.assert_to_vm(ack, "vm3")
    assert sent.counters == {("up1", C.REFRESHED): 1, ("up1", C.SVC_REASSIGNED): 1}
    assert sv.vm_of(ack) == "vm3"
    # and stays there
    assert sv.send(UPLINK, "up1", ack).counters[("up1", C.SVC_PINNED)] == 1


def test_a_down_vms_connection_is_dropped_with_on_vm_down_drop(sv: Services) -> None:
    """on_vm_down = "drop": packets of a down VM's connection are dropped, the entry kept."""
    sv.reset(settings=abi.F_SET_SERVICES | abi.F_SET_VM_DOWN_DROP)
    sv.service(0, VIP, sv.all_to("vm2"))
    sv.send(UPLINK, "up1", svc4())
    write_table(sv.maglev, 0, sv.all_to("vm3"))
    sv.vm_port("vm2", flags=abi.F_IFACE_VM_DOWN)
    sent = sv.send(UPLINK, "up1", svc4(flags="A"))
    assert (sent.verdict, sent.redirect) == (TC_ACT_SHOT, None)
    assert sent.counters == {("up1", C.REFRESHED): 1, ("up1", C.SVC_DROPPED): 1}
    assert sv.vm_of(svc4()) == "vm2"


def test_a_down_vm_with_no_vm_left_keeps_its_entry_for_later(sv: Services) -> None:
    """VM down and no VM left: the packet passes, and the entry still names the
    down VM, so a later packet is reassigned once a VM is back."""
    sv.service(0, VIP, sv.all_to("vm2"))
    sv.send(UPLINK, "up1", svc4())
    write_table(sv.maglev, 0, sv.all_to(None))
    sv.vm_port("vm2", flags=abi.F_IFACE_VM_DOWN)
    ack = svc4(flags="A")
    sent = sv.send(UPLINK, "up1", ack)
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_OK, None, bytes(ack))
    assert sent.counters == {("up1", C.REFRESHED): 1, ("up1", C.SVC_NO_BACKEND): 1}
    assert sv.vm_of(ack) == "vm2"
    write_table(sv.maglev, 0, sv.all_to("vm1"))
    sent = sv.send(UPLINK, "up1", ack)
    sent.assert_to_vm(ack, "vm1")
    assert sent.counters[("up1", C.SVC_REASSIGNED)] == 1


def test_a_vm_port_without_a_known_guest_mac_passes(sv: Services) -> None:
    """The guest's MAC is not known yet: nothing to address the frame to, so it passes."""
    sv.dp.configure("vm2")  # no vm_mac
    sv.service(0, VIP, sv.all_to("vm2"))
    frame = svc4()
    sent = sv.send(UPLINK, "up1", frame)
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_OK, None, bytes(frame))
    assert sent.counters == {("up1", C.LEARNED): 1, ("up1", C.MISS): 1}


def test_the_guest_mac_is_learned_from_its_first_packet(sv: Services) -> None:
    """lh_vmport learns the guest's MAC from what it sends from an address its
    port owns (the agent grants a pool member the service's address); then
    service traffic reaches it."""
    sv.dp.configure("vm2")
    sv.dp.add_vm_addr("vm2", VIP, abi.VmAddrOrigin.SERVICE)
    sv.send(VMPORT, "vm2", vip_reply("vm2", sport=1))
    sv.service(0, VIP, sv.all_to("vm2"))
    frame = svc4()
    sv.send(UPLINK, "up1", frame).assert_to_vm(frame, "vm2")


# ---------------------------------------------------------------- full proxy


def proxy_syn(vm: str, sport: int) -> Packet:
    """A full-proxy VM opens its own connection to the server, from the shared virtual address."""
    return (
        eth(VM_MACS[vm], MAC_FW_A)
        / IP(src=VIP, dst=IP_SERVER)
        / TCP(sport=sport, dport=PORT_HTTP, flags="S", seq=7000)
    )


def server_reply(sport: int, flags: str = "SA") -> Packet:
    """The server's answer, through the server-side firewall, to the host."""
    return (
        eth(MAC_FW_S, MAC_UPLINK_1)
        / IP(src=IP_SERVER, dst=VIP)
        / TCP(sport=PORT_HTTP, dport=sport, flags=flags, seq=9000, ack=7001)
    )


def test_full_proxy_vms_sharing_one_address_each_get_their_servers_replies(sv: Services) -> None:
    """Two VMs open connections from the same address: each server reply goes
    to the VM that opened its connection, and the VM's next packet goes back
    the way the reply came (its ACK of the SYN-ACK confirms the connection)."""
    sv.grant_vip("vm1", "vm2")
    for vm, sport in (("vm1", PORT_PROXY_1), ("vm2", PORT_PROXY_2)):
        syn = proxy_syn(vm, sport)
        sent = sv.send(VMPORT, vm, syn)
        assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_OK, None, bytes(syn))
        assert sent.counters == {(vm, C.VM_ORIGIN_LEARNED): 1}
        e = sv.entry(syn, reverse=True)
        assert e is not None and (sv.name(e.vm_ifindex), e.flags) == (vm, ORIGIN)
    for vm, sport in (("vm2", PORT_PROXY_2), ("vm1", PORT_PROXY_1)):
        reply = server_reply(sport)
        sent = sv.send(UPLINK, "up1", reply)
        sent.assert_to_vm(reply, vm)
        assert sent.counters == {("up1", C.VM_ORIGIN_HOP): 1, ("up1", C.VM_ORIGIN_RETURNED): 1}
        e = sv.entry(reply)
        assert e is not None
        assert (e.flags, bytes(e.mac), sv.name(e.ifindex)) == (
            ORIGIN | HOP,
            mac_bytes(MAC_FW_S),
            "up1",
        )
    # the VM's ACK: per-connection routing for the server side too
    ack = proxy_syn("vm1", PORT_PROXY_1)
    ack[TCP].flags, ack[TCP].seq, ack[TCP].ack = "A", 7001, 9001
    sent = sv.send(VMPORT, "vm1", ack)
    expected = Ether(bytes(ack))
    expected[Ether].dst = MAC_FW_S
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_REDIRECT, "up1", bytes(expected))
    assert sent.counters == {("vm1", C.REDIRECTED): 1, ("vm1", C.CONFIRMED): 1}
    confirmed = sv.dp.conns.lookup(Key(ack, reverse=True).pack())
    assert confirmed is not None
    assert abi.ConnEntry.from_buffer_copy(confirmed[: ctypes.sizeof(abi.ConnEntry)]).state == (
        abi.State.TCP_ESTABLISHED
    )


def test_a_vm_packet_before_the_servers_reply_is_pending(sv: Services) -> None:
    """A retransmitted SYN before any reply: the entry has no hop yet, the packet passes."""
    sv.grant_vip("vm1")
    syn = proxy_syn("vm1", PORT_PROXY_1)
    sv.send(VMPORT, "vm1", syn)
    sent = sv.send(VMPORT, "vm1", syn)
    assert (sent.verdict, sent.counters) == (TC_ACT_OK, {("vm1", C.VM_ORIGIN_PENDING): 1})


def test_vm_opened_connections_are_not_remembered_when_disabled(sv: Services) -> None:
    """F_SET_NO_VM_ORIGIN: a VM's SYN with no entry is a plain miss."""
    sv.reset(settings=abi.F_SET_SERVICES | abi.F_SET_NO_VM_ORIGIN)
    sv.grant_vip("vm1")
    syn = proxy_syn("vm1", PORT_PROXY_1)
    assert sv.send(VMPORT, "vm1", syn).counters == {("vm1", C.MISS): 1}
    assert sv.entry(syn, reverse=True) is None


def test_a_vm_opened_connection_of_a_down_vm_passes(sv: Services) -> None:
    """Its VM is down: a server's reply has nowhere to be moved to and passes."""
    sv.grant_vip("vm1")
    sv.send(VMPORT, "vm1", proxy_syn("vm1", PORT_PROXY_1))
    sv.vm_port("vm1", flags=abi.F_IFACE_VM_DOWN)
    reply = server_reply(PORT_PROXY_1)
    sent = sv.send(UPLINK, "up1", reply)
    assert (sent.verdict, sent.redirect, sent.data) == (TC_ACT_OK, None, bytes(reply))
    assert sent.counters == {("up1", C.VM_ORIGIN_HOP): 1, ("up1", C.MISS): 1}


# ---------------------------------------------------------------- the agent's side


def _three_vm_service(**kw: object) -> Service:
    return Service(
        name="web",
        address=VIP,
        ports=[PORT_HTTP],
        vms=[ServiceVm(port=vm, mac=VM_MACS[vm]) for vm in POOL],
        **kw,
    )  # type: ignore[arg-type]


def test_manager_writes_tables_keys_and_flags(sv: Services, tmp_path: Path) -> None:
    """ServiceManager.start: a table over the pool, the service key, F_SET_SERVICES."""
    sv.reset(settings=0)
    sv.dp.configure("vm1")  # no MAC yet: the manager writes the configured one
    m = sv.manager(tmp_path / "s.json")
    m.start([_three_vm_service()], HealthCheck(type="none"))
    assert read_table(sv.maglev, 0) == sv.pool_table(*POOL)
    settings = abi.Settings.from_buffer_copy(sv.dp.settings.lookup(struct.pack("=I", 0)))
    assert settings.flags & abi.F_SET_SERVICES
    frame = svc4()
    vm = sv.name(sv.pool_table(*POOL)[slot_of(conn_key(frame))])
    assert vm is not None
    sv.send(UPLINK, "up1", frame).assert_to_vm(frame, vm)
    m.remove("web")
    assert list(sv.services.keys()) == []
    assert sv.maglev.lookup(struct.pack("=I", 0)) is None
    settings = abi.Settings.from_buffer_copy(sv.dp.settings.lookup(struct.pack("=I", 0)))
    assert not settings.flags & abi.F_SET_SERVICES
    assert sv.entry(frame) is None  # a removed service's connections are forgotten


def _frames_to(sv: Services, table: list[int], vm: str, n: int) -> list[Packet]:
    """n client SYNs that *table* sends to *vm*."""
    out = []
    for sport in range(30000, 40000):
        frame = svc4(sport=sport, src=IP_CLIENT_A)
        if sv.name(table[slot_of(conn_key(frame))]) == vm:
            out.append(frame)
            if len(out) == n:
                return out
    raise AssertionError("not enough keys")


def test_drain_takes_no_new_connections_and_keeps_old_ones(sv: Services, tmp_path: Path) -> None:
    """Drained vm2: its established connections stay, new ones go to vm1 and vm3."""
    m = sv.manager(tmp_path / "s.json")
    m.start([_three_vm_service()], HealthCheck(type="none"))
    old = _frames_to(sv, sv.pool_table(*POOL), "vm2", 5)
    for frame in old:
        sv.send(UPLINK, "up1", frame)
    m.set_drained("web", ["vm2"], True)
    assert read_table(sv.maglev, 0) == sv.pool_table("vm1", "vm3")
    for frame in old:
        ack = frame.copy()
        ack[TCP].flags = "A"
        sv.send(UPLINK, "up1", ack).assert_to_vm(ack, "vm2")
    for sport in range(100):
        assert sv.send(UPLINK, "up1", svc4(sport=41000 + sport)).redirect in ("vm1", "vm3")
    m.set_drained("web", ["vm2"], False)
    assert read_table(sv.maglev, 0) == sv.pool_table(*POOL)


def test_health_unhealthy_takes_no_new_connections_down_moves_them(
    sv: Services, tmp_path: Path
) -> None:
    """Failing checks: after `fall` the VM gets no new connections but keeps its
    own; after `down_after` it is down and its connections are reassigned."""
    m = sv.manager(tmp_path / "s.json")
    check = HealthCheck(type="tcp", port=PORT_HTTP, fall=2, rise=1, down_after=3)
    m.start([_three_vm_service(health=check)], HealthCheck())
    old = _frames_to(sv, sv.pool_table(*POOL), "vm3", 3)
    for frame in old:
        sv.send(UPLINK, "up1", frame)
    for vm in POOL:
        m.report("web", vm, True, "ok")
    assert m.report("web", "vm3", False, "refused") is None
    assert m.report("web", "vm3", False, "refused") == "unhealthy"
    assert read_table(sv.maglev, 0) == sv.pool_table("vm1", "vm2")
    ack = old[0].copy()
    ack[TCP].flags = "A"
    sv.send(UPLINK, "up1", ack).assert_to_vm(ack, "vm3")  # unhealthy: stays
    assert m.report("web", "vm3", False, "refused") == "down"
    assert sv.dp.iface_map.lookup(struct.pack("=I", sv.ifindex("vm3")))[9] & abi.F_IFACE_VM_DOWN
    new = sv.name(sv.pool_table("vm1", "vm2")[slot_of(conn_key(ack))])
    sent = sv.send(UPLINK, "up1", ack)  # down: moves
    sent.assert_to_vm(ack, new)  # type: ignore[arg-type]
    assert sent.counters[("up1", C.SVC_REASSIGNED)] == 1
    assert m.report("web", "vm3", True, "ok") == "up"
    assert not sv.dp.iface_map.lookup(struct.pack("=I", sv.ifindex("vm3")))[9] & abi.F_IFACE_VM_DOWN
    assert read_table(sv.maglev, 0) == sv.pool_table(*POOL)
    st = m.status("web")[0]
    assert {v.port: (v.health, v.changes) for v in st.vms}["vm3"] == ("up", 4)


@pytest.mark.parametrize("walker", [True, False], ids=["kernel", "agent-walks"])
def test_removing_a_vm_moves_its_connections_in_the_table(
    sv: Services, tmp_path: Path, walker: bool
) -> None:
    """remove_vms: entries pinned to the removed VM now name the table's choice."""
    m = sv.manager(tmp_path / "s.json", walker=walker)
    m.start([_three_vm_service()], HealthCheck(type="none"))
    old = _frames_to(sv, sv.pool_table(*POOL), "vm1", 4)
    keep = _frames_to(sv, sv.pool_table(*POOL), "vm2", 2)
    for frame in old + keep:
        sv.send(UPLINK, "up1", frame)
    assert m.remove_vms("web", ["vm1"]) == {"moved": 4, "dropped": 0}
    after = sv.pool_table("vm2", "vm3")
    for frame in old:
        assert sv.vm_of(frame) == sv.name(after[slot_of(conn_key(frame))])
    for frame in keep:
        assert sv.vm_of(frame) == "vm2"


@pytest.mark.parametrize("walker", [True, False], ids=["kernel", "agent-walks"])
def test_removing_a_vm_with_on_vm_down_drop_forgets_its_connections(
    sv: Services, tmp_path: Path, walker: bool
) -> None:
    sv.reset(settings=abi.F_SET_VM_DOWN_DROP)
    m = sv.manager(tmp_path / "s.json", walker=walker)
    m.start([_three_vm_service()], HealthCheck(type="none"))
    old = _frames_to(sv, sv.pool_table(*POOL), "vm1", 3)
    for frame in old:
        sv.send(UPLINK, "up1", frame)
    assert m.remove_vms("web", ["vm1"]) == {"moved": 0, "dropped": 3}
    assert all(sv.entry(f) is None for f in old)
    assert sv.dp.counter_values()[(SLOT0, C.AGENT_REMOVED)] >= 3


def _confirm(sv: Services, frame: Packet) -> None:
    """Moves *frame*'s pending entry into the confirmed table, as a promotion does."""
    maps = Maps({name: sv.dp.obj.map(name) for name in MAP_NAMES})
    key = conn_key(frame)
    confirmed, pending = maps.tables_for(key)
    entry = pending.lookup(key)
    assert entry is not None
    confirmed.update(key, entry)
    assert pending.delete(key)


def test_the_kernel_moves_and_forgets_a_services_connections_without_the_agent_reading_the_table(
    sv: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove_vms and remove run lh_svc_walk, which changes the service's own entries
    (confirmed and pending, IPv4 and IPv6) and nothing else: another service's
    entries on the same VM and a connection that VM opened stay; the agent
    never lists the table (its cost is the VM's entries, not the table's)."""
    monkeypatch.setattr(Maps, "entries", lambda self: pytest.fail("the agent read the table"))
    m = sv.manager(tmp_path / "s.json")
    dns = Service(name="dns", address=VIP6, proto="udp", ports=[PORT_DNS],
                  vms=[ServiceVm(port="vm1", mac=MAC_VM_1)])  # fmt: skip
    m.start([_three_vm_service(), dns], HealthCheck(type="none"))
    old = _frames_to(sv, sv.pool_table(*POOL), "vm1", 4)
    keep = _frames_to(sv, sv.pool_table(*POOL), "vm2", 2)
    for frame in old + keep:
        sv.send(UPLINK, "up1", frame)
    _confirm(sv, old[0])
    _confirm(sv, old[1])
    other = svc6_udp()  # the dns service, on vm1 too
    assert sv.send(UPLINK, "up1", other).redirect == "vm1"
    sv.grant_vip("vm1")
    opened = (  # from the virtual address and port: its key is the service's too
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=VIP, dst=IP_SERVER)
        / TCP(sport=PORT_HTTP, dport=PORT_PROXY_1, flags="S")
    )
    sv.send(VMPORT, "vm1", opened)
    assert sv.entry(opened, reverse=True) is not None
    before = sv.dp.table_counter_values()

    assert m.remove_vms("web", ["vm1"]) == {"moved": 4, "dropped": 0}
    after = sv.pool_table("vm2", "vm3")
    for frame in old:
        assert sv.vm_of(frame) == sv.name(after[slot_of(conn_key(frame))])
    assert [sv.vm_of(f) for f in keep] == ["vm2", "vm2"]
    assert sv.vm_of(other) == "vm1"
    assert sv.entry(opened, reverse=True) is not None

    assert m.remove("web") == 6
    assert all(sv.entry(f) is None for f in old + keep)
    assert sv.vm_of(other) == "vm1"
    assert sv.entry(opened, reverse=True) is not None
    T = abi.TableCounter
    moved = {c: n - before[c] for c, n in sv.dp.table_counter_values().items() if n != before[c]}
    assert moved == {T.CONFIRMED_REMOVED: 2, T.PENDING_REMOVED: 4}
    assert m.remove("dns") == 1
    assert sv.entry(other) is None
    assert sv.entry(opened, reverse=True) is not None

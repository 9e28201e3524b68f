"""The programs attached with tc on veth pairs, frames on the wire.

What BPF_PROG_TEST_RUN cannot show: the outermost VLAN tag bpf_skb_vlan_push()
keeps in skb metadata, a tag the receive path already took off the frame
(skb->vlan_present on the uplink), and IP headers cut too short for test run.

    wupp --veth-- wup [lh_uplink]        wvm [lh_vmport] --veth-- wvmp
    (firewall side)    uplink               VM port          (VM side)

Frames are sent and captured with AF_PACKET sockets on the peers; a tag the
kernel reports in PACKET_AUXDATA is put back into the captured frame.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import netns
from scapy.layers.inet import IP
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet

from lasthop import abi
from lasthop.libbpf import INGRESS, BpfObject, TcHook
from packets import (
    MAC_FW_B,
    MAC_UPLINK_1,
    MAC_VM_1,
    MAC_VMPORT_1,
    MPLS_LABEL_A,
    MPLS_LABEL_B,
    MPLS_LABEL_C,
    VLAN_C,
    VLAN_S,
    dot1ad,
    dot1q,
    labelled,
    lse,
    tci,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
)

from .conftest import TestNetns
from .harness import Datapath, Entry, HopSlots, Iface, Key, bridged, routed, view
from .test_malformed import BASES, SHORT_L3
from .test_mpls import HOP_ID, desc, put_mpls_entry

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
TC_HANDLE, TC_PRIORITY = 1, 1


@dataclass
class Wire:
    dp: Datapath
    index: dict[str, int]

    def send(self, ifname: str, frame: Packet | bytes) -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
            s.bind((ifname, 0))
            s.send(bytes(frame))


class Capture:
    """Frames arriving at an interface, with the stripped VLAN tag put back."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.sock.bind((ifname, ETH_P_ALL))

    def close(self) -> None:
        self.sock.close()

    def frames(self, timeout: float = 1.0) -> Iterator[bytes]:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, anc, _, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(20))
            except TimeoutError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            for level, kind, raw in anc:
                if level != SOL_PACKET or kind != PACKET_AUXDATA:
                    continue
                status, _, _, _, _, vlan_tci, vlan_tpid = struct.unpack("IIIHHHH", raw[:20])
                if status & TP_STATUS_VLAN_VALID:
                    tpid = vlan_tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
                    data = data[:12] + struct.pack("!HH", tpid, vlan_tci) + data[12:]
            yield data

    def expect(self, want: bytes, timeout: float = 1.0) -> None:
        seen = []
        for data in self.frames(timeout):
            if data == want:
                return
            seen.append(data)
        shown = "\n".join(Ether(d).summary() for d in seen) or "(nothing)"
        raise AssertionError(
            f"expected frame not captured:\n{Ether(want).show2(dump=True)}\n"
            f"captured instead:\n{shown}"
        )


@pytest.fixture(scope="module")
def wire(test_netns: TestNetns, test_object) -> Iterator[Wire]:  # type: ignore[no-untyped-def]
    index = test_netns.add_veths([("wup", MAC_UPLINK_1), ("wvm", MAC_VMPORT_1)])
    test_netns.enter()
    obj = BpfObject(
        test_object,
        pin_root=None,
        max_entries={"lh_conns4": 1024, "lh_pending4": 1024, "lh_conns": 1024, "lh_pending": 1024},
    )
    try:
        dp = Datapath(
            obj,
            {
                "wup": Iface("wup", index["wup"], MAC_UPLINK_1, abi.Role.UPLINK, 1),
                "wvm": Iface("wvm", index["wvm"], MAC_VMPORT_1, abi.Role.VM_PORT, 3),
            },
        )
        for name, prog in (("wup", "lh_uplink"), ("wvm", "lh_vmport")):
            hook = TcHook(index[name], INGRESS)
            hook.create()
            hook.attach(obj.program(prog).fd, handle=TC_HANDLE, priority=TC_PRIORITY)
        yield Wire(dp, index)
    finally:
        test_netns.del_links(["wup", "wvm"])  # takes the qdiscs and filters with them
        obj.close()
        test_netns.leave()


TAGS = [
    pytest.param((), (), 0, id="untagged"),
    pytest.param((dot1q(VLAN_C),), (tci(VLAN_C),), 0, id="802.1Q"),
    pytest.param(
        (dot1ad(VLAN_S), dot1q(VLAN_C)),
        (tci(VLAN_S), tci(VLAN_C)),
        abi.F_ENTRY_OUTER_8021AD,
        id="QinQ 802.1ad+802.1Q",
    ),
    pytest.param((dot1q(VLAN_S), dot1q(VLAN_C)), (tci(VLAN_S), tci(VLAN_C)), 0, id="two 802.1Q"),
]


def tagged(frame: Packet, tags: tuple[Packet, ...]) -> Packet:
    e = Ether(bytes(frame))
    out = Ether(src=e.src, dst=e.dst)
    for t in tags:
        out = out / t
    return out / e.payload


@pytest.mark.parametrize(("tags", "tcis", "ad"), TAGS)
@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        pytest.param(tcp4_request("S"), tcp4_reply("SA"), id="v4"),
        pytest.param(tcp6_request("S"), tcp6_reply("SA"), id="v6"),
    ],
)
def test_reply_leaves_with_the_request_tags(wire: Wire, tags, tcis, ad, request_, reply) -> None:  # type: ignore[no-untyped-def]
    """A request arriving tagged on the uplink (outer tag already in skb metadata)
    is learned with every tag; the reply leaves the uplink with the same tags,
    outer TPID included, and firewall B's MAC."""
    dp = wire.dp
    dp.reset()
    capture = Capture("wupp")
    try:
        wire.send("wupp", tagged(request_, tags))
        deadline = time.monotonic() + 5  # a condition waited for: a long limit costs nothing
        while not dp.table(0, 2**32 - 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        table = dp.table(0, 2**32 - 1)
        assert list(table) == [Key(request_).pack()]
        entry = table[Key(request_).pack()]
        assert (entry.mac, entry.iface, entry.vlans, entry.flags) == (
            MAC_FW_B,
            "wup",
            tcis,
            abi.F_ENTRY_HOP_KNOWN | ad,
        )

        wire.send("wvmp", reply)
        capture.expect(bytes(tagged(bridged(reply), tags)))
    finally:
        capture.close()


MPLS_STACKS = [
    pytest.param((lse(MPLS_LABEL_A),), id="1 label"),
    pytest.param((lse(MPLS_LABEL_A), lse(MPLS_LABEL_B)), id="2 labels"),
    pytest.param((lse(MPLS_LABEL_A), lse(MPLS_LABEL_B), lse(MPLS_LABEL_C, tc=0)), id="3 labels"),
]


@pytest.mark.parametrize(("tags", "tcis", "ad"), TAGS)
@pytest.mark.parametrize("stack", MPLS_STACKS)
@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        pytest.param(tcp4_request(), tcp4_reply(), id="v4"),
        pytest.param(tcp6_request(), tcp6_reply(hlim=33), id="v6"),
    ],
)
@pytest.mark.parametrize("fast", [False, True], ids=["general path", "fast path"])
def test_mpls_reply_on_the_wire(wire: Wire, tags, tcis, ad, stack, request_, reply, fast) -> None:  # type: ignore[no-untyped-def]
    """The reply of an MPLS hop leaves the uplink under the whole label stack,
    inside the request's tags: the 4n + 14-byte MAC header the push leaves
    (bpf_skb_change_head) is what tc puts back before the redirect. Each
    label's TTL is the IP TTL, the bottom-of-stack bit on the last only, the
    TC as learned."""
    dp = wire.dp
    dp.reset()
    if fast:
        dp.configure("wvm", vm_mac=MAC_VM_1)
    descs = HopSlots(dp.obj.map("lh_hop_descs"))
    put_mpls_entry(dp, request_, tags=len(tcis), ad=bool(ad), iface="wup")
    descs.update(HOP_ID.to_bytes(4, "little"), bytes(desc(*stack, tags=tcis)))
    ip = Ether(bytes(reply)).payload
    ttl = ip.ttl if isinstance(ip, IP) else ip.hlim
    capture = Capture("wupp")
    try:
        before = dp.counter_values()
        wire.send("wvmp", reply)
        entries = tuple((label, tc, ttl) for label, tc, _ in stack)
        capture.expect(bytes(labelled(tagged(bridged(reply), tags), entries)))
        after = dp.counter_values()
        assert after[("wvm", C.ENCAP_REDIRECTED)] - before[("wvm", C.ENCAP_REDIRECTED)] == 1
    finally:
        capture.close()
        descs.delete(HOP_ID.to_bytes(4, "little"))


def test_routed_reply_on_the_wire(wire: Wire) -> None:
    """Routed: the reply leaves the uplink from its MAC, TTL - 1, checksum right."""
    dp = wire.dp
    dp.reset()
    dp.configure("wvm", flags=abi.F_IFACE_ROUTED)
    dp.put(Entry(Key(tcp4_request()), mac=MAC_FW_B, iface="wup", packets=1))
    capture = Capture("wupp")
    try:
        reply = tcp4_reply(dst_mac=MAC_VMPORT_1)
        wire.send("wvmp", reply)
        capture.expect(bytes(routed(reply, src=MAC_UPLINK_1)))
    finally:
        capture.close()


@pytest.mark.parametrize("row", SHORT_L3, ids=[r.desc for r in SHORT_L3])
def test_short_ip_headers_pass_counted(wire: Wire, row) -> None:  # type: ignore[no-untyped-def]
    """IP headers cut short, which test run refuses, reach tc over a veth: both
    programs pass them unchanged and count them malformed."""
    dp = wire.dp
    dp.reset()
    for base in row.bases:
        request, reply, conn = BASES[base]
        entry = Entry(Key(conn), mac=MAC_FW_B, iface="wup", packets=3)
        dp.put(entry)
        before = dp.counter_values()
        capture = Capture("wupp")
        try:
            wire.send("wupp", row.make(request))
            wire.send("wvmp", row.make(reply))
            # the VM's frame is not redirected: nothing reaches the firewall side
            assert list(capture.frames(timeout=0.2)) == []
        finally:
            capture.close()
        after = dp.counter_values()
        deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        assert deltas == {("wup", C.MALFORMED): 1, ("wvm", C.MALFORMED): 1}
        assert dp.table() == {Key(conn).pack(): view(entry)}
        dp.conns.delete(Key(conn).pack())


def _to_vm1(frame: Packet) -> bytes:
    """What the bridge gives VM 1 of a tagged frame: no tag, the guest's MAC."""
    e = Ether(bytes(frame))
    payload = e.payload
    while isinstance(payload, (Dot1Q, Dot1AD)):
        payload = payload.payload
    return bytes(Ether(src=e.src, dst=MAC_VM_1, type=payload_type(e)) / payload)


def payload_type(e: Packet) -> int:
    layer = e
    while isinstance(layer.payload, (Dot1Q, Dot1AD)):
        layer = layer.payload
    return int(layer.type)


def _pinned(request: Packet, vm: str, tcis: tuple[int, ...], ad: int) -> Entry:
    return Entry(Key(request), mac=MAC_FW_B, iface="wup", vm=vm, packets=1, vlans=tcis,
                 flags=abi.F_ENTRY_HOP_KNOWN | ad, state=abi.State.TCP_ESTABLISHED)  # fmt: skip


@pytest.mark.parametrize(("tags", "tcis", "ad"), TAGS[1:])
def test_service_frame_reaches_a_veth_vm_untagged(wire: Wire, tags, tcis, ad) -> None:  # type: ignore[no-untyped-def]
    """A tagged request of a connection pinned to the VM port (a service's)
    leaves the VM port with no tag in the frame and none in the skb's VLAN
    metadata (the capture puts a metadata tag back into what it compares)."""
    dp = wire.dp
    dp.reset()
    dp.configure("wvm", vm_mac=MAC_VM_1)
    request = tcp4_request("A")
    dp.put(_pinned(request, "wvm", tcis, ad))
    capture = Capture("wvmp")
    try:
        wire.send("wupp", tagged(request, tags))
        capture.expect(_to_vm1(tagged(request, tags)))
    finally:
        capture.close()


def test_service_frame_reaches_a_tap_vm_untagged(wire: Wire, test_netns: TestNetns) -> None:
    """The same through a tap, as a guest reads it from the tap's file: the
    tap would write a metadata tag into the frame (8100 a064 ...), so no tag
    may be left anywhere."""
    dp = wire.dp
    dp.reset()
    fd = _open_tap("wtap")
    try:
        index = socket.if_nametoindex("wtap")
        with_tap = {**dp.ifaces, "wtap": Iface("wtap", index, MAC_VMPORT_1, abi.Role.VM_PORT, 4)}
        dp.ifaces, dp.by_index = with_tap, {**dp.by_index, index: "wtap"}
        dp.slots["wtap"] = 4
        dp.configure("wtap", vm_mac=MAC_VM_1)
        tags, tcis = (dot1ad(VLAN_S), dot1q(VLAN_C)), (tci(VLAN_S), tci(VLAN_C))
        request = tcp4_request("A")
        dp.put(_pinned(request, "wtap", tcis, abi.F_ENTRY_OUTER_8021AD))
        wire.send("wupp", tagged(request, tags))
        want, seen = _to_vm1(tagged(request, tags)), []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
            if not ready:
                break
            got = os.read(fd, 65535)
            if got == want:
                return
            seen.append(Ether(got).summary())
        raise AssertionError(
            f"the tap's guest read {seen or 'nothing'}, not {Ether(want).summary()}"
        )
    finally:
        os.close(fd)  # the tap goes with it
        dp.ifaces = {k: v for k, v in dp.ifaces.items() if k != "wtap"}
        dp.slots.pop("wtap", None)


PEER_NS = "lhtwpeer"  # the guest end's namespace: redirect_peer needs another one


def _tx_packets(ns: str, dev: str) -> int:
    out = subprocess.run(
        ["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


@pytest.fixture
def peer_port(wire: Wire, test_netns: TestNetns) -> Iterator[str]:
    """VM port wpv: a veth whose guest end (wpvp) is in a namespace of its own."""
    dp = wire.dp
    index = test_netns.add_veths([("wpv", MAC_VMPORT_1)])["wpv"]
    ifaces, by_index = dp.ifaces, dp.by_index
    subprocess.run(["ip", "netns", "add", PEER_NS], check=True)
    try:
        for cmd in (
            ["ip", "-n", test_netns.name, "link", "set", "wpvp", "netns", PEER_NS],
            ["ip", "-n", PEER_NS, "link", "set", "wpvp", "up"],
        ):
            subprocess.run(cmd, check=True)
        dp.ifaces = {**ifaces, "wpv": Iface("wpv", index, MAC_VMPORT_1, abi.Role.VM_PORT, 4)}
        dp.by_index = {**by_index, index: "wpv"}
        dp.slots["wpv"] = 4
        yield "wpv"
    finally:
        dp.ifaces, dp.by_index = ifaces, by_index
        dp.slots.pop("wpv", None)
        test_netns.del_links(["wpv"])  # its guest end goes with it
        subprocess.run(["ip", "netns", "del", PEER_NS], check=False)


@pytest.mark.parametrize(
    ("delivery", "tags", "tcis", "ad", "through_port"),
    [
        pytest.param(abi.Delivery.PEER, (), (), 0, False, id="peer, untagged: into the guest end"),
        pytest.param(abi.Delivery.DEVICE, (), (), 0, True, id="device: out of the port"),
        pytest.param(
            abi.Delivery.PEER,
            (dot1q(VLAN_C),),
            (tci(VLAN_C),),
            0,
            True,
            id="peer, tagged: out of the port, untagged",
        ),  # fmt: skip
    ],
)
def test_frame_for_a_veth_vm_goes_into_its_guest_end(  # type: ignore[no-untyped-def]
    wire: Wire, test_netns: TestNetns, peer_port: str, delivery, tags, tcis, ad, through_port
) -> None:
    """A request for a VM whose port says DELIVER_PEER arrives in the guest's
    namespace without leaving the host's end of the veth (its tx counter, what
    a capture or a qdisc there sees, stays); with DELIVER_DEVICE, or a frame
    that came tagged (its MAC header rewritten), it leaves by the port. The
    guest gets the same frame either way."""
    dp = wire.dp
    dp.reset()
    dp.configure(peer_port, vm_mac=MAC_VM_1, delivery=delivery)
    request = tcp4_request("A")
    dp.put(_pinned(request, peer_port, tcis, ad))
    before = _tx_packets(test_netns.name, peer_port)
    pinned = dp.counter_values().get(("wup", C.SVC_PINNED), 0)
    netns.pushns(PEER_NS)
    try:
        capture = Capture("wpvp")
    finally:
        netns.popns()
    try:
        wire.send("wupp", tagged(request, tags))
        capture.expect(_to_vm1(tagged(request, tags)))
    finally:
        capture.close()
    assert _tx_packets(test_netns.name, peer_port) - before == int(through_port)
    assert dp.counter_values()[("wup", C.SVC_PINNED)] == pinned + 1


def _open_tap(name: str) -> int:
    """A tap device (Ethernet frames, no packet information header), up; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))  # TUNSETIFF
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    return fd

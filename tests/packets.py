"""Named addresses and frames for the data-path tests.

Every frame a test sends or expects is a scapy expression over these names;
raw bytes never appear without the expression that made them. The story is
the one lasthop exists for: a client's request reaches VM 1 through firewall
B, while VM 1's default gateway is firewall A.
"""

from __future__ import annotations

from scapy.contrib.mpls import MPLS
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
    fragment6,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet

# Last hops: the stateful devices in front of the host.
MAC_FW_A = "02:fa:00:00:00:0a"  # firewall A: the VMs' default gateway
MAC_FW_B = "02:fa:00:00:00:0b"  # firewall B: where the requests come through
MAC_FW_C = "02:fa:00:00:00:0c"  # firewall C: takes over a connection from B

# Host interfaces: the test sets these on its veths, and lh_ifaces .mac says the same.
MAC_UPLINK_1 = "02:00:00:00:01:01"
MAC_UPLINK_2 = "02:00:00:00:01:02"
MAC_VMPORT_1 = "02:00:00:00:02:01"  # VM 1's gateway on a routed host
MAC_VMPORT_2 = "02:00:00:00:02:02"
MAC_SPARE = "02:00:00:00:03:01"  # an interface the agent did not configure

# Guests.
MAC_VM_1 = "52:54:00:00:00:01"
MAC_VM_2 = "52:54:00:00:00:02"

MAC_BROADCAST = "ff:ff:ff:ff:ff:ff"

IP_CLIENT_A = "198.51.100.10"
IP_CLIENT_B = "198.51.100.20"
IP_VM_1 = "192.0.2.11"
IP_VM_2 = "192.0.2.12"
IP_ROUTER = "203.0.113.1"  # a router between the client and the host

IP6_CLIENT_B = "2001:db8:100::20"
IP6_VM_1 = "2001:db8:2::11"
IP6_ROUTER = "2001:db8:ff::1"

PORT_CLIENT = 40001
PORT_HTTP = 80
PORT_DNS = 53
ECHO_ID = 0x4C48
ECHO_SEQ = 7

VLAN_C = 100  # 802.1Q customer tag (the inner one under QinQ)
VLAN_S = 200  # 802.1ad service tag (the outer one)
VLAN_PCP = 5  # a priority that must survive the round trip
VLAN_OTHER = 300


def tci(vlan: int, pcp: int = VLAN_PCP) -> int:
    """The tag control information lasthop stores: PCP, DEI 0, VLAN id."""
    return pcp << 13 | vlan


def eth(src: str, dst: str, vlans: tuple[Packet, ...] = ()) -> Packet:
    """Ethernet header with the given tags (Dot1AD/Dot1Q layers, outer first)."""
    frame: Packet = Ether(src=src, dst=dst)
    for tag in vlans:
        frame = frame / tag
    return frame


# Tags as they appear on the wire: single 802.1Q, and QinQ (802.1ad over 802.1Q).
def dot1q(vlan: int = VLAN_C) -> Packet:
    return Dot1Q(prio=VLAN_PCP, vlan=vlan)


def dot1ad(vlan: int = VLAN_S) -> Packet:
    return Dot1AD(prio=VLAN_PCP, vlan=vlan)


# Requests: client -> VM 1, arriving from firewall B on an uplink.
Tags = tuple[Packet, ...]


def tcp4_request(flags: str = "S", src_mac: str = MAC_FW_B, vlans: Tags = ()) -> Packet:
    return (
        eth(src_mac, MAC_VM_1, vlans)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags, seq=1000)
    )


def tcp6_request(flags: str = "S", src_mac: str = MAC_FW_B, vlans: Tags = ()) -> Packet:
    return (
        eth(src_mac, MAC_VM_1, vlans)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags, seq=1000)
    )


def udp4_request(src_mac: str = MAC_FW_B) -> Packet:
    return (
        eth(src_mac, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / UDP(sport=PORT_CLIENT, dport=PORT_DNS)
        / b"query"
    )


def udp6_request(src_mac: str = MAC_FW_B) -> Packet:
    return (
        eth(src_mac, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / UDP(sport=PORT_CLIENT, dport=PORT_DNS)
        / b"query"
    )


def echo4_request(src_mac: str = MAC_FW_B) -> Packet:
    return (
        eth(src_mac, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / ICMP(type="echo-request", id=ECHO_ID, seq=ECHO_SEQ)
        / b"ping"
    )


def echo6_request(src_mac: str = MAC_FW_B) -> Packet:
    return (
        eth(src_mac, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / ICMPv6EchoRequest(id=ECHO_ID, seq=ECHO_SEQ, data=b"ping")
    )


# Replies: VM 1 -> client, sent by the VM to its default gateway, firewall A.
# On a routed host the VM sends to its port's MAC instead (dst_mac=MAC_VMPORT_1).
def tcp4_reply(flags: str = "A", dst_mac: str = MAC_FW_A, ttl: int = 64) -> Packet:
    return (
        eth(MAC_VM_1, dst_mac)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, ttl=ttl)
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags=flags, seq=5000, ack=1001)
    )


def tcp6_reply(flags: str = "A", dst_mac: str = MAC_FW_A, hlim: int = 64) -> Packet:
    return (
        eth(MAC_VM_1, dst_mac)
        / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B, hlim=hlim)
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags=flags, seq=5000, ack=1001)
    )


def udp4_reply(dst_mac: str = MAC_FW_A) -> Packet:
    return (
        eth(MAC_VM_1, dst_mac)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B)
        / UDP(sport=PORT_DNS, dport=PORT_CLIENT)
        / b"answer"
    )


def udp6_reply(dst_mac: str = MAC_FW_A) -> Packet:
    return (
        eth(MAC_VM_1, dst_mac)
        / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B)
        / UDP(sport=PORT_DNS, dport=PORT_CLIENT)
        / b"answer"
    )


def echo4_reply(dst_mac: str = MAC_FW_A) -> Packet:
    return (
        eth(MAC_VM_1, dst_mac)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B)
        / ICMP(type="echo-reply", id=ECHO_ID, seq=ECHO_SEQ)
        / b"ping"
    )


def echo6_reply(dst_mac: str = MAC_FW_A) -> Packet:
    return (
        eth(MAC_VM_1, dst_mac)
        / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B)
        / ICMPv6EchoReply(id=ECHO_ID, seq=ECHO_SEQ, data=b"ping")
    )


def l3(frame: Packet) -> Packet:
    """The IP or IPv6 layer of a frame, as an ICMP error quotes it."""
    return frame[IP] if IP in frame else frame[IPv6]


# MPLS hand-off (an uplink with mpls = true): label stack entries as
# (label, traffic class, TTL), outer first.
MPLS_LABEL_A = 16001  # a provider's transport label
MPLS_LABEL_B = 24002  # a service (VPN) label
MPLS_LABEL_C = 30003
MPLS_TC = 5  # a traffic class that must survive the round trip
Lse = tuple[int, int, int]


def lse(label: int, ttl: int = 60, tc: int = MPLS_TC) -> Lse:
    return (label, tc, ttl)


def mpls_stack(entries: tuple[Lse, ...], bottom: bool = True) -> bytes:
    """The label stack entries on the wire, the bottom-of-stack bit on the
    last (unless *bottom* is False: a stack that never ends)."""
    return b"".join(
        bytes(MPLS(label=label, cos=tc, ttl=ttl, s=int(bottom and i == len(entries) - 1)))
        for i, (label, tc, ttl) in enumerate(entries)
    )


def labelled(frame: Packet, entries: tuple[Lse, ...], bottom: bool = True) -> Packet:
    """The frame with an MPLS label stack between its Ethernet header (and
    tags) and its IP header, its type 0x8847 (MPLS unicast)."""
    raw = bytes(frame)
    ip = bytes(l3(frame))
    head = raw[: len(raw) - len(ip)]
    return Ether(head[:-2] + b"\x88\x47" + mpls_stack(entries, bottom) + ip)


# Fragmented UDP datagrams (a large DNS answer, and the request direction for
# services): the first fragment carries the ports, the later ones only addresses.
FRAG_ID = 0x4C48  # IPv4 identification / IPv6 fragment id of the datagram
FRAG_PAYLOAD = b"A" * 2400  # two or three fragments at the sizes below


def udp4_fragments(
    src: str = IP_VM_1,
    dst: str = IP_CLIENT_B,
    sport: int = PORT_DNS,
    dport: int = PORT_CLIENT,
    src_mac: str = MAC_VM_1,
    dst_mac: str = MAC_FW_A,
    ident: int = FRAG_ID,
) -> list[Packet]:
    """An IPv4 UDP datagram cut into fragments of up to 1200 bytes, each framed."""
    datagram = IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / FRAG_PAYLOAD
    return [Ether(src=src_mac, dst=dst_mac) / f for f in fragment(datagram, fragsize=1200)]


def udp6_fragments(
    src: str = IP6_VM_1,
    dst: str = IP6_CLIENT_B,
    sport: int = PORT_DNS,
    dport: int = PORT_CLIENT,
    src_mac: str = MAC_VM_1,
    dst_mac: str = MAC_FW_A,
    ident: int = FRAG_ID,
) -> list[Packet]:
    """The same datagram over IPv6: fragments of up to 1280 bytes, each framed."""
    datagram = (
        IPv6(src=src, dst=dst)
        / IPv6ExtHdrFragment(id=ident)
        / UDP(sport=sport, dport=dport)
        / FRAG_PAYLOAD
    )
    return [Ether(src=src_mac, dst=dst_mac) / f for f in fragment6(datagram, 1280)]

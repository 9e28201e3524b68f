"""lasthop.failover without a kernel: which announcements move a last hop
(the segment is hostile: only the firewalls' addresses, from MACs the
uplink trusts, on an uplink that opted in), the records a move writes,
chains, and retirement. Frames are scapy expressions parsed by the agent's
own parser."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from lasthop import abi
from lasthop.failover import (
    ANNOUNCEMENT_FILTER,
    Announcement,
    EndpointsDown,
    EndpointSink,
    FailoverWatch,
    HopMoves,
    Policy,
    Sink,
    parse_announcement,
)
from lasthop.neighwatch import NeighbourEvent

UPLINK, OTHER_UPLINK = 7, 8
FW_IP = "10.0.0.1"
FW6_IP = "2001:db8::1"
MAC_A, MAC_B, MAC_C = (bytes.fromhex(f"02fa000000{n}") for n in ("0a", "0b", "0c"))
MAC_EVIL = bytes.fromhex("02bad0000001")
BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def garp(sender: bytes, ip: str = FW_IP, eth_src: bytes | None = None, op: int = 1) -> bytes:
    """A gratuitous ARP: sender and target address both *ip*."""
    return bytes(
        Ether(src=mac(eth_src or sender), dst=BROADCAST)
        / ARP(op=op, hwsrc=mac(sender), psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip)
    )


def unsolicited_na(target_mac: bytes, ip: str = FW6_IP, hlim: int = 255) -> bytes:
    return bytes(
        Ether(src=mac(target_mac), dst="33:33:00:00:00:01")
        / IPv6(src=ip, dst="ff02::1", hlim=hlim)
        / ICMPv6ND_NA(tgt=ip, R=1, S=0, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=mac(target_mac))
    )


class Recorder(Sink):
    """lh_hop_moved as a dict of moves and a set of unreachable hops."""

    def __init__(self) -> None:
        self.map: dict[tuple[int, bytes], bytes] = {}
        self.down: set[tuple[int, bytes]] = set()

    def put(self, key: tuple[int, bytes], new: bytes) -> None:
        self.down.discard(key)
        self.map[key] = new

    def put_unreachable(self, key: tuple[int, bytes]) -> None:
        self.map.pop(key, None)
        self.down.add(key)

    def delete(self, key: tuple[int, bytes]) -> None:
        self.map.pop(key, None)
        self.down.discard(key)


def moves(
    allow: tuple[bytes, ...] = (MAC_A, MAC_B, MAC_C), deny: tuple[bytes, ...] = ()
) -> HopMoves:
    policy = Policy(
        prefixes=(ipaddress.ip_network("10.0.0.0/29"), ipaddress.ip_network("2001:db8::/64")),
        allow=frozenset(allow),
        deny=frozenset(deny),
    )
    return HopMoves(Recorder(), policies={UPLINK: policy})


def see(m: HopMoves, frame: bytes, ifindex: int = UPLINK, now: float = 0.0) -> bool:
    ann = parse_announcement(frame, ifindex)
    assert ann is not None
    return m.see(ann, now)


def records(m: HopMoves) -> dict[tuple[int, bytes], bytes]:
    assert isinstance(m.sink, Recorder)
    return m.sink.map


def down(m: HopMoves) -> set[tuple[int, bytes]]:
    assert isinstance(m.sink, Recorder)
    return m.sink.down


FW = ipaddress.ip_address(FW_IP)


# ---------------------------------------------------------------- the hostile segment


def test_a_host_announcing_the_firewall_address_moves_nothing() -> None:
    """The attack: a host the allow-list does not name sends a gratuitous ARP
    for the firewall's address; no record, and the firewall keeps its address."""
    m = moves()
    see(m, garp(MAC_A))
    assert not see(m, garp(MAC_EVIL))
    assert records(m) == {}
    assert m.owners[(UPLINK, ipaddress.ip_address(FW_IP))] == MAC_A
    assert m.refused[(UPLINK, mac(MAC_EVIL), "MAC not in allow_last_hops")] == 1
    see(m, garp(MAC_B))  # the real fail-over still moves A's connections
    assert records(m) == {(UPLINK, MAC_A): MAC_B}


def test_a_denied_mac_moves_nothing() -> None:
    m = moves(allow=(), deny=(MAC_EVIL,))
    see(m, garp(MAC_A))
    assert not see(m, garp(MAC_EVIL))
    assert records(m) == {}


def test_an_address_outside_firewall_addresses_moves_nothing() -> None:
    """A trusted MAC moving an address that is no firewall's (a server's,
    a VM's) is not a fail-over."""
    m = moves()
    see(m, garp(MAC_A, ip="10.0.0.100"))
    assert not see(m, garp(MAC_B, ip="10.0.0.100"))
    assert records(m) == {}


def test_an_uplink_that_did_not_opt_in_moves_nothing() -> None:
    m = moves()
    see(m, garp(MAC_A), ifindex=OTHER_UPLINK)
    assert not see(m, garp(MAC_B), ifindex=OTHER_UPLINK)
    assert records(m) == {} and m.owners == {}


def test_an_arp_whose_sender_is_not_the_frame_source_is_ignored() -> None:
    """Ethernet source and ARP sender MAC differ: a frame about someone else."""
    assert parse_announcement(garp(MAC_B, eth_src=MAC_EVIL), UPLINK) is None


def test_an_address_probe_announces_nothing() -> None:
    probe = bytes(
        Ether(src=mac(MAC_B), dst=BROADCAST)
        / ARP(op=1, hwsrc=mac(MAC_B), psrc="0.0.0.0", pdst=FW_IP)
    )
    assert parse_announcement(probe, UPLINK) is None


def test_a_routed_na_is_ignored() -> None:
    """Hop limit below 255: it crossed a router, so it is no neighbour's word."""
    assert parse_announcement(unsolicited_na(MAC_B, hlim=64), UPLINK) is None


# ---------------------------------------------------------------- moves


@pytest.mark.parametrize("op", [1, 2], ids=["request", "reply"])
def test_arp_announcement_moves_the_old_mac(op: int) -> None:
    m = moves()
    assert not see(m, garp(MAC_A, op=op))  # first word: nothing moved
    assert see(m, garp(MAC_B, op=op))
    assert records(m) == {(UPLINK, MAC_A): MAC_B}


def test_neighbour_advertisement_moves_the_old_mac() -> None:
    m = moves()
    see(m, unsolicited_na(MAC_A))
    assert see(m, unsolicited_na(MAC_B))
    assert records(m) == {(UPLINK, MAC_A): MAC_B}
    assert parse_announcement(unsolicited_na(MAC_B), UPLINK) == Announcement(
        UPLINK, ipaddress.ip_address(FW6_IP), MAC_B
    )


def test_na_without_target_option_names_the_frame_source() -> None:
    frame = bytes(
        Ether(src=mac(MAC_C), dst="33:33:00:00:00:01")
        / IPv6(src=FW6_IP, dst="ff02::1", hlim=255)
        / ICMPv6ND_NA(tgt=FW6_IP)
        / ICMPv6NDOptSrcLLAddr(lladdr=mac(MAC_C))
    )
    assert parse_announcement(frame, UPLINK) == Announcement(
        UPLINK, ipaddress.ip_address(FW6_IP), MAC_C
    )


def test_the_same_mac_again_moves_nothing() -> None:
    m = moves()
    see(m, garp(MAC_A))
    assert not see(m, garp(MAC_A))
    assert records(m) == {}


def test_chain_a_b_c_resolves_to_one_lookup() -> None:
    m = moves()
    see(m, garp(MAC_A))
    see(m, garp(MAC_B))
    see(m, garp(MAC_C))
    assert records(m) == {(UPLINK, MAC_A): MAC_C, (UPLINK, MAC_B): MAC_C}


def test_back_and_forth_a_b_a_stays_right() -> None:
    """A fails over to B and back: B's record sends B's entries to A, and A,
    alive again, has none (its entries stay its own)."""
    m = moves()
    see(m, garp(MAC_A))
    see(m, garp(MAC_B))
    see(m, garp(MAC_A))
    assert records(m) == {(UPLINK, MAC_B): MAC_A}


def test_old_mac_announcing_again_retires_its_record() -> None:
    """A moved one address to B but still answers for another: it is alive."""
    m = moves()
    see(m, garp(MAC_A))
    see(m, garp(MAC_B))
    see(m, garp(MAC_A, ip="10.0.0.2"))
    assert records(m) == {}


def test_records_retire_after_the_longest_timeout() -> None:
    m = moves()
    see(m, garp(MAC_A), now=0.0)
    see(m, garp(MAC_B), now=10.0)
    assert m.retire_older(now=100.0, max_age=100.0) == 0
    assert m.retire_older(now=110.5, max_age=100.0) == 1
    assert records(m) == {}


def test_an_uplink_leaving_the_config_loses_its_records() -> None:
    m = moves()
    see(m, garp(MAC_A))
    see(m, garp(MAC_B))
    m.set_policies({})
    assert records(m) == {} and m.owners == {}


def test_the_socket_filter_passes_arp_and_na_only() -> None:
    """The classic BPF program, run here on the frames: a tiny interpreter of
    the four instructions it uses."""

    def run(frame: bytes) -> int:
        pc, acc = 0, 0
        while True:
            code, jt, jf, k = ANNOUNCEMENT_FILTER[pc]
            if code == 0x28:
                acc = int.from_bytes(frame[k : k + 2], "big")
            elif code == 0x30:
                acc = frame[k]
            elif code == 0x15:
                pc += jt if acc == k else jf
            elif code == 0x06:
                return k
            pc += 1

    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import ICMPv6ND_NS

    assert run(garp(MAC_A)) > 0
    assert run(unsolicited_na(MAC_A)) > 0
    assert run(bytes(Ether() / IP(dst=FW_IP) / UDP())) == 0
    assert run(bytes(Ether() / IPv6(dst=FW6_IP) / ICMPv6ND_NS(tgt=FW6_IP))) == 0


# ---------------------------------------------------------------- a hop that no longer answers


def test_a_failed_neighbour_makes_its_mac_unreachable_until_it_answers() -> None:
    """The host's neighbour entry for the firewall's address failed: A's
    entries stop being used; A speaking again (an entry naming it, an
    announcement) lifts the record."""
    m = moves()
    see(m, garp(MAC_A))
    assert m.lost(UPLINK, FW, now=1.0)
    assert down(m) == {(UPLINK, MAC_A)} and records(m) == {}
    assert not m.lost(UPLINK, FW, now=2.0)  # already written
    see(m, garp(MAC_A), now=3.0)
    assert down(m) == set() and records(m) == {}


def test_a_failed_neighbour_then_a_new_mac_is_a_move() -> None:
    """The firewall's address fails, then answers from B: A's entries go to B."""
    m = moves()
    see(m, garp(MAC_A))
    m.lost(UPLINK, FW, now=1.0)
    assert see(m, garp(MAC_B), now=2.0)
    assert records(m) == {(UPLINK, MAC_A): MAC_B} and down(m) == set()
    assert m.unreachable == {}


def test_a_failure_of_no_firewall_address_or_unknown_owner_changes_nothing() -> None:
    m = moves()
    see(m, garp(MAC_A, ip="10.0.0.100"))  # a server's address: no firewall's
    assert not m.lost(UPLINK, ipaddress.ip_address("10.0.0.100"), now=1.0)
    assert not m.lost(UPLINK, FW, now=1.0)  # no MAC known to own it yet
    see(m, garp(MAC_A))
    assert not m.lost(OTHER_UPLINK, FW, now=1.0)  # an uplink that did not opt in
    assert down(m) == set()


def test_a_moved_mac_failing_keeps_its_move() -> None:
    """A moved to B; A's address later failing cannot happen (B owns it), and
    B failing marks B only: A's record still sends A's entries to B."""
    m = moves()
    see(m, garp(MAC_A))
    see(m, garp(MAC_B))
    assert m.lost(UPLINK, FW, now=5.0)
    assert records(m) == {(UPLINK, MAC_A): MAC_B} and down(m) == {(UPLINK, MAC_B)}


def test_unreachable_records_retire_with_the_longest_timeout_and_the_uplink() -> None:
    m = moves()
    see(m, garp(MAC_A))
    m.lost(UPLINK, FW, now=10.0)
    assert m.retire_older(now=110.5, max_age=100.0) == 1
    assert down(m) == set()
    m.lost(UPLINK, FW, now=200.0)
    m.set_policies({})
    assert down(m) == set()


def test_a_restarted_agent_adopts_unreachable_records() -> None:
    m = moves()
    m.adopt([((UPLINK, MAC_A), MAC_A, True), ((UPLINK, MAC_B), MAC_C, False)], now=0.0)
    assert m.unreachable == {(UPLINK, MAC_A): 0.0}
    assert m.moved == {(UPLINK, MAC_B): (MAC_C, 0.0)}


# -------------------------------------------------------- tunnel endpoints that do not answer


class EndpointRecorder(EndpointSink):
    """lh_endpoints_down as a set."""

    def __init__(self) -> None:
        super().__init__(None)
        self.down: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()

    def set(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, down: bool) -> None:
        (self.down.add if down else self.down.discard)(address)


ENDPOINT = ipaddress.ip_address("10.255.0.3")


def test_an_endpoint_whose_neighbour_entry_failed_is_down_until_it_answers_or_is_forgotten() -> (
    None
):
    rec = EndpointRecorder()
    eps = EndpointsDown(rec)
    eps.see(NeighbourEvent(3, ENDPOINT, None), now=0.0)
    assert rec.down == {ENDPOINT}
    eps.see(NeighbourEvent(3, ENDPOINT, MAC_A), now=1.0)  # answers again
    assert rec.down == set()
    eps.see(NeighbourEvent(3, ENDPOINT, None), now=2.0)
    eps.see(NeighbourEvent(3, ENDPOINT, None, deleted=True), now=3.0)  # collected: try again
    assert rec.down == set() and eps.down == {}


def test_endpoint_records_are_bounded_and_age_out() -> None:
    rec = EndpointRecorder()
    eps = EndpointsDown(rec)
    for n in range(abi.MAX_ENDPOINTS_DOWN + 5):
        eps.see(NeighbourEvent(3, ipaddress.ip_address(0x0AFF0000 + n), None), now=float(n))
    assert len(rec.down) == len(eps.down) == abi.MAX_ENDPOINTS_DOWN
    assert ipaddress.ip_address(0x0AFF0000) not in rec.down  # the oldest went first
    assert eps.retire_older(now=1e9, max_age=10.0) == abi.MAX_ENDPOINTS_DOWN
    assert rec.down == set()


# -------------------------------------------------------- the host's neighbour table


def neighbour_watch(m: HopMoves) -> FailoverWatch:
    """The agent's thread object with no thread and no controller: only its
    handling of neighbour events, for uplink UPLINK's own neighbour device."""
    watch = FailoverWatch(None)  # type: ignore[arg-type]
    watch._wake_r.close()  # no thread to wake
    watch._wake_w.close()
    watch.moves = m
    watch._neigh_uplinks = {UPLINK: (UPLINK,)}
    return watch


def entry(mac: bytes | None, ip: str = FW_IP) -> NeighbourEvent:
    return NeighbourEvent(UPLINK, ipaddress.ip_address(ip), mac)


def test_a_neighbour_entry_naming_a_new_mac_moves_the_old_one() -> None:
    m = moves()
    watch = neighbour_watch(m)
    watch._neighbour(entry(MAC_A), 0.0)  # the seed: who owns it
    watch._neighbour(entry(MAC_B), 1.0)
    assert records(m) == {(UPLINK, MAC_A): MAC_B}


def test_a_lagging_neighbour_entry_does_not_undo_a_move_seen_on_the_wire() -> None:
    """The wire says A -> B; the host's entry, which may ignore an update within
    its locktime, still names A and goes STALE, DELAY: no move back to A."""
    m = moves()
    watch = neighbour_watch(m)
    watch._neighbour(entry(MAC_A), 0.0)
    see(m, garp(MAC_B), now=1.0)
    watch._neighbour(entry(MAC_A), 2.0)  # the same word again, another state
    assert records(m) == {(UPLINK, MAC_A): MAC_B}
    watch._neighbour(entry(MAC_B), 3.0)  # caught up
    assert records(m) == {(UPLINK, MAC_A): MAC_B}


def test_a_failed_neighbour_entry_then_the_same_mac_again() -> None:
    m = moves()
    watch = neighbour_watch(m)
    watch._neighbour(entry(MAC_A), 0.0)
    watch._neighbour(entry(None), 1.0)
    assert down(m) == {(UPLINK, MAC_A)}
    watch._neighbour(entry(MAC_A), 2.0)  # REACHABLE again
    assert down(m) == set() and records(m) == {}


def test_neighbour_entries_of_other_addresses_or_an_untrusted_mac_move_nothing() -> None:
    m = moves()
    watch = neighbour_watch(m)
    watch._neighbour(entry(MAC_A, ip="10.0.0.100"), 0.0)
    watch._neighbour(entry(MAC_B, ip="10.0.0.100"), 1.0)  # no firewall's address
    watch._neighbour(entry(MAC_A), 2.0)
    watch._neighbour(entry(MAC_EVIL), 3.0)  # not in the allow-list
    assert records(m) == {} and m.owners[(UPLINK, FW)] == MAC_A
    assert watch._neigh_macs.keys() == {(UPLINK, FW)}  # only firewall addresses kept

"""Scope (bpf/scope.h, prune.h): a new connection the rules pass takes the
host's normal path, unchanged and counted scope_passed; one they keep (or
none matches, the default learn) is learned. First match wins; only while
F_SET_SCOPE is set; a known connection's packets never look at the rules.
lh_scope_flush and lh_prune_uplinks remove, in the kernel, the entries the
rules now pass and those of uplinks no longer attached.

    client ── fw B ── up1 ─┐
                           host ── vm1 ── VM 1     lh_scope: rule 1, rule 2, ..., default
    client ── fw B ── up2 ─┘
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.packet import Packet

from lasthop import abi
from lasthop.scope import ScopeRule
from packets import IP_CLIENT_B, IP_VM_1, tcp4_reply, tcp4_request, tcp6_request, udp4_request

from .harness import (
    CONFIRMED,
    UPLINK,
    VMPORT,
    Case,
    Entry,
    Key,
    check,
    ids,
)
from .test_uplink import INSERTED, KNOWN, LEARNED, REQ4, learned
from .test_vmport import OWN, VM_ORIGIN_SYN

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
ST = abi.State
SCOPE = abi.F_SET_SCOPE


def rule(action: str, **kw: object) -> ScopeRule:
    return ScopeRule.model_validate({"action": action, **kw})


def to_port(port: int, frame: Packet | None = None) -> Packet:
    """The client's first packet (a TCP SYN unless *frame*) to VM 1's *port*."""
    out = (frame or tcp4_request()).copy()
    out[TCP if TCP in out else UDP].dport = port
    return out


SSH = to_port(22)
ALT = to_port(8042)
PASS_SSH = (rule("pass", proto="tcp", port=22),)


def passed(desc: str, frame: Packet, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: a new connection on up1 the rules pass: unchanged, no entry, counted."""
    iface = kw.pop("iface", "up1")
    return Case(
        desc,
        UPLINK,
        iface,
        frame,
        settings=SCOPE,
        counters={(iface, C.SCOPE_PASSED): 1},
        **kw,
    )


def kept(desc: str, frame: Packet, **kw) -> Case:  # type: ignore[no-untyped-def]
    """A row: a new connection on up1 the rules keep: learned as ever."""
    return Case(
        desc,
        UPLINK,
        "up1",
        frame,
        settings=kw.pop("settings", SCOPE),
        after=(learned(frame, kw.pop("state", ST.TCP_SYN_SENT), zone=kw.get("zone", 0)),),
        counters=LEARNED,
        table_counters=INSERTED,
        **kw,
    )


CASES = [
    kept("F_SET_SCOPE clear: the rules are not read", SSH, settings=0, scope=PASS_SSH),
    passed("a rule passes TCP to port 22", SSH, scope=PASS_SSH),
    kept("port 80 matches no rule: the default learns", tcp4_request(), scope=PASS_SSH),
    kept(
        "UDP to port 22 is not the rule's protocol",
        to_port(22, udp4_request()),
        scope=PASS_SSH,
        state=ST.UDP_NEW,
    ),  # fmt: skip
    passed(
        "a port range: 8042 in 8000-8099", ALT, scope=(rule("pass", proto="tcp", port="8000-8099"),)
    ),  # fmt: skip
    kept(
        "first match wins: learn VM 1's /32, then pass everything",
        SSH,
        scope=(rule("learn", dst=f"{IP_VM_1}/32"), rule("pass")),
    ),
    passed("default pass, no rule matches", tcp4_request(), scope_default="pass"),
    kept(
        "default pass, a learn rule for the client's prefix",
        tcp4_request(),
        scope=(rule("learn", src=str(ipaddress.ip_network(f"{IP_CLIENT_B}/24", strict=False))),),
        scope_default="pass",
    ),
    kept(
        "an IPv4 prefix never matches an IPv6 connection",
        tcp6_request(),
        scope=(rule("pass", src="0.0.0.0/0"),),
    ),
    passed("an IPv6 prefix matches it", tcp6_request(), scope=(rule("pass", dst="2001:db8::/32"),)),
    kept("a rule of up2 does not match up1", tcp4_request(), scope=(rule("pass", uplink="up2"),)),
    passed(
        "... and passes on up2", tcp4_request(), iface="up2", scope=(rule("pass", uplink="up2"),)
    ),
    passed(
        "a rule of zone 5 on an uplink of zone 5",
        tcp4_request(),
        zones=(("up1", 5),),
        scope=(rule("pass", zone=5),),
    ),
    kept("zone 0 is not zone 5", tcp4_request(), scope=(rule("pass", zone=5),)),
    Case(
        "a known connection's packet never looks at the rules",
        UPLINK,
        "up1",
        REQ4,
        settings=SCOPE,
        scope=(rule("pass"),),
        setup=(KNOWN,),
        after=(KNOWN.but(packets=6, seen="now"),),
        counters={("up1", C.REFRESHED): 1},
    ),
    Case(
        "a VM-opened connection the rules pass is not remembered",
        VMPORT,
        "vm1",
        VM_ORIGIN_SYN,
        vm_addrs=OWN,
        settings=SCOPE,
        scope=(rule("pass", proto="tcp"),),
        counters={("vm1", C.SCOPE_PASSED): 1},
    ),
    Case(
        "a rule naming an uplink never matches a VM-opened connection",
        VMPORT,
        "vm1",
        tcp4_reply("S"),
        vm_addrs=OWN,
        settings=SCOPE,
        scope=(rule("pass", uplink="up1"),),
        after=(
            Entry(
                Key(tcp4_reply("S"), reverse=True),
                flags=abi.F_ENTRY_VM_ORIGIN,
                vm="vm1",
                seen="now",
                state=ST.TCP_SYN_SENT,
                table="pending",
                packets=0,
            ),
        ),
        counters={("vm1", C.VM_ORIGIN_LEARNED): 1},
        table_counters={abi.TableCounter.PENDING_INSERTED: 1},
        vm_usage_after=(("vm1", (1, 0, 0)),),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_scope(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    check(dp, case)


def _entry(frame: Packet, iface: str = "up1", table: str = CONFIRMED) -> Entry:
    return Entry(Key(frame), mac="02:fa:00:00:00:0b", iface=iface, packets=3, table=table)


def test_flush_out_of_scope_removes_only_what_the_rules_pass(dp) -> None:  # type: ignore[no-untyped-def]
    """Three entries, one of them to port 22 (confirmed), one IPv6 to port 22
    (pending): the kernel walk removes those two, counts them per table and
    returns 2; the third stays untouched."""
    from .harness import view

    dp.reset()
    ssh6 = to_port(22, tcp6_request())
    entries = [_entry(SSH), _entry(ssh6, table="pending"), _entry(tcp4_request())]
    for e in entries:
        dp.put(e)
    dp.set_scope(PASS_SSH)
    before = dp.table_counter_values()
    run = dp.obj.program("lh_scope_flush").test_run(bytes(14))
    after = dp.table_counter_values()
    assert run.retval == 2
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        abi.TableCounter.CONFIRMED_REMOVED: 1,
        abi.TableCounter.PENDING_REMOVED: 1,
    }
    assert dp.table() == {entries[2].key.pack(): view(entries[2])}


def test_prune_uplinks_removes_the_entries_of_an_uplink_gone(dp) -> None:  # type: ignore[no-untyped-def]
    """up2 is no longer attached (role NONE): its entry goes, up1's stays;
    an entry with no last hop (a VM opened it) is not an uplink's."""
    from .harness import view

    dp.reset()
    vm_opened = Entry(Key(tcp4_reply("S"), reverse=True), flags=abi.F_ENTRY_VM_ORIGIN, vm="vm1")
    keep, gone = _entry(tcp4_request()), _entry(SSH, iface="up2")
    for e in (keep, gone, vm_opened):
        dp.put(e)
    dp.configure("up2", role=abi.Role.NONE)
    assert dp.obj.program("lh_prune_uplinks").test_run(bytes(14)).retval == 1
    assert dp.table() == {keep.key.pack(): view(keep), vm_opened.key.pack(): view(vm_opened)}

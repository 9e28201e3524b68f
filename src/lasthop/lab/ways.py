"""Each sampled connection's way through the lab, for the drawing: the
request, the reply without lasthop (where it dies, and the dying firewall's
drop counters), the reply with lasthop (by the last-hop MAC its entry
learned), and which VM the service gave each client's connections.

The ways come from the real lab (routing tables and links, lasthop.lab.discover)
and the outcomes from what the demo recorded (its traffic checks, its
`lasthop show` rows, the firewalls' counters); nothing is assumed from the plan.

    request     clN ─▶ fwN ─▶ sw ─▶ host ─▶ vmM
    without     vmM ─▶ host ─▶ sw ─▶ fw1 ⊣ (drop_invalid): fw1 never saw the request
    with        vmM ─▶ host ─▶ sw ─▶ fwN ─▶ clN   (the MAC lasthop learned: fwN's)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lasthop.lab import plan as P
from lasthop.lab.discover import Topology, route_way
from lasthop.lab.firewall import DROP_COUNTERS
from lasthop.lab.traffic import CheckResult

__all__ = ["Way", "Sketch", "sample_pairs", "by_routes", "settle_off", "drops_of", "with_lasthop"]

KINDS = ("request", "reply-off", "reply-on")
SAMPLE_PROTO, SAMPLE_FAMILY = "tcp", 4  # the sampled connections: TCP echo over IPv4


@dataclass(frozen=True)
class Way:
    kind: str  # one of KINDS
    client: str  # "cl2"
    vm: str  # "vm2"
    hops: tuple[str, ...]  # the namespaces crossed, in order
    label: str = ""  # written beside the way's last step
    dies_at: str = ""  # the namespace that drops it ("": it arrives)


@dataclass
class Sketch:
    """What the drawing of one host mode shows: the lab, the ways, the service."""

    topology: Topology
    ways: list[Way] = field(default_factory=list)
    drops: dict[str, str] = field(default_factory=dict)  # namespace -> "drop_invalid +9, ..."
    service: dict[str, dict[str, int]] = field(default_factory=dict)  # vm -> client -> conns
    caption: list[str] = field(default_factory=list)


def sample_pairs(plan: P.Plan) -> list[tuple[int, int]]:
    """(site, VM) of the sampled connections: client N to the N-th VM (wrapping round)."""
    return [(site, plan.vms[i % len(plan.vms)]) for i, site in enumerate(plan.sites)]


def _other_firewalls(plan: P.Plan, site: int) -> set[str]:
    return {plan.firewall(n).ns for n in plan.sites if n != site}


def by_routes(plan: P.Plan, topo: Topology) -> list[Way]:
    """The request and the reply without lasthop of each sampled connection,
    as the lab's routing tables send them; the reply stops at the first
    firewall that is not its client's (its conntrack never saw the request)."""
    ways = []
    for site, n in sample_pairs(plan):
        cl, vm = plan.client(site), plan.vm(n)
        ways.append(Way("request", cl.name, vm.name, tuple(route_way(topo, cl.ns, vm.addr.of(4)))))
        reply = route_way(topo, vm.ns, cl.addr.of(4), stop=_other_firewalls(plan, site))
        dies = reply[-1] if reply[-1] != cl.ns else ""
        ways.append(Way("reply-off", cl.name, vm.name, tuple(reply), dies_at=dies))
    return ways


def _answered(check: CheckResult, client: str, vm: str) -> tuple[int, int]:
    paths = check.select(client=client, vm=vm, proto=SAMPLE_PROTO, family=SAMPLE_FAMILY)
    return sum(p.succeeded for p in paths), sum(p.tried for p in paths)


def _moved(drops: dict[str, int]) -> str:
    return ", ".join(f"{k} +{drops[k]}" for k in DROP_COUNTERS if drops.get(k))


def settle_off(ways: list[Way], check: CheckResult) -> list[Way]:
    """Labels the ways without lasthop with what the check recorded."""
    out = []
    for w in ways:
        if w.kind == "request":
            out.append(dataclasses.replace(w, label=f"{w.client} → {w.vm} tcp"))
        elif w.kind == "reply-off":
            ok, tried = _answered(check, w.client, w.vm)
            where = f"dies at {w.dies_at.rsplit('-', 1)[1]}" if w.dies_at else "arrives"
            label = f"without lasthop: {ok}/{tried} answered, {where}"
            out.append(dataclasses.replace(w, label=label))
        else:
            out.append(w)
    return out


def drops_of(plan: P.Plan, drops: dict[str, dict[str, int]]) -> dict[str, str]:
    """Namespace -> the firewall's drop counters that moved ("drop_invalid +9")
    (accepted_new, which counts what was let in, is left out)."""
    return {plan.ns(fw): _moved(counts) for fw, counts in sorted(drops.items()) if _moved(counts)}


def _entry(rows: Iterable[dict[str, Any]], src: str, dst: str) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r.get("src") == src and r.get("dst") == dst and r.get("proto") == SAMPLE_PROTO
        ),
        None,
    )


def with_lasthop(
    plan: P.Plan, topo: Topology, rows: list[dict[str, Any]], check: CheckResult
) -> list[Way]:
    """The reply of each sampled connection with lasthop: from its VM to the
    namespace that owns the last-hop MAC of its entry (`lasthop show`), then
    as that firewall routes it. A connection without an entry gets none."""
    ways = []
    for site, n in sample_pairs(plan):
        cl, vm = plan.client(site), plan.vm(n)
        entry = _entry(rows, cl.addr.of(4), vm.addr.of(4))
        fw_ns = topo.owner_of_mac(str(entry.get("mac", ""))) if entry else None
        if entry is None or fw_ns is None:
            continue
        hops = topo.l2_way(vm.ns, fw_ns) + route_way(topo, fw_ns, cl.addr.of(4))[1:]
        ok, tried = _answered(check, cl.name, vm.name)
        label = f"with lasthop: {ok}/{tried} answered, last hop {entry['mac']}"
        ways.append(Way("reply-on", cl.name, vm.name, tuple(hops), label=label))
    return ways

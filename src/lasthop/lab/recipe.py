"""The usual Linux alternative to lasthop, on the lab's routed host: mark each
connection by the MAC of the firewall it came in from, and route the VMs'
replies by that mark.

    nft: prerouting, on the uplink, for a new connection:
             ct mark set ether saddr map { <fw1 MAC> : 1, <fw2 MAC> : 2, ... }
         prerouting, from the VMs:  meta mark set ct mark
    ip rule add fwmark N lookup 100+N;  ip route add default via <fwN> table 100+N

Where it stops working, and lasthop does not:
- a bridged host: the host does not route the VMs' replies, so there is no
  routing decision to steer (RecipeError);
- a firewall MAC it was not told about: a firewall added later, or a
  fail-over to a standby with another MAC — those connections get no mark,
  take the default route and die at fw1;
- it needs each firewall's IP address as a next hop, per table.
"""

from __future__ import annotations

from lasthop.lab import plan as P
from lasthop.lab import state
from lasthop.lab.namespaces import LabError, ns_exec, run
from lasthop.lab.topology import Lab

__all__ = [
    "RecipeError",
    "TABLE",
    "TABLE_BASE",
    "ruleset",
    "configure",
    "remove",
    "known_macs",
    "add_mac",
]

TABLE = "lab_recipe"  # nft table inet lab_recipe on the host
TABLE_BASE = 100  # routing table of firewall N: 100 + N
RULE_PRIORITY_BASE = 1000


class RecipeError(LabError):
    """The recipe cannot be configured on this lab."""


def ruleset(macs: dict[str, int], uplink: str = P.UPLINK, vm_side: str = P.BRIDGE) -> str:
    """The host's nft table: connection mark by the first packet's source MAC."""
    elements = ", ".join(f"{m} : {n}" for m, n in sorted(macs.items(), key=lambda kv: kv[1]))
    return f"""\
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
\tmap last_hop_mark {{
\t\ttype ether_addr : mark
\t\t{"elements = { " + elements + " }" if elements else ""}
\t}}
\tchain prerouting {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tiifname "{uplink}" ct state new ct mark set ether saddr map @last_hop_mark
\t\tiifname "{vm_side}" ct mark != 0 meta mark set ct mark
\t}}
}}
"""


def known_macs(lab: Lab, sites: list[int] | None = None) -> dict[str, int]:
    """MAC -> mark for each firewall as the plan gives it (what an operator would write down)."""
    return {
        lab.plan.firewall(n).transit_mac: n for n in (lab.state.sites if sites is None else sites)
    }


def configure(lab: Lab, macs: dict[str, int] | None = None) -> dict[str, int]:
    """Configures the recipe on the lab's host for *macs* (default: every
    firewall's MAC now); returns the MAC -> mark map it used."""
    plan = lab.plan
    if not plan.routed:
        raise RecipeError(
            "not applicable on a bridged host: the VMs' replies are bridged, not routed, "
            "so no ip rule ever sees them"
        )
    macs = known_macs(lab) if macs is None else macs
    host = plan.host
    ns_exec(host.ns, ["nft", "-f", "-"], input=ruleset(macs, host.uplink, host.bridge))
    _clear_rules(host.ns)
    _route_marks(lab, sorted(set(macs.values())))
    lab.state.recipe = True
    state.save(lab.state)
    return macs


def _route_marks(lab: Lab, marks: list[int]) -> None:
    """Per mark N: ip rule fwmark N -> table 100+N, whose default route is fwN."""
    host = lab.plan.host
    for family, which in ((4, "v4"), (6, "v6")):
        lines = []
        for n in marks:
            fw = lab.plan.firewall(n)
            lines += [
                f"rule add fwmark {n} lookup {TABLE_BASE + n} priority {RULE_PRIORITY_BASE + n}",
                f"route replace default via {getattr(fw.transit, which)} dev {host.uplink} "
                f"table {TABLE_BASE + n}",
            ]
        if lines:
            run(["ip", f"-{family}", "-n", host.ns, "-batch", "-"], input="\n".join(lines) + "\n")


def _clear_rules(ns: str) -> None:
    for family in (4, 6):
        rules = run(["ip", f"-{family}", "-n", ns, "rule", "show"]).stdout.splitlines()
        lines = []
        for line in rules:
            prio, _, rest = line.partition(":")
            if (
                prio.strip().isdigit()
                and RULE_PRIORITY_BASE < int(prio) <= RULE_PRIORITY_BASE + P.MAX_INDEX
            ):
                lines.append(f"rule del priority {prio.strip()}")
                table = TABLE_BASE + int(prio) - RULE_PRIORITY_BASE
                lines.append(f"route flush table {table}")
        if lines:
            run(
                ["ip", f"-{family}", "-n", ns, "-batch", "-"],
                input="\n".join(lines) + "\n",
                check=False,
            )


def remove(lab: Lab) -> None:
    """Removes the recipe from the host: nft table, ip rules, routing tables."""
    host = lab.plan.host
    ns_exec(host.ns, ["nft", "delete", "table", "inet", TABLE], check=False)
    _clear_rules(host.ns)
    lab.state.recipe = False
    state.save(lab.state)


def add_mac(lab: Lab, address: str, mark: int) -> None:
    """Tells the recipe one more firewall MAC: what an operator must do on every change."""
    host = lab.plan.host
    ns_exec(
        host.ns,
        ["nft", "add", "element", "inet", TABLE, "last_hop_mark", f"{{ {address} : {mark} }}"],
    )
    rules = run(
        ["ip", "-n", host.ns, "rule", "show", "priority", str(RULE_PRIORITY_BASE + mark)]
    ).stdout
    if not rules.strip():
        _route_marks(lab, [mark])

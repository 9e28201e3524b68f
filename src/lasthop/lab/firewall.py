"""The stateful firewalls: one nftables table per firewall namespace, with
conntrack in the forward chain and a named counter for every reason it drops.

A firewall lets a connection start only from its client side (TCP only with a
bare SYN), then passes what conntrack knows as established or related. A reply
it never saw the request of is dropped and counted: `drop_invalid` (a SYN-ACK
without a SYN) or `drop_outside` (a UDP/ICMP "reply", or a TCP segment
conntrack picks up mid-stream, arriving from the transit side).
"""

from __future__ import annotations

import json

from lasthop.lab import plan as P
from lasthop.lab.namespaces import ns_exec

__all__ = ["TABLE", "COUNTERS", "DROP_COUNTERS", "ruleset", "install", "counters"]

TABLE = "lab_fw"  # table inet lab_fw
# name -> what it counts (also the nft counter's comment)
COUNTERS = {
    "accepted_new": "new connections let in from the client side",
    "drop_invalid": "conntrack says invalid: e.g. a SYN-ACK whose SYN this firewall never saw",
    "drop_outside": "a new connection (or an unknown reply) from the transit side",
    "drop_not_syn": "a new TCP connection from the client side that is not a bare SYN",
    "drop_other": "anything else: other protocols",
}
DROP_COUNTERS = [name for name in COUNTERS if name.startswith("drop_")]


def ruleset(lan_if: str = P.FW_LAN) -> str:
    """The nftables table of one firewall (nft -f syntax)."""
    counters = "\n".join(
        f'\tcounter {name} {{ comment "{text}" }}' for name, text in COUNTERS.items()
    )
    return f"""\
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
{counters}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tct state invalid counter name "drop_invalid" drop
\t\tiifname != "{lan_if}" counter name "drop_outside" drop
\t\tmeta l4proto tcp tcp flags & (fin|syn|rst|ack) != syn counter name "drop_not_syn" drop
\t\tmeta l4proto {{ tcp, udp, icmp, ipv6-icmp }} counter name "accepted_new" accept
\t\tcounter name "drop_other" drop
\t}}
}}
"""


def install(ns: str) -> None:
    ns_exec(ns, ["nft", "-f", "-"], input=ruleset())


def counters(ns: str) -> dict[str, int]:
    """Packets per named counter of the firewall in ns."""
    out = ns_exec(ns, ["nft", "-j", "list", "counters", "table", "inet", TABLE]).stdout
    found: dict[str, int] = {}
    for item in json.loads(out).get("nftables", []):
        c = item.get("counter")
        if c:
            found[c["name"]] = int(c["packets"])
    return found

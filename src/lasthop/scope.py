"""Scope: which connections lasthop handles (issue 11, item 1).

The config's ``[[scope]]`` rules, first match wins, then ``scope_default``.
A rule matches a new connection by the uplink it arrives on, its zone, its
source and destination prefixes, its protocol and destination port; its
action is "learn" (lasthop handles it) or "pass" (the host's normal path,
counted ``scope_passed``). The agent writes them into lh_scope
(bpf/scope.h), the default last; the data path matches only connections it
is about to learn, never a known connection's packets. :func:`first_match`
is the same matching in Python, for ``explain``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator, model_validator

from lasthop import abi

__all__ = ["ScopeRule", "Decision", "compile_rules", "first_match", "PROTOCOLS"]

PROTOCOLS = {
    "tcp": abi.IPPROTO_TCP,
    "udp": abi.IPPROTO_UDP,
    "icmp": abi.IPPROTO_ICMP,
    "icmpv6": abi.IPPROTO_ICMPV6,
}
Action = Literal["learn", "pass"]
ACTIONS = {"learn": abi.ScopeAction.LEARN, "pass": abi.ScopeAction.PASS}


class ScopeRule(BaseModel):
    """One ``[[scope]]`` rule; a key left out matches anything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Action
    uplink: str | None = Field(default=None, min_length=1, max_length=abi.IFNAMSIZ - 1)
    zone: int | None = Field(default=None, ge=0, le=65535)
    src: IPvAnyNetwork | None = None
    dst: IPvAnyNetwork | None = None
    proto: Literal["tcp", "udp", "icmp", "icmpv6"] | None = None
    port: str | int | None = Field(
        default=None, description='destination port: 443, or a range "8000-8099"'
    )

    @field_validator("port")
    @classmethod
    def _port(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            lo, hi = _port_range(value)
            if not 0 <= lo <= hi <= 65535:
                raise ValueError(f"port {value!r}: give a port 0..65535 or a range LO-HI, LO <= HI")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ScopeRule:
        if self.src is not None and self.dst is not None and self.src.version != self.dst.version:
            raise ValueError("src and dst are of different address families")
        if self.port is not None and self.proto not in ("tcp", "udp"):
            raise ValueError('port needs proto = "tcp" or "udp" (other protocols have no ports)')
        return self

    def ports(self) -> tuple[int, int]:
        return _port_range(self.port) if self.port is not None else (0, 65535)

    def describe(self) -> str:
        """The rule as one line: "pass uplink eth1 proto tcp dst 10.0.0.0/8 port 22"."""
        parts: list[str] = [self.action]
        for key in ("uplink", "zone", "src", "dst", "proto", "port"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key} {value}")
        return " ".join(parts) if len(parts) > 1 else f"{self.action} everything"


def _port_range(value: str | int) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    lo, sep, hi = value.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"port {value!r}: give a port 0..65535 or a range LO-HI") from None


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> tuple[bytes, bytes]:
    """(address, mask) as 16 bytes each, network order, IPv4 in word 0."""
    if net is None:
        return bytes(16), bytes(16)
    return net.network_address.packed.ljust(16, b"\0"), net.netmask.packed.ljust(16, b"\0")


def compile_rule(rule: ScopeRule, ifindex: int) -> abi.ScopeRule:
    """The value and mask over the match key's words (bpf/abi.h, struct
    scope_rule) that match what *rule* names, *ifindex* its uplink (0: any)."""
    value, mask = bytearray(4 * abi.SCOPE_WORDS), bytearray(4 * abi.SCOPE_WORDS)
    for offset, net in ((0, rule.src), (16, rule.dst)):
        addr, netmask = _prefix(net)
        value[offset : offset + 16], mask[offset : offset + 16] = addr, netmask
    # word 8: proto | family << 8 | zone << 16, in host order like the data path builds it
    meta = meta_mask = 0
    net = rule.src or rule.dst
    if net is not None:
        meta |= (abi.FAMILY_V4 if net.version == 4 else abi.FAMILY_V6) << 8
        meta_mask |= 0xFF << 8
    if rule.proto is not None:
        meta, meta_mask = meta | PROTOCOLS[rule.proto], meta_mask | 0xFF
    if rule.zone is not None:
        meta, meta_mask = meta | rule.zone << 16, meta_mask | 0xFFFF << 16
    value[32:36], mask[32:36] = meta.to_bytes(4, "little"), meta_mask.to_bytes(4, "little")
    if ifindex:
        value[36:40], mask[36:40] = ifindex.to_bytes(4, "little"), b"\xff" * 4
    out = abi.ScopeRule(action=int(ACTIONS[rule.action]))
    ctypes.memmove(out.value, bytes(value), len(value))
    ctypes.memmove(out.mask, bytes(mask), len(mask))
    out.port_lo, out.port_hi = rule.ports()
    return out


def compile_rules(
    rules: Sequence[ScopeRule], default: Action, index_of: Callable[[str], int]
) -> list[abi.ScopeRule]:
    """lh_scope's rules in order, the default last (*index_of*: uplink name
    -> ifindex). At most MAX_SCOPE_RULES in all."""
    if len(rules) + 1 > abi.MAX_SCOPE_RULES:
        raise ValueError(f"at most {abi.MAX_SCOPE_RULES - 1} scope rules, not {len(rules)}")
    return [
        compile_rule(rule, index_of(rule.uplink) if rule.uplink else 0)
        for rule in [*rules, ScopeRule(action=default)]
    ]


@dataclass(frozen=True)
class Decision:
    """What the rules say of one connection: the rule (1-based; 0 = the default)."""

    action: Action
    rule: int
    text: str

    def to_json(self) -> dict[str, object]:
        return {"action": self.action, "rule": self.rule, "text": self.text}


def first_match(
    rules: Sequence[ScopeRule],
    default: Action,
    *,
    uplink: str | None,
    zone: int,
    src: str,
    dst: str,
    proto: int,
    dport: int,
) -> Decision:
    """The rules' decision on a new connection, as bpf/scope.h makes it
    (*uplink* None: opened by a VM, so rules naming an uplink do not match)."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    for n, rule in enumerate(rules, 1):
        lo, hi = rule.ports()
        if rule.uplink is not None and rule.uplink != uplink:
            continue
        if rule.zone is not None and rule.zone != zone:
            continue
        if rule.proto is not None and PROTOCOLS[rule.proto] != proto:
            continue
        if not lo <= dport <= hi:
            continue
        if rule.src is not None and (a.version != rule.src.version or a not in rule.src):
            continue
        if rule.dst is not None and (b.version != rule.dst.version or b not in rule.dst):
            continue
        return Decision(rule.action, n, rule.describe())
    return Decision(default, 0, f"scope_default = {default}")


def proto_number(name: str) -> int:
    """ "tcp" -> 6 (for callers holding a protocol by name)."""
    return PROTOCOLS.get(name) or socket.getprotobyname(name)

"""What a reload changes: the running config against the new one, key by key.

Every key is either applied live by :meth:`lasthop.controller.Controller.reload`
(and the agent) or kept at its running value with a warning naming it. The
new config was validated whole before this (a bad one changes nothing).

    live                                      kept (restart to change)
    uplink, vm_port (added, removed, zone,    table_size, pending_table_size,
      addresses), timeouts, idle_timeout,       pending_in_place: the pinned maps' sizes
    expiry_interval, relearn, on_vm_down,     netns, pin_root: where it runs
    vm_origin, vm_origin_quota, fast_path,    bridge, bridge_zone, routed, tc_hook:
    service, health, api_tokens (re-read)       how every interface is attached
                                              peer_redirect (a vm_port's own: live)
                                              api, api_socket, api_socket_group:
                                                the listening sockets
                                              sync, sync_cluster, sync_host
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lasthop.config import Config

__all__ = ["LIVE", "KEPT", "Plan", "Result", "plan"]

LIVE = frozenset(
    {
        "uplinks",
        "vm_ports",
        "timeouts",
        "idle_timeout",
        "expiry_interval",
        "relearn",
        "on_vm_down",
        "vm_origin",
        "vm_origin_quota",
        "fast_path",
        "services",
        "health",
        "api_tokens",
        "scope",
        "scope_default",
        "last_hop_names",
    }
)
KEPT = frozenset(
    {
        "table_size",
        "pending_table_size",
        "table_size_v6",
        "pending_table_size_v6",
        "pending_in_place",
        "netns",
        "pin_root",
        "bridge",
        "bridge_zone",
        "routed",
        "tc_hook",
        "peer_redirect",
        "api",
        "api_socket",
        "api_socket_group",
        "sync",
        "sync_cluster",
        "sync_host",
    }
)
# the config's name for a field (what the file says): uplinks is [[uplink]]
_ALIAS = {"uplinks": "uplink", "vm_ports": "vm_port", "services": "service"}


@dataclass(frozen=True)
class Plan:
    config: Config  # what runs after the reload: the new config, kept keys at their old values
    changed: list[str]  # live keys whose value changes
    kept: list[str]  # keys that changed in the file but keep their running value


@dataclass
class Result:
    """What a reload did (POST /v1/reload's answer, `lasthop reload`'s output)."""

    changed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "changed": self.changed,
            "kept": self.kept,
            "attached": self.attached,
            "detached": self.detached,
        }


def plan(old: Config, new: Config) -> Plan:
    """Which keys change, which are kept; every field is in LIVE or KEPT."""
    changed, kept = [], []
    for name in type(new).model_fields:
        if getattr(old, name) == getattr(new, name):
            continue
        key = _ALIAS.get(name, name)
        if name in LIVE:
            changed.append(key)
        else:
            assert name in KEPT, f"{name}: neither live nor kept (lasthop.reload)"
            kept.append(key)
    running = {n: getattr(old, n) for n in KEPT}
    return Plan(new.model_copy(update=running), changed, kept)

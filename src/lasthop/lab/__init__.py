"""The lab: a real network of Linux network namespaces — clients behind
stateful firewalls, a transit switch, a host (bridged or routed) with VMs
running servers — on which the demo and the end-to-end tests run real TCP and
UDP traffic, with and without lasthop. See docs/lab.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lasthop.lab.plan import DEFAULT_NAME, Plan
    from lasthop.lab.topology import Lab, down
    from lasthop.lab.traffic import CheckResult, PathResult, check

__all__ = ["DEFAULT_NAME", "Plan", "Lab", "down", "check", "CheckResult", "PathResult"]

# lazy: each VM's `python -m lasthop.lab.servers` imports this package first, and
# needs neither the topology nor the services' pydantic models (~0.28 s per lab up)
_WHERE = {
    "DEFAULT_NAME": "plan",
    "Plan": "plan",
    "Lab": "topology",
    "down": "topology",
    "check": "traffic",
    "CheckResult": "traffic",
    "PathResult": "traffic",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"lasthop.lab.{_WHERE[name]}"), name)

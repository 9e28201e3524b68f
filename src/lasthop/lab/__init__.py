"""The lab: a real network of Linux network namespaces — clients behind
stateful firewalls, a transit switch, a host (bridged or routed) with VMs
running servers — on which the demo and the end-to-end tests run real TCP and
UDP traffic, with and without lasthop. See docs/lab.md."""

from lasthop.lab.plan import DEFAULT_NAME, Plan
from lasthop.lab.topology import Lab, down
from lasthop.lab.traffic import CheckResult, PathResult, check

__all__ = ["DEFAULT_NAME", "Plan", "Lab", "down", "check", "CheckResult", "PathResult"]

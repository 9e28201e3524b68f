"""What a running lab is, on disk (/run/lasthop-lab/<name>/state.json): its plan and
the PIDs it started, so `status` and `down` work from another process and
`down` also after a crash (it then falls back to listing namespaces)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lasthop.lab.plan import Plan

__all__ = ["STATE_DIR", "LabState", "folder", "load", "save", "remove"]

STATE_DIR = Path("/run/lasthop-lab")


@dataclass
class LabState:
    name: str
    routed: bool
    sites: list[int]
    vms: list[int]
    servers: dict[str, int] = field(default_factory=dict)  # VM name -> server PID
    agent_pid: int = 0  # a lasthop agent the lab started, if any
    recipe: bool = False  # the Linux recipe is configured on the host
    # other processes it started (the HA lab's Redis, keepalived, agents): name -> PID
    processes: dict[str, int] = field(default_factory=dict)
    overlay: bool = False  # the firewalls reach the host through VXLAN

    @property
    def plan(self) -> Plan:
        return Plan(self.name, self.routed, list(self.sites), list(self.vms), self.overlay)

    @classmethod
    def of(cls, plan: Plan) -> LabState:
        return cls(plan.name, plan.routed, list(plan.sites), list(plan.vms), overlay=plan.overlay)


def folder(name: str) -> Path:
    """Where lab *name* keeps its state and its servers' logs."""
    return STATE_DIR / name


def _path(name: str) -> Path:
    return folder(name) / "state.json"


def load(name: str) -> LabState | None:
    try:
        return LabState(**json.loads(_path(name).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def save(state: LabState) -> None:
    folder(state.name).mkdir(parents=True, exist_ok=True)
    tmp = _path(state.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, _path(state.name))


def remove(name: str) -> None:
    shutil.rmtree(folder(name), ignore_errors=True)

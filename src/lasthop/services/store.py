"""The services' state file, ``/run/lasthop/<netns>/services.json``: the
definitions, their Maglev table ids and the VMs' health, kept across agent
restarts and edits made while no agent runs; and :func:`merge`, which lays
the config's services over it when an agent starts.

The state lives as long as its namespace's data path: `lasthop detach`
removes it (:func:`forget`), and a file written in a namespace that has
since gone is not read by a new namespace of the same name (the file names
its namespace by cookie, which the kernel never gives twice).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from lasthop.errors import ServiceError
from lasthop.services.model import Service, Status, first_error

__all__ = [
    "STATE_DIR",
    "STATE_VERSION",
    "ServiceStore",
    "StateFile",
    "VmHealth",
    "forget",
    "merge",
    "netns_cookie",
    "state_path",
]

STATE_DIR = Path(os.environ.get("LASTHOP_STATE_DIR", "/run/lasthop"))
STATE_VERSION = 1
SO_NETNS_COOKIE = 71  # linux/socket.h (5.14+): the socket's network namespace, as a cookie


class VmHealth(BaseModel):
    """What the checks found about one VM of one service."""

    status: Status = "unknown"
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    changes: int = 0  # status changes since the service was defined
    since: float = 0.0  # wall time of the last change
    detail: str = ""  # the last check's result


class StateFile(BaseModel):
    """The state file: what survives an agent restart."""

    version: int = STATE_VERSION
    services: list[Service] = Field(default_factory=list)
    # The config's services when the agent last started: a service the config
    # still defines the same way keeps its run-time changes (drain, VMs added).
    config_services: list[Service] | None = None
    ids: dict[str, int] = Field(default_factory=dict)  # service -> its slot in lh_maglev
    # service -> port -> health
    health: dict[str, dict[str, VmHealth]] = Field(default_factory=dict)
    ifindexes: dict[str, int] = Field(default_factory=dict)  # VM port -> ifindex last seen
    # the network namespace the file was written in (its cookie; 0: not known)
    netns_cookie: int = 0


def state_path(netns: str) -> Path:
    return STATE_DIR / netns / "services.json"


def forget(netns: str) -> bool:
    """Removes a namespace's services state (its folder); True when there was one."""
    folder = state_path(netns).parent
    existed = folder.exists()
    shutil.rmtree(folder, ignore_errors=True)
    return existed


def netns_cookie() -> int:
    """The calling thread's network namespace as the kernel names it: a cookie
    unique since boot (a name, or an nsfs inode number, may be used again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, sys.byteorder)


class ServiceStore:
    """The state file; written whole to a temporary file, then renamed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> StateFile | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = StateFile.model_validate_json(text)
        except ValidationError as err:
            why = first_error(err)
            raise ServiceError(f"{self.path}: not a lasthop state file: {why}") from None
        if state.version != STATE_VERSION:
            raise ServiceError(f"{self.path}: version {state.version}, expected {STATE_VERSION}")
        if state.netns_cookie and state.netns_cookie != netns_cookie():
            # written in a namespace that has gone: a new one of the same name starts clean
            self.path.unlink(missing_ok=True)
            return None
        return state

    def save(self, state: StateFile) -> None:
        state.netns_cookie = netns_cookie()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(state.model_dump_json(indent=1, exclude_none=True) + "\n")
        os.replace(tmp, self.path)


def merge(config_services: list[Service], state: StateFile | None) -> list[Service]:
    """The services to run: the config's, with the run-time changes made since
    (kept while the config defines that service as it did at the last start).
    Services added at run time stay; services the config no longer has go."""
    if state is None or state.config_services is None:
        runtime = [] if state is None else list(state.services)
        names = {s.name for s in config_services}
        return list(config_services) + [s for s in runtime if s.name not in names]
    old = {s.name: s for s in state.config_services}
    new = {s.name: s for s in config_services}
    current = {s.name: s for s in state.services}
    out: list[Service] = []
    for name, svc in new.items():
        if old.get(name) == svc:
            if name in current:  # unchanged in the config: keep run-time edits (or its removal)
                out.append(current[name])
        else:
            out.append(svc)  # new or changed in the config: the config wins
    out += [s for name, s in current.items() if name not in old and name not in new]
    return out

"""The :class:`ServiceManager`: the services of one namespace, their state
file and the data path's maps kept in step. It writes (who owns what,
docs/services.md):

===================  =====================================================
lh_services          service address (+ proto, port) -> id
lh_maglev[id]        the service's Maglev table: a new inner map, filled,
                     then swapped in with one update (no packet ever sees
                     a half-built table)
lh_settings.flags    F_SET_SERVICES while any service exists
lh_ifaces[vm]        F_IFACE_VM_DOWN (link gone or health says down),
                     vm_mac + F_IFACE_VM_MAC when the config names the MAC
lh_conns             only when a VM leaves a pool or a service goes: the
                     entries pinned to it move (reassign) or go (drop)
===================  =====================================================

A VM gets new connections while it is in the pool, not drained, its port is
attached and up, and its health is up (or not yet known). Connections
already pinned to a VM stay with it through drain and failing checks; they
move only when the VM is removed or down.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lasthop import abi
from lasthop.datapath import Maps
from lasthop.errors import NotAttachedError, ServiceConflict, ServiceNotFound
from lasthop.links import Links
from lasthop.logs import event
from lasthop.services.lookup import delete_table, matcher, svc_key, write_table
from lasthop.services.maglev import MAGLEV_SIZE, Member, build_table, slot_of
from lasthop.services.model import (
    HealthCheck,
    Service,
    ServiceVm,
    Status,
    check_unique,
    describe_key,
)
from lasthop.services.store import ServiceStore, StateFile, VmHealth, merge, state_path

__all__ = ["MapsSource", "PortState", "ServiceManager", "ServiceStatus", "VmStatus"]

log = logging.getLogger("lasthop")


@dataclass(frozen=True)
class PortState:
    """A VM port as the manager sees it now."""

    ifindex: int  # 0: no such interface
    attached: bool  # lh_ifaces says role VM port
    link_up: bool  # operationally up (True when unknown)

    @property
    def usable(self) -> bool:
        return bool(self.ifindex) and self.attached and self.link_up

    @property
    def text(self) -> str:
        if not self.ifindex:
            return "missing"
        if not self.attached:
            return "not-attached"
        return "up" if self.link_up else "down"


def _ifindex(port: str) -> int:
    try:
        return socket.if_nametoindex(port)
    except OSError:
        return 0


@dataclass(frozen=True)
class VmStatus:
    port: str
    ifindex: int
    weight: int
    address: str | None
    drained: bool
    health: Status
    link: str
    serving: bool  # gets new connections
    down: bool  # its connections move (or drop)
    slots: int  # Maglev slots it holds
    changes: int
    since: float
    detail: str

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ServiceStatus:
    service: Service
    id: int
    vms: list[VmStatus]

    def to_json(self) -> dict[str, object]:
        svc = self.service
        return {
            "name": svc.name,
            "id": self.id,
            "address": svc.address,
            "proto": svc.proto,
            "ports": svc.ports,
            "health": svc.health.model_dump() if svc.health else None,
            "vms": [vm.to_json() for vm in self.vms],
        }


MapsSource = Callable[[], AbstractContextManager["Maps | None"]]


class ServiceManager:
    """The services of one namespace: model, state file and maps kept in step.

    *open_maps* yields the data path's maps, or None when nothing is pinned
    (then only the state file changes; the next agent applies it). Every
    method holds *lock* (the controller's), so the API thread, the health
    checks and the agent loop never interleave map writes.
    """

    def __init__(
        self,
        netns: str,
        open_maps: MapsSource,
        *,
        links: Links | None = None,
        lock: threading.RLock | None = None,
        path: Path | None = None,
    ) -> None:
        self.netns = netns
        self._netlink = links  # the controller's; None: one of our own, made when first needed
        self.store = ServiceStore(path or state_path(netns))
        self._open_maps = open_maps
        self._lock = lock or threading.RLock()
        self._state = self.store.load() or StateFile()
        self._tables: dict[int, list[int]] = {}  # what lh_maglev holds, as this process wrote it
        self._up: dict[str, bool] | None = None  # None: not watched (no agent): assume up
        self._observed: dict[str, int] = {}  # VM port -> ifindex at the last refresh
        self.default_health = HealthCheck()
        self.health_changes = 0  # status changes seen by this process

    # -- reading -------------------------------------------------------------
    @property
    def services(self) -> list[Service]:
        return list(self._state.services)

    def get(self, name: str) -> Service:
        for svc in self._state.services:
            if svc.name == name:
                return svc
        raise ServiceNotFound(f"no service named {name!r}")

    def health_of(self, name: str, port: str) -> VmHealth:
        return self._state.health.setdefault(name, {}).setdefault(port, VmHealth())

    def status(self, name: str | None = None) -> list[ServiceStatus]:
        with self._lock:
            chosen = [self.get(name)] if name else self._state.services
            with self._maps() as maps:
                ports = self._port_states(maps)
            out = []
            for svc in chosen:
                sid = self._state.ids.get(svc.name, -1)
                table = self._tables.get(sid)
                counts: dict[int, int] = {}
                for value in table or []:
                    counts[value] = counts.get(value, 0) + 1
                vms = []
                for vm in svc.vms:
                    ps = ports[vm.port]
                    h = self.health_of(svc.name, vm.port)
                    vms.append(
                        VmStatus(
                            port=vm.port,
                            ifindex=ps.ifindex,
                            weight=vm.weight,
                            address=vm.address,
                            drained=vm.drained,
                            health=h.status,
                            link=ps.text,
                            serving=self._serving(svc, vm, ps),
                            down=self._down(vm.port, ps),
                            slots=counts.get(ps.ifindex, 0) if ps.ifindex else 0,
                            changes=h.changes,
                            since=h.since,
                            detail=h.detail,
                        )
                    )
                out.append(ServiceStatus(svc, sid, vms))
            return out

    # -- changing --------------------------------------------------------------
    def start(self, config_services: Iterable[Service], health: HealthCheck) -> None:
        """The agent starts: merge the config's services into the state file's,
        and write every table, key and flag (tables are rebuilt, not trusted)."""
        with self._lock:
            config_services = list(config_services)
            check_unique(config_services)
            self.default_health = health
            self._up = self._oper_up()
            state = self.store.load() or StateFile()
            services = merge(config_services, state)
            check_unique(services)
            state.services = services
            state.config_services = config_services
            self._state = state
            self._tables.clear()
            self._sync(force=True)
            self._save()
            if services:
                log.info("services: %s", ", ".join(s.name for s in services))
            for st in self.status():
                for vm in st.vms:
                    if vm.link != "up":
                        log.warning(
                            "service %s: VM port %s is %s: it gets no connections",
                            st.service.name,
                            vm.port,
                            vm.link,
                        )

    def reload(self, config_services: Iterable[Service], health: HealthCheck) -> None:
        """The config was re-read: the same merge as at start (the config wins
        for what it changed, run-time edits stay for what it did not), applied
        to the running tables. A service the config dropped is removed (its
        connections forgotten); new or changed ones are written."""
        with self._lock:
            config_services = list(config_services)
            check_unique(config_services)
            self.default_health = health
            services = merge(config_services, self._state)
            check_unique(services)
            wanted = {s.name for s in services}
            for svc in list(self._state.services):
                if svc.name not in wanted:
                    self.remove(svc.name)
            before = {s.name: s for s in self._state.services}
            self._state.services = services
            self._state.config_services = config_services
            changed = [s.name for s in services if before.get(s.name) != s]
            self._changed("services_reload" if changed else None, services=",".join(changed))

    def add(self, service: Service) -> ServiceStatus:
        """A new service (ServiceConflict if the name or an address is taken)."""
        with self._lock:
            if any(s.name == service.name for s in self._state.services):
                raise ServiceConflict(
                    f"service {service.name!r} exists: remove it first, "
                    "or add VMs with `service add NAME --vm PORT`"
                )
            check_unique([*self._state.services, service])
            self._state.services.append(service)
            self._changed(
                "service_add",
                service=service.name,
                key=describe_key(service, 0),
                vms=",".join(v.port for v in service.vms),
            )
            return self.status(service.name)[0]

    def add_vms(self, name: str, vms: Iterable[ServiceVm]) -> ServiceStatus:
        with self._lock:
            svc = self.get(name)
            new = list(vms)
            for vm in new:
                if any(v.port == vm.port for v in svc.vms):
                    raise ServiceConflict(f"{vm.port!r} is already in the pool of {name!r}")
            self._replace(svc.model_copy(update={"vms": [*svc.vms, *new]}))
            self._changed("service_vms_add", service=name, vms=",".join(v.port for v in new))
            return self.status(name)[0]

    def remove(self, name: str) -> int:
        """Removes a service; its connections are forgotten (their packets are
        routed as usual from then on). Returns how many."""
        with self._lock:
            self.get(name)
            match = matcher(self._state.services)  # as the data path found them
            self._state.services = [s for s in self._state.services if s.name != name]
            self._state.health.pop(name, None)
            gone = self._state.ids.pop(name)
            removed = 0
            with self._maps() as maps:
                if maps is not None:
                    # its table first (no new connection is pinned), then its
                    # connections (found by its keys, as the data path finds
                    # them), then the keys
                    delete_table(maps.maglev, gone)
                    self._tables.pop(gone, None)
                    removed = self._forget_connections(maps, gone, lambda k: match(k) == name)
                    self._sync_maps(maps, force=False, drop_ids={gone})
            self._save()
            event(log, "service_remove", level=logging.WARNING, service=name, forgotten=removed)
            return removed

    def remove_vms(self, name: str, ports: Iterable[str]) -> dict[str, int]:
        """Takes VMs out of a pool; their connections move to the VMs left
        (on_vm_down = reassign) or are forgotten (drop). Returns counts."""
        with self._lock:
            svc = self.get(name)
            gone = list(dict.fromkeys(ports))
            for port in gone:
                svc.vm(port)
            self._replace(
                svc.model_copy(update={"vms": [v for v in svc.vms if v.port not in gone]})
            )
            for port in gone:
                self._state.health.get(name, {}).pop(port, None)
            moved = {"moved": 0, "dropped": 0}
            with self._maps() as maps:
                if maps is not None:
                    self._sync_maps(maps, force=False)  # the new table first: moves follow it
                    ifindexes = {_ifindex(p) or self._state.ifindexes.get(p, 0) for p in gone} - {0}
                    moved = self._move_connections(maps, self.get(name), ifindexes)
            self._save()
            event(
                log,
                "service_vms_remove",
                level=logging.WARNING,
                service=name,
                vms=",".join(gone),
                moved=moved["moved"],
                dropped=moved["dropped"],
            )
            return moved

    def set_drained(self, name: str, ports: Iterable[str], drained: bool) -> ServiceStatus:
        """Drain: no new connections, existing ones stay. Undrain: back in."""
        with self._lock:
            svc = self.get(name)
            wanted = set(ports)
            for port in wanted:
                svc.vm(port)
            vms = [
                v.model_copy(update={"drained": drained}) if v.port in wanted else v
                for v in svc.vms
            ]
            self._replace(svc.model_copy(update={"vms": vms}))
            self._changed(
                "service_drain" if drained else "service_undrain",
                service=name,
                vms=",".join(sorted(wanted)),
            )
            return self.status(name)[0]

    def report(self, name: str, port: str, ok: bool, detail: str) -> Status | None:
        """A health check's result; returns the new status when it changed."""
        with self._lock:
            try:
                svc = self.get(name)
                svc.vm(port)
            except ServiceNotFound:
                return None  # removed while the check ran
            check = svc.check(self.default_health)
            h = self.health_of(name, port)
            h.detail = detail
            old = h.status
            if ok:
                h.successes, h.failures = h.successes + 1, 0
                if old == "unknown" or (old != "up" and h.successes >= check.rise):
                    h.status = "up"
            else:
                h.failures, h.successes = h.failures + 1, 0
                if old == "unknown" or (old == "up" and h.failures >= check.fall):
                    h.status = "unhealthy"
                if check.down_after and h.failures >= check.down_after:
                    h.status = "down"
            if h.status == old:
                return None
            h.changes += 1
            h.since = time.time()
            self.health_changes += 1
            level = logging.INFO if old == "unknown" and h.status == "up" else logging.WARNING
            event(
                log, "health", level=level, service=name, vm=port, old=old, new=h.status,
                detail=detail,
            )  # fmt: skip
            self._changed(None)
            return h.status

    def refresh_links(self) -> bool:
        """Re-reads the VM ports' link states; re-applies when one changed."""
        with self._lock:
            mine = {vm.port for s in self._state.services for vm in s.vms}
            if not mine:
                return False  # nothing to watch: no netlink dump every second
            up = self._oper_up()
            old = self._up or {}
            now = {p: _ifindex(p) for p in mine}
            changed = [
                p
                for p in sorted(mine)
                if up.get(p) != old.get(p) or now[p] != self._observed.get(p)
            ]
            self._up = up
            self._observed = now
            for p in changed:
                state = "missing" if p not in up else ("up" if up[p] else "down")
                log.warning("VM port %s is %s (ifindex %d)", p, state, now[p])
            if changed:
                self._changed(None)
            else:
                with self._maps() as maps:
                    if maps is not None:
                        self._mark_gone(maps)  # a port's removal may have cleared the mark
            return bool(changed)

    def sync(self) -> None:
        """Writes the maps from the model again (after interfaces changed)."""
        with self._lock:
            self._sync(force=False)
            self._save()

    # -- internals -------------------------------------------------------------
    def _oper_up(self) -> dict[str, bool]:
        """VM port name -> operationally up (netlink)."""
        if self._netlink is None:
            self._netlink = Links()
        return self._netlink.oper_up()

    @contextlib.contextmanager
    def _maps(self) -> Iterator[Maps | None]:
        try:
            cm = self._open_maps()
            maps = cm.__enter__()
        except NotAttachedError:
            yield None
            return
        try:
            yield maps
        finally:
            cm.__exit__(None, None, None)

    def _replace(self, svc: Service) -> None:
        self._state.services = [svc if s.name == svc.name else s for s in self._state.services]

    def _changed(self, what: str | None, **fields: Any) -> None:
        """Maps and state file follow the model; *what* (with *fields*) is logged."""
        self._sync(force=False)
        self._save()
        if what:
            event(log, what, **fields)

    def _save(self) -> None:
        mine = {vm.port for s in self._state.services for vm in s.vms}
        self._state.ifindexes = {p: i for p, i in self._state.ifindexes.items() if p in mine}
        pools = {s.name: {vm.port for vm in s.vms} for s in self._state.services}
        self._state.health = {
            name: {p: h for p, h in ports.items() if p in pools[name]}
            for name, ports in self._state.health.items()
            if name in pools
        }
        if self._state.services or self.store.path.exists():  # no services, no file
            self.store.save(self._state)

    def _sync(self, *, force: bool) -> None:
        self._assign_ids()
        with self._maps() as maps:
            if maps is not None:
                self._sync_maps(maps, force=force)

    def _assign_ids(self) -> None:
        names = {s.name for s in self._state.services}
        self._state.ids = {n: i for n, i in self._state.ids.items() if n in names}
        used = set(self._state.ids.values())
        free = (i for i in range(abi.MAX_SERVICES) if i not in used)
        for svc in self._state.services:
            if svc.name not in self._state.ids:
                self._state.ids[svc.name] = next(free)

    def _port_states(self, maps: Maps | None) -> dict[str, PortState]:
        out = {}
        for svc in self._state.services:
            for vm in svc.vms:
                ifindex = _ifindex(vm.port)
                attached = bool(ifindex) and (
                    maps is None or maps.iface(ifindex).role == abi.Role.VM_PORT
                )
                up = True if self._up is None else self._up.get(vm.port, True)
                out[vm.port] = PortState(ifindex, attached, up)
        return out

    def _serving(self, svc: Service, vm: ServiceVm, ps: PortState) -> bool:
        status = self.health_of(svc.name, vm.port).status
        return ps.usable and not vm.drained and status in ("unknown", "up")

    def _down(self, port: str, ps: PortState) -> bool:
        """A VM is down when its port is gone or down, or when every service
        it serves has found it down."""
        if not ps.ifindex or not ps.link_up:
            return True
        statuses = [
            self.health_of(s.name, port).status
            for s in self._state.services
            if any(v.port == port for v in s.vms)
        ]
        return bool(statuses) and all(st == "down" for st in statuses)

    def _sync_maps(self, maps: Maps, *, force: bool, drop_ids: Iterable[int] = ()) -> None:
        """Tables, then keys, then VM flags, then the flag; stale keys and
        tables go last. A table never names a VM that is down, so the data
        path never reassigns a connection to one."""
        ports = self._port_states(maps)
        for svc in self._state.services:
            sid = self._state.ids[svc.name]
            members = [
                Member(vm.port, ports[vm.port].ifindex, vm.weight)
                for vm in svc.vms
                if self._serving(svc, vm, ports[vm.port])
            ]
            table = build_table(members)
            if force or self._tables.get(sid) != table:
                write_table(maps.maglev, sid, table)
                self._tables[sid] = table
        wanted: dict[bytes, int] = {}
        for svc in self._state.services:
            for addr, proto, port in svc.svc_keys():
                wanted[svc_key(addr, proto, port, svc.family)] = self._state.ids[svc.name]
        for key, sid in wanted.items():
            maps.services.update(key, bytes(abi.SvcInfo(id=sid)))
        self._sync_vm_ports(maps, ports)
        self._grant_addresses(maps, ports)
        settings = maps.get_settings()
        flags = settings.flags & ~abi.F_SET_SERVICES | (abi.F_SET_SERVICES if wanted else 0)
        if flags != settings.flags:
            settings.flags = flags
            maps.set_settings(settings)
        for key in list(maps.services.keys()):
            if key not in wanted:
                maps.services.delete(key)
        ids = set(self._state.ids.values())
        stale = set(range(abi.MAX_SERVICES)) if force else {*self._tables, *drop_ids}
        for sid in sorted(stale - ids):
            delete_table(maps.maglev, sid)
            self._tables.pop(sid, None)

    def _sync_vm_ports(self, maps: Maps, ports: dict[str, PortState]) -> None:
        macs = {vm.port: vm.mac for s in self._state.services for vm in s.vms if vm.mac}
        self._mark_gone(maps)  # before the new ifindexes replace the old ones
        for port, ps in ports.items():
            if ps.ifindex:
                self._state.ifindexes[port] = ps.ifindex
            if not ps.attached:
                continue
            cfg = maps.iface(ps.ifindex)
            before = bytes(cfg)
            down = self._down(port, ps)
            cfg.flags = cfg.flags & ~abi.F_IFACE_VM_DOWN | (abi.F_IFACE_VM_DOWN if down else 0)
            mac = macs.get(port)
            if mac:
                ctypes.memmove(cfg.vm_mac, bytes.fromhex(mac.replace(":", "")), abi.ETH_ALEN)
                cfg.flags |= abi.F_IFACE_VM_MAC
            if bytes(cfg) != before:
                maps.set_iface(ps.ifindex, cfg)
                if (abi.IfaceCfg.from_buffer_copy(before).flags ^ cfg.flags) & abi.F_IFACE_VM_DOWN:
                    log.warning(
                        "VM port %s %s",
                        port,
                        "down: its connections move"
                        if down
                        else "up again: it serves its connections",
                    )

    def _grant_addresses(self, maps: Maps, ports: dict[str, PortState]) -> None:
        """Each pool member may open connections from its service's address
        (full proxies), and from its own address when the pool names it --
        the data path learns the guest's MAC only from a frame of an address
        it owns; a port that left a pool loses them (lh_vm_addrs). An own
        address the port already holds (configured, learned) stays as it is."""
        wanted, own = set(), set()
        for svc in self._state.services:
            addr = svc.svc_keys()[0][0]
            for vm in svc.vms:
                ifindex = ports[vm.port].ifindex
                if not ifindex:
                    continue
                wanted.add(bytes(abi.vm_addr_key(ifindex, svc.family, addr)))
                if vm.address:
                    mine = ipaddress.ip_address(vm.address)
                    family = abi.FAMILY_V4 if mine.version == 4 else abi.FAMILY_V6
                    own.add(bytes(abi.vm_addr_key(ifindex, family, mine.packed)))
        granted = {
            bytes(k) for k, v in maps.vm_addr_items() if v.origin == abi.VmAddrOrigin.SERVICE
        }
        for key in wanted - granted:
            maps.vm_addrs.update(key, bytes(abi.VmAddr(abi.VmAddrOrigin.SERVICE)))
        for key in own - wanted - granted:
            if maps.vm_addrs.lookup(key) is None:  # configured or learned: kept as it is
                maps.vm_addrs.update(key, bytes(abi.VmAddr(abi.VmAddrOrigin.SERVICE)))
        for key in granted - wanted - own:
            maps.vm_addrs.delete(key)

    def _mark_gone(self, maps: Maps) -> None:
        """A VM port that went away (or came back as a new interface) leaves
        connections pinned to its old ifindex: mark that ifindex down so the
        data path moves them, unless another interface has it now."""
        for port, old in self._state.ifindexes.items():
            if old == _ifindex(port):
                continue
            cfg = maps.iface(old)
            if cfg.role == abi.Role.NONE and not cfg.flags & abi.F_IFACE_VM_DOWN:
                maps.set_iface(old, abi.IfaceCfg(flags=abi.F_IFACE_VM_DOWN))
                log.warning("VM port %s (ifindex %d) is gone: its connections move", port, old)

    def _move_connections(self, maps: Maps, svc: Service, ifindexes: set[int]) -> dict[str, int]:
        """Entries of *svc* pinned to *ifindexes*: to the table's choice now
        (reassign), or deleted (drop, or no VM left). The kernel finds and
        changes them (lh_svc_walk): nothing here reads the table."""
        drop = bool(maps.get_settings().flags & abi.F_SET_VM_DOWN_DROP)
        sid = self._state.ids[svc.name]
        moved = dropped = 0
        ports = sorted(ifindexes)
        for i in range(0, len(ports), abi.SVC_WALK_IFACES):
            some = ports[i : i + abi.SVC_WALK_IFACES]
            req = abi.SvcWalk(service_id=sid, count=len(some), drop=int(drop))
            req.ifindex[: len(some)] = some
            done = maps.svc_walk(req)
            if done is None:  # no lh_svc_walk (an older agent's pins): walk here
                return self._move_connections_walking(maps, svc, ifindexes, drop)
            moved, dropped = moved + done.moved, dropped + done.dropped
        return self._moved(maps, moved, dropped)

    def _moved(self, maps: Maps, moved: int, dropped: int) -> dict[str, int]:
        if moved:
            maps.request_expiry()  # the rewrites may carry an older last_seen: deadlines moved
            maps.add_counter(0, abi.Counter.SVC_REASSIGNED, moved)
        if dropped:
            maps.add_counter(0, abi.Counter.AGENT_REMOVED, dropped)
        return {"moved": moved, "dropped": dropped}

    def _move_connections_walking(
        self, maps: Maps, svc: Service, ifindexes: set[int], drop: bool
    ) -> dict[str, int]:
        """_move_connections without lh_svc_walk: reads the whole table."""
        table = self._tables.get(self._state.ids[svc.name]) or [0] * MAGLEV_SIZE
        match = matcher(self._state.services)
        moved = dropped = 0
        for key, entry in list(maps.entries()):
            if entry.vm_ifindex not in ifindexes or entry.flags & abi.F_ENTRY_VM_ORIGIN:
                continue
            if match(key) != svc.name:
                continue
            # read-modify-write: a packet between the two may lose its refresh
            new = table[slot_of(key)]
            if drop or not new:
                dropped += maps.delete(key)
                continue
            entry.vm_ifindex = new
            moved += maps.update_entry(key, entry)  # False: expired or evicted meanwhile
        return self._moved(maps, moved, dropped)

    def _forget_connections(self, maps: Maps, sid: int, ours: Callable[[abi.ConnKey], bool]) -> int:
        """Deletes the connections of service *sid* (VM-opened ones stay): the
        kernel finds them by the service's keys, still in lh_services
        (lh_svc_walk); without it, every entry *ours* picks, read here."""
        done = maps.svc_walk(abi.SvcWalk(service_id=sid, drop=1))
        if done is not None:
            if done.dropped:
                maps.add_counter(0, abi.Counter.AGENT_REMOVED, done.dropped)
            return int(done.dropped)
        removed = 0
        for key, entry in list(maps.entries()):
            if entry.vm_ifindex and not entry.flags & abi.F_ENTRY_VM_ORIGIN and ours(key):
                removed += maps.delete(key)
        if removed:
            maps.add_counter(0, abi.Counter.AGENT_REMOVED, removed)
        return removed

"""The one controller the CLI and the REST API drive: attach the data path
to a namespace's interfaces, read its table and counters, age, flush, detach.

The CLI and API do no map I/O themselves; everything goes through here. In
the agent two threads use it (the agent loop and the API server): every
method that writes a map or attaches holds the controller's one lock.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import heapq
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lasthop import abi, libbpf, netns
from lasthop.clock import Clock
from lasthop.connections import (
    Connection,
    ConnFilter,
    counter_name,
    decode,
    endpoint_str,
    format_mac,
    ifname,
)
from lasthop.datapath import (
    Datapath,
    Maps,
    Pins,
    changes_ring_size,
    default_in_place,
    detach_filter,
    forget_links,
    hook_kind,
    hops_in_use,
    removed_as,
)
from lasthop.errors import (
    ConfigError,
    DatapathError,
    LinkError,
    NotAttachedError,
    SyncError,
    TableSizeError,
)
from lasthop.links import Link, Links, link_kind_name
from lasthop.logs import event

if TYPE_CHECKING:  # both load pydantic: the commands that only read maps go without
    from lasthop.config import Config
    from lasthop.reload import Result as ReloadResult
    from lasthop.services.manager import ServiceManager

__all__ = [
    "Controller",
    "Attached",
    "InterfaceInfo",
    "Stats",
    "DatapathError",
    "LinkError",
    "NotAttachedError",
    "TableSizeError",
]

if TYPE_CHECKING:
    from lasthop.explain import Explanation, Query
    from lasthop.sync import Replicator, SyncStatus

log = logging.getLogger("lasthop")
EXPORT_FORMAT = "lasthop-export/1"  # lasthop export's files: the sync's wire records
_FRAME = bytes(14)  # test run needs a frame; lh_expire and lh_stats ignore it
F = TypeVar("F", bound=Callable[..., Any])
_RefusedKey = TypeVar("_RefusedKey", abi.HopKey, abi.EndpointKey)  # Controller._refused


def in_place_room(config: Config, pinned_conns4: int | None) -> int:
    """The room lh_conns4 keeps beside table_size for unconfirmed entries:
    pending_in_place when the config names it; else (the default) a quarter of
    the pending table with sync off, 0 with sync on -- unless *pinned_conns4*
    (an older agent's lh_conns4, its max_entries) has another room: kept, so a
    restart never needs a detach for a default (docs/config.md)."""
    if config.pending_in_place is not None:
        return config.pending_in_place
    room = 0 if config.sync else default_in_place(config.pending_table_size, config.table_size)
    pinned_room = pinned_conns4 - config.table_size if pinned_conns4 is not None else room
    if pinned_room != room and pinned_room >= 0:
        log.info(
            "the pinned lh_conns4 has room for %d connections waiting in place, the default "
            "%d: kept (`lasthop detach` and a restart resize it)",
            pinned_room,
            room,
        )
        return pinned_room
    return room


def in_place_quota(config: Config, room: int) -> int:
    """lh_settings' inplace_quota: the room lh_conns4 keeps for it, or 0 with
    sync on -- a peer's records and an import rewrite entries from user space,
    which cannot clear an in-place entry's bit atomically (docs/table.md), so
    with sync the new connections keep to the pending LRU (warned when the
    config asked for it)."""
    if config.sync:
        if config.pending_in_place:
            log.warning("pending_in_place is not used with sync on: new connections wait in "
                        "the pending table")  # fmt: skip
        return 0
    return room


def _locked(method: F) -> F:
    """Runs *method* holding the controller's lock (map writes, attach, detach)."""

    @functools.wraps(method)
    def wrapper(self: Controller, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class Attached:
    """What a running agent has attached, by ifindex."""

    uplinks: dict[int, str] = field(default_factory=dict)
    vm_ports: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TableStats:
    """One of the two tables, as the kernel counts it (no walk in Python)."""

    entries: int  # the kernel's element count, now
    capacity: int
    inserted: int
    expired: int
    removed: int  # by the agent (flush, services) or replaced by the data path
    evicted: int  # pending only: LRU evictions (see docs/datapath.md)
    states: dict[str, int]  # live entries by state, as the last expiry pass found them

    def to_json(self) -> dict[str, object]:
        return {
            "entries": self.entries,
            "capacity": self.capacity,
            "inserted": self.inserted,
            "expired": self.expired,
            "removed": self.removed,
            "evicted": self.evicted,
            "states": self.states,
        }


@dataclass(frozen=True)
class Stats:
    totals: dict[str, int]
    interfaces: dict[str, dict[str, int]]
    confirmed: TableStats
    pending: TableStats
    promoted: int  # pending -> confirmed
    confirm_refused: int  # the confirmed table was full
    expiry_passes: int  # runs of lh_expire that walked the tables
    expiry_skipped: int  # runs that had no need to: nothing changed, nothing due
    last_pass_age_s: float | None  # None: no pass yet
    next_due_s: float | None  # until the earliest deadline the last walk left; None: no walk
    # uplink -> MAC -> frames its allow_last_hops/deny_last_hops refused (the most recent
    # MAX_REFUSED_HOPS MACs: an LRU in the kernel)
    untrusted_hops: dict[str, dict[str, int]] = field(default_factory=dict)
    # uplink -> tunnel endpoint -> requests its allow_endpoints/deny_endpoints refused (LRU)
    untrusted_endpoints: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return self.confirmed.entries + self.pending.entries

    @property
    def capacity(self) -> int:
        return self.confirmed.capacity + self.pending.capacity

    def to_json(self) -> dict[str, object]:
        return {
            "totals": self.totals,
            "interfaces": self.interfaces,
            "table": {
                "entries": self.entries,
                "capacity": self.capacity,
                "evicted": self.pending.evicted,
                "promoted": self.promoted,
                "confirm_refused": self.confirm_refused,
                "expiry_passes": self.expiry_passes,
                "expiry_skipped": self.expiry_skipped,
                "last_pass_age_s": self.last_pass_age_s,
                "next_due_s": self.next_due_s,
                "confirmed": self.confirmed.to_json(),
                "pending": self.pending.to_json(),
            },
            "untrusted_hops": self.untrusted_hops,
            "untrusted_endpoints": self.untrusted_endpoints,
        }


@dataclass(frozen=True)
class InterfaceInfo:
    """An interface the data path is configured for (lh_ifaces)."""

    name: str
    ifindex: int
    role: str  # "uplink" | "vm_port"
    zone: int
    slot: int
    mac: str
    routed: bool
    link_down: bool = False  # uplink: its link is down, its replies take routing
    link_kind: str = "ethernet"  # what its frames carry: ethernet, vxlan, geneve, l3
    # what holds its program at tc ingress: a "tcx" link, a "clsact" filter, or
    # "none" (configured, yet no program there: taken off by hand, or the agent failed)
    hook: str = "none"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ifindex": self.ifindex,
            "role": self.role,
            "zone": self.zone,
            "slot": self.slot,
            "mac": self.mac,
            "routed": self.routed,
            "link_down": self.link_down,
            "link_kind": self.link_kind,
            "hook": self.hook,
        }


class Controller:
    """lasthop in one network namespace.

    Entering *netns* moves the whole process into it (netlink and tc calls
    act there), so build one controller per process.
    """

    def __init__(self, netns_name: str | None = None, pin_root: Path | None = None) -> None:
        if netns_name:
            netns.enter(netns_name)
        self.netns = netns_name or netns.current_name()
        self.pins = Pins((pin_root or netns.bpffs_root() / "lasthop") / self.netns)
        self.links = Links()
        self.datapath: Datapath | None = None
        self.attached = Attached()
        self._config: Config | None = None
        self._in_place_room = 0  # lh_conns4's room for unconfirmed entries, fixed at start
        self._lock = threading.RLock()
        self.replicator: Replicator | None = None

    def close(self) -> None:
        self.stop_sync()
        if self.datapath is not None:
            self.datapath.close()
        self.links.close()

    # -- running -----------------------------------------------------------
    @_locked
    def start(self, config: Config) -> Attached:
        """Loads (or adopts) the data path and attaches it as *config* says."""
        self._config = config
        uplinks = [(self.links.by_name(i.name, "uplink"), i.zone) for i in config.uplinks]
        vm_ports = [(self.links.by_name(i.name, "VM port"), i.zone) for i in config.vm_ports]
        if not uplinks:
            raise LinkError(
                "no uplink given: name at least one (--uplink IF or [[uplink]] in the config)"
            )
        if config.bridge:
            bridge = self.links.by_name(config.bridge, "bridge")
            up_index = {link.index for link, _ in uplinks}
            known = {link.index for link, _ in vm_ports}
            vm_ports += [
                (p, config.bridge_zone)
                for p in self.links.ports(bridge)
                if p.index not in up_index and p.index not in known
            ]
        adopted = self.pins.exist()
        pinned = libbpf.pinned_info(self.pins.path("lh_conns4"))
        self._in_place_room = in_place_room(config, pinned.max_entries if pinned else None)
        self.datapath = Datapath(
            self.pins,
            table_size=config.table_size,
            pending_size=config.pending_table_size or 0,
            table_size_v6=config.table_size_v6 or 0,
            pending_size_v6=config.pending_table_size_v6 or 0,
            in_place=self._in_place_room,
            changes_size=changes_ring_size(bool(config.sync)),
            tc_hook=config.tc_hook,
        )
        self._write_settings(
            config,
            # services: until they are synced; hops moved: as lh_hop_moved, which stays
            keep=abi.F_SET_SERVICES | abi.F_SET_HOPS_MOVED | abi.F_SET_ENDPOINTS_DOWN,
            hz=Clock(self.datapath.clock_prog.fd).hz(),
        )
        for link, zone in uplinks:
            self.attach(link, abi.Role.UPLINK, zone)
        for link, zone in vm_ports:
            self.attach(link, abi.Role.VM_PORT, zone)
        self._forget_stale()
        self._write_scope(config)
        self.services.start(config.services, config.health)
        event(
            log,
            "start",
            netns=self.netns,
            table="adopted" if adopted else "new",
            pins=str(self.pins.folder),
        )
        return self.attached

    def _write_settings(self, config: Config, *, keep: int, hz: int) -> None:
        """lh_settings from *config*; the flags in *keep* stay as the map has them."""
        assert self.datapath is not None
        maps = self.datapath.maps
        settings = abi.Settings(flags=abi.F_SET_RELEARN_FIRST if config.relearn == "first" else 0)
        settings.flags |= abi.F_SET_VM_DOWN_DROP if config.on_vm_down == "drop" else 0
        settings.flags |= 0 if config.vm_origin else abi.F_SET_NO_VM_ORIGIN
        settings.flags |= abi.F_SET_FAST_PATH if config.fast_path else 0
        settings.flags |= abi.F_SET_SCOPE if config.scoped() else 0
        settings.flags |= abi.F_SET_ENDPOINTS if config.lists_endpoints() else 0
        settings.flags |= maps.get_settings().flags & keep
        settings.hz = hz
        for state, seconds in config.timeouts.by_state().items():
            settings.timeout[state] = round(seconds)
        settings.vm_quota = config.vm_origin_quota
        settings.inplace_quota = in_place_quota(config, self._in_place_room)
        settings.flags |= abi.F_SET_INPLACE if settings.inplace_quota else 0
        maps.set_settings(settings)

    @property
    def config(self) -> Config | None:
        """The config running now (None before start)."""
        return self._config

    @_locked
    def reload(self, new: Config) -> ReloadResult:
        """Applies the difference between the running config and *new* (already
        validated) without dropping an entry: interfaces attached, forgotten or
        re-attached, lh_settings (timeouts, flags, quota) rewritten, services
        merged. Keys that cannot change live keep their value (lasthop.reload).
        Every named interface is looked up first: a missing one refuses the
        reload, naming its key, before anything changes."""
        from lasthop import reload as reload_mod

        assert self.datapath is not None and self._config is not None, "start() first"
        old = self._config
        step = reload_mod.plan(old, new)
        cfg = step.config
        links = {}
        for key, ifaces, what in (
            ("uplink", cfg.uplinks, "uplink"),
            ("vm_port", cfg.vm_ports, "VM port"),
        ):
            for n, iface in enumerate(ifaces):
                try:
                    links[(key, iface.name)] = self.links.by_name(iface.name, what)
                except LinkError as err:
                    raise ConfigError(f"key '{key}[{n}].name': {err}") from None
        result = reload_mod.Result(changed=step.changed, kept=step.kept)
        self._config = cfg
        maps = self.datapath.maps
        self._write_settings(
            cfg,
            keep=abi.F_SET_SERVICES
            | abi.F_SET_SYNC
            | abi.F_SET_HOPS_MOVED
            | abi.F_SET_ENDPOINTS_DOWN,
            hz=maps.get_settings().hz,
        )
        for key, role, before, after in (
            ("uplink", abi.Role.UPLINK, old.uplinks, cfg.uplinks),
            ("vm_port", abi.Role.VM_PORT, old.vm_ports, cfg.vm_ports),
        ):
            wanted = {i.name: i for i in after}
            bridge = self.links.by_name(cfg.bridge, "bridge").index if cfg.bridge else None
            for iface in before:
                if iface.name in wanted:
                    continue
                ifindex = next(
                    (i for i, name in self._attached(role).items() if name == iface.name), None
                )
                if ifindex is None:
                    continue
                link = self.links.by_index(ifindex)
                if role == abi.Role.VM_PORT and link is not None and link.master == bridge:
                    self.attach(link, role, cfg.bridge_zone)  # still a port of the bridge
                else:
                    self.forget(ifindex)
                result.detached.append(iface.name)
            previous = {i.name: i for i in before}
            for iface in after:
                if previous.get(iface.name) != iface:
                    self.attach(links[(key, iface.name)], role, iface.zone)
                    result.attached.append(iface.name)
        if {u.name for u in old.uplinks} - {u.name for u in cfg.uplinks}:
            self._prune_uplinks()
        if (old.scope_rules(), old.scope_default) != (cfg.scope_rules(), cfg.scope_default):
            self._write_scope(cfg)  # new connections only: established entries stay
        if old.services != cfg.services or old.health != cfg.health:
            self.services.reload(cfg.services, cfg.health)
        return result

    def _attached(self, role: abi.Role) -> dict[int, str]:
        return self.attached.uplinks if role == abi.Role.UPLINK else self.attached.vm_ports

    @_locked
    def attach(self, link: Link, role: abi.Role, zone: int = 0) -> None:
        assert self.datapath is not None and self._config is not None
        maps = self.datapath.maps
        current = maps.iface(link.index)
        slot = current.slot if current.role != abi.Role.NONE else self._free_slot(maps)
        flags = abi.F_IFACE_ROUTED if (role == abi.Role.VM_PORT and self._config.routed) else 0
        kind = self._link_kind(link, role)
        cfg = abi.IfaceCfg(zone=zone, role=int(role), flags=flags, slot=slot, link_kind=kind)
        cfg.mac[:] = list(self._own_mac(link, role))
        if current.role == role == abi.Role.VM_PORT:  # keep the guest's MAC and the services' mark
            cfg.vm_mac[:] = list(current.vm_mac)
            cfg.flags |= current.flags & (abi.F_IFACE_VM_MAC | abi.F_IFACE_VM_DOWN)
        if role == abi.Role.VM_PORT and self._vm_addresses(link, maps):
            cfg.flags |= abi.F_IFACE_ADDRS_FIXED
        if role == abi.Role.VM_PORT:
            cfg.delivery = self._delivery(link)
        if role == abi.Role.UPLINK and not link.oper_up:  # lasthop.linkwatch follows it from here
            cfg.flags |= abi.F_IFACE_LINK_DOWN
        if role == abi.Role.UPLINK:
            cfg.flags |= self._list_hops(link, maps)
            cfg.flags |= self._follows_failover(link)
            self._list_endpoints(link, maps)
        # config first: the program must find its interface from the first packet on
        maps.set_iface(link.index, cfg)
        # only a routed host sends ICMP errors of its own about VM traffic; the
        # egress hook cost every reply ~35 ns in `bench lab`, so a bridged host goes without
        # (an L3 link's frames have no MAC to choose: no egress program there)
        egress = role == abi.Role.UPLINK and self._config.routed and link.kind != abi.LinkKind.L3
        self.datapath.attach(link.index, role, egress=egress, kind=kind)
        target = self.attached.uplinks if role == abi.Role.UPLINK else self.attached.vm_ports
        target[link.index] = link.name
        event(
            log,
            "attach",
            role=role.name.lower(),
            interface=link.name,
            ifindex=link.index,
            zone=zone,
            slot=slot,
            hook="tcx" if self.datapath.tcx else "clsact",
        )

    def _vm_addresses(self, link: Link, maps: Maps) -> bool:
        """Writes the addresses the config gives VM port *link* (the only ones
        its VM may open connections from); False when it names none."""
        assert self._config is not None
        named = [p for p in self._config.vm_ports if p.name == link.name]
        addresses = named[0].addresses if named else []
        for addr in addresses:
            family = abi.FAMILY_V4 if addr.version == 4 else abi.FAMILY_V6
            maps.set_vm_addr(link.index, family, addr.packed, abi.VmAddrOrigin.CONFIGURED)
        return bool(addresses)

    def _list_hops(self, link: Link, maps: Maps) -> int:
        """Writes uplink *link*'s allow_last_hops or deny_last_hops into lh_hops
        (replacing what a previous run listed for it); its F_IFACE_HOPS_* flag."""
        assert self._config is not None
        named = [u for u in self._config.uplinks if u.name == link.name]
        allow, deny = (named[0].allow_last_hops, named[0].deny_last_hops) if named else ([], [])
        for raw in list(maps.hops.keys()):  # at most MAX_LISTED_HOPS
            if abi.HopKey.from_buffer_copy(raw).ifindex == link.index:
                maps.hops.delete(raw)
        for mac in allow or deny:
            key = abi.hop_key(link.index, bytes.fromhex(mac.replace(":", "")))
            maps.hops.update(bytes(key), b"\x01")
        if allow:
            return abi.F_IFACE_HOPS_ALLOW
        return abi.F_IFACE_HOPS_DENY if deny else 0

    def _list_endpoints(self, link: Link, maps: Maps) -> None:
        """Writes tunnel uplink *link*'s allow_endpoints or deny_endpoints into
        lh_endpoints (replacing what a previous run listed for it); an
        allow-list also gets the uplink's /0 of each family, refused."""
        from lasthop.links import link_kind_name

        assert self._config is not None
        named = [u for u in self._config.uplinks if u.name == link.name]
        allow, deny = (named[0].allow_endpoints, named[0].deny_endpoints) if named else ([], [])
        for raw in list(maps.endpoints.keys()):  # at most MAX_LISTED_ENDPOINTS
            if abi.EndpointLpmKey.from_buffer_copy(raw).ifindex == link.index:
                maps.endpoints.delete(raw)
        if not (allow or deny):
            return
        if link.kind not in (abi.LinkKind.VXLAN, abi.LinkKind.GENEVE):
            raise ConfigError(
                f"uplink {link.name}: allow_endpoints and deny_endpoints need a tunnel uplink "
                f"(VXLAN or Geneve in external mode), and {link.name} is "
                f"{link_kind_name(link.kind)}"
            )
        verdict = abi.ENDPOINT_TRUSTED if allow else abi.ENDPOINT_REFUSED
        for net in allow or deny:
            family = abi.FAMILY_V4 if net.version == 4 else abi.FAMILY_V6
            key = abi.endpoint_lpm_key(
                link.index, family, net.network_address.packed, net.prefixlen
            )
            maps.endpoints.update(bytes(key), bytes([verdict]))
        if allow:  # every other endpoint, of either family: refused
            for family in (abi.FAMILY_V4, abi.FAMILY_V6):
                key = abi.endpoint_lpm_key(link.index, family, b"", 0)
                if maps.endpoints.lookup(bytes(key)) is None:  # an allowed ::/0 stays
                    maps.endpoints.update(bytes(key), bytes([abi.ENDPOINT_REFUSED]))

    def _link_kind(self, link: Link, role: abi.Role) -> abi.LinkKind:
        """The link's kind, or MPLS for an Ethernet uplink whose config sets mpls."""
        assert self._config is not None
        named = [u for u in self._config.uplinks if u.name == link.name]
        if role == abi.Role.UPLINK and named and named[0].mpls:
            if link.kind != abi.LinkKind.ETHERNET:
                raise LinkError(
                    f"{link.name}: mpls needs an Ethernet uplink, not a "
                    f"{link_kind_name(link.kind)} link"
                )
            return abi.LinkKind.MPLS
        return link.kind

    def _delivery(self, link: Link) -> abi.Delivery:
        """PEER when VM port *link* is a veth whose guest end is in another
        namespace and the config (the port's peer_redirect, else the host's)
        lets frames go straight into that end; else DEVICE."""
        assert self._config is not None
        named = [p for p in self._config.vm_ports if p.name == link.name]
        own = named[0].peer_redirect if named else None
        wanted = self._config.peer_redirect if own is None else own
        return abi.Delivery.PEER if wanted and link.peer_elsewhere else abi.Delivery.DEVICE

    def _follows_failover(self, link: Link) -> int:
        """F_IFACE_FOLLOW_MOVES when uplink *link*'s config sets follow_failover."""
        assert self._config is not None
        named = [u for u in self._config.uplinks if u.name == link.name]
        return abi.F_IFACE_FOLLOW_MOVES if named and named[0].follow_failover else 0

    def _write_scope(self, config: Config) -> None:
        """lh_scope from the config's scope rules, the default last, then an
        end mark (rules of an earlier, longer list after it are never read)."""
        from lasthop.scope import compile_rules

        assert self.datapath is not None
        maps = self.datapath.maps

        def index_of(name: str) -> int:
            return self.links.by_name(name, "uplink").index

        rules = compile_rules(config.scope_rules(), config.scope_default, index_of)
        for n, rule in enumerate(rules):
            maps.scope.update(n.to_bytes(4, "little"), bytes(rule))
        if len(rules) < abi.MAX_SCOPE_RULES:
            maps.scope.update(len(rules).to_bytes(4, "little"), bytes(abi.ScopeRule()))

    def _prune_uplinks(self) -> int:
        """An uplink left the config: the kernel removes the entries whose last
        hop's uplink is no longer attached (lh_prune_uplinks, one walk)."""
        assert self.datapath is not None
        removed = int(self.datapath.prune_uplinks_prog.test_run(_FRAME).retval)
        if removed:
            self.datapath.maps.add_counter(0, abi.Counter.AGENT_REMOVED, removed)
        event(log, "prune", removed=removed, reason="uplink removed from the config")
        return removed

    @_locked
    def flush_out_of_scope(self) -> int:
        """Removes the entries the scope rules (as the running agent wrote them)
        now pass: the kernel walks the tables (lh_scope_flush), Python reads
        none of it. Returns how many."""
        with self.open_maps() as maps:
            if self.datapath is not None:
                removed = self.datapath.scope_flush_prog.test_run(_FRAME).retval
            else:
                fd = libbpf.obj_get(self.pins.path("lh_scope_flush"))
                try:
                    removed = libbpf.Program(fd, "lh_scope_flush").test_run(_FRAME).retval
                finally:
                    os.close(fd)
            if removed:
                maps.add_counter(0, abi.Counter.SCOPE_FLUSHED, removed)
        event(log, "flush", removed=removed, out_of_scope=True)
        return int(removed)

    @_locked
    def set_hop_moved(
        self, ifindex: int, old: bytes, new: bytes | None, unreachable: bool = False
    ) -> None:
        """lh_hop_moved: replies of last hop *old* on uplink *ifindex* go to *new*
        from now on (None: that record retires; *unreachable*: they take the
        host's routing, the hop does not answer). F_SET_HOPS_MOVED says whether
        any record is left, so a host without one pays one flag test a reply."""
        assert self.datapath is not None
        maps = self.datapath.maps
        key = bytes(abi.hop_key(ifindex, old))
        if new is not None:
            flags = abi.HOP_UNREACHABLE if unreachable else 0
            maps.hop_moved.update(key, bytes(abi.hop_moved(new, flags)))
            self._hops_moved_flag(maps, True)  # after the record: no reply looks in vain
            if unreachable:
                event(log, "hop_unreachable", ifindex=ifindex, mac=format_mac(old))
            else:
                event(log, "hop_moved", ifindex=ifindex, old=format_mac(old), new=format_mac(new))
            return
        maps.hop_moved.delete(key)
        if next(iter(maps.hop_moved.keys()), None) is None:  # one get_next_key
            self._hops_moved_flag(maps, False)

    def set_endpoint_down(self, address: IPv4Address | IPv6Address, down: bool) -> None:
        """lh_endpoints_down: replies through tunnel endpoint *address* take the
        host's routing (*down*), or use it again. F_SET_ENDPOINTS_DOWN says
        whether any record is left."""
        assert self.datapath is not None
        maps = self.datapath.maps
        key = abi.EndpointKey(family=abi.FAMILY_V4 if address.version == 4 else abi.FAMILY_V6)
        ctypes.memmove(key.addr, address.packed, len(address.packed))
        if down:
            maps.endpoints_down.update(bytes(key), b"\x01")
            self._hops_moved_flag(maps, True, abi.F_SET_ENDPOINTS_DOWN)
            event(log, "endpoint_unreachable", address=str(address))
            return
        maps.endpoints_down.delete(bytes(key))
        if next(iter(maps.endpoints_down.keys()), None) is None:  # one get_next_key
            self._hops_moved_flag(maps, False, abi.F_SET_ENDPOINTS_DOWN)

    def endpoints_down(self) -> list[IPv4Address | IPv6Address]:
        """lh_endpoints_down's records: at most MAX_ENDPOINTS_DOWN."""
        with self.open_maps() as maps:
            out = []
            for raw in list(maps.endpoints_down.keys()):  # at most MAX_ENDPOINTS_DOWN
                key = abi.EndpointKey.from_buffer_copy(raw)
                out.append(ip_address(abi.endpoint_text(key)))
            return out

    def tunnel_endpoints(self) -> set[IPv4Address | IPv6Address]:
        """The remote endpoints of lh_hop_descs' tunnel descriptors, of settled
        slots only (hops_in_use: a slot being written -- generation odd -- may
        hold half an endpoint): a bounded map (at most MAX_HOP_DESCS), read in
        batches; never the connection table."""
        out: set[IPv4Address | IPv6Address] = set()
        with self.open_maps() as maps:
            for _, desc in hops_in_use(maps.hop_descs):  # at most MAX_HOP_DESCS
                if desc.kind in (abi.HopKind.TUNNEL4, abi.HopKind.TUNNEL6):
                    out.add(ip_address(endpoint_str(desc)))
        return out

    @staticmethod
    def _hops_moved_flag(maps: Maps, on: bool, flag: int = abi.F_SET_HOPS_MOVED) -> None:
        settings = maps.get_settings()
        flags = settings.flags | flag if on else settings.flags & ~flag
        if flags != settings.flags:
            settings.flags = flags
            maps.settings.update(bytes(4), bytes(settings))  # no expiry request: no timeout moved

    def hops_moved(self) -> list[tuple[tuple[int, bytes], bytes, bool]]:
        """lh_hop_moved's records ((uplink, old MAC), new MAC, unreachable): at
        most MAX_MOVED_HOPS."""
        with self.open_maps() as maps:
            out = []
            for raw_key, raw in maps.hop_moved.items():
                key = abi.HopKey.from_buffer_copy(raw_key)
                new = abi.HopMoved.from_buffer_copy(raw[: ctypes.sizeof(abi.HopMoved)])
                down = bool(new.flags & abi.HOP_UNREACHABLE)
                out.append(((key.ifindex, bytes(key.mac)), bytes(new.mac), down))
            return out

    def _own_mac(self, link: Link, role: abi.Role) -> bytes:
        """The MAC frames the host routes to a VM come from: on a routed host
        whose VM ports sit on a bridge, the bridge's (the VM's gateway)."""
        assert self._config is not None
        if role == abi.Role.VM_PORT and self._config.routed and link.master:
            master = self.links.by_index(link.master)
            if master is not None:
                return master.mac
        return link.mac

    @_locked
    def set_link_down(self, ifindex: int, down: bool) -> bool:
        """An uplink's link went down (or came back): while it is down the data
        path sends its connections' replies by ordinary routing, not into the
        dead link; their entries stay, and are used again when it returns.
        True when the flag changed."""
        assert self.datapath is not None
        maps = self.datapath.maps
        cfg = maps.iface(ifindex)
        if cfg.role != abi.Role.UPLINK:
            return False
        flags = cfg.flags | abi.F_IFACE_LINK_DOWN if down else cfg.flags & ~abi.F_IFACE_LINK_DOWN
        if flags == cfg.flags:
            return False
        cfg.flags = flags
        maps.set_iface(ifindex, cfg)
        name = self.attached.uplinks.get(ifindex, f"ifindex {ifindex}")
        then = "take ordinary routing" if down else "follow their last hops again"
        state = "down" if down else "up"
        log.warning("uplink %s link %s: its connections' replies %s", name, state, then)
        return True

    @_locked
    def forget(self, ifindex: int) -> None:
        """A port went away or left the bridge: clear its config so its slot can
        be reused, and take our filter off it if it still exists."""
        assert self.datapath is not None
        self.datapath.maps.set_iface(ifindex, abi.IfaceCfg())
        self._take_off(ifindex)
        name = self.attached.vm_ports.pop(ifindex, None) or self.attached.uplinks.pop(ifindex, None)
        event(log, "detach", interface=name, ifindex=ifindex)

    def _free_slot(self, maps: Maps) -> int:
        used = {cfg.slot for cfg in maps.attached().values()}
        for slot in range(1, abi.MAX_IFACES):
            if slot not in used:
                return slot
        raise DatapathError(f"more than {abi.MAX_IFACES - 1} interfaces attached")

    def _forget_stale(self) -> None:
        """Interfaces a previous run attached that are now gone or not configured."""
        assert self.datapath is not None
        wanted = set(self.attached.uplinks) | set(self.attached.vm_ports)
        for ifindex in self.datapath.maps.attached():
            if ifindex not in wanted:
                self._take_off(ifindex)
                self.datapath.maps.set_iface(ifindex, abi.IfaceCfg())

    def _take_off(self, ifindex: int) -> None:
        """Our programs off an interface we no longer use; when it is gone (the
        kernel took its links with it), the pins of its links."""
        if self.links.by_index(ifindex) is not None:
            detach_filter(ifindex, self.pins)
        else:
            forget_links(ifindex, self.pins)

    # -- sync (docs/ha.md) ---------------------------------------------------
    def start_sync(self, config: Config) -> None:
        """Replicates the table with the cluster's other hosts (config.sync)."""
        assert self.datapath is not None, "start() first"
        if not config.sync:
            return
        from lasthop.sync import Replicator  # redis only when syncing

        self.replicator = Replicator(
            self.datapath.maps,
            Clock(self.datapath.clock_prog.fd),
            self._lock,
            url=config.sync,
            cluster=config.sync_cluster,
            host=self._sync_host(config),
        )
        self.replicator.start()
        log.info(
            "sync: host %s in cluster %s at %s",
            self.replicator.host,
            config.sync_cluster,
            config.sync,
        )

    def stop_sync(self) -> None:
        if self.replicator is not None:
            self.replicator.stop()
            self.replicator = None

    def _sync_host(self, config: Config) -> str:
        from lasthop.sync.replicator import default_host

        return config.sync_host or default_host(self.netns)

    def _sync_config(self, config: Config | None) -> Config:
        cfg = config or self._config
        if cfg is None or not cfg.sync:
            raise SyncError("sync is off: give --sync redis://HOST:PORT/DB or the config key sync")
        return cfg

    def sync_status(self, config: Config | None = None) -> SyncStatus:
        """The sync's figures: the running agent's own, or (the CLI) the last
        its heartbeat left in the store, with the kernel's ring losses."""
        if self.replicator is not None:
            return self.replicator.status()
        cfg = self._sync_config(config)
        from lasthop.sync import read_status

        with self.open_maps() as maps:
            assert cfg.sync is not None
            return read_status(cfg.sync, cfg.sync_cluster, self._sync_host(cfg), maps)

    def sync_resync(self, config: Config | None = None) -> int:
        """Publishes a snapshot of the table: the running agent's publisher does it
        (returns -1: asked), else this process, from the pinned maps (returns the
        entries sent)."""
        if self.replicator is not None:
            self.replicator.request_resync()
            return -1
        cfg = self._sync_config(config)
        from lasthop.sync import resync_once

        with self.open_maps() as maps:
            assert cfg.sync is not None
            clock = Clock.pinned(self.pins.path("lh_clock"))
            try:
                return resync_once(
                    cfg.sync, cfg.sync_cluster, self._sync_host(cfg), maps, clock, lambda n: None
                )
            finally:
                clock.close()

    # -- live migration without a store (docs/ha.md) -------------------------
    @_locked
    def export_vm(self, port: str) -> dict[str, object]:
        """The entries of the connections pinned to VM port *port*, with their
        last hops by interface name and the time they have left (the sync's
        wire records): `lasthop export`, read on the host a VM leaves."""
        from lasthop.sync.replicator import export_records
        from lasthop.sync.wire import WIRE_FIELDS

        try:
            index = socket.if_nametoindex(port)
        except OSError as err:
            raise LinkError(f"no interface {port!r} in netns {self.netns}") from err
        names: dict[int, str] = {}

        def name_of(ifindex: int) -> str:
            if ifindex not in names:
                names[ifindex] = ifname(ifindex)
            return names[ifindex]

        with self.open_maps() as maps:
            now, _ = self._now(maps)
            records = export_records(maps, now, index, name_of)
        return {
            "format": EXPORT_FORMAT,
            "vm_port": port,
            "fields": [name for name, _ in WIRE_FIELDS],
            "records": records,
        }

    @_locked
    def import_vm(self, data: dict[str, Any], vm_port: str) -> dict[str, int]:
        """Writes an export's entries into this host's tables, its uplinks by
        name mapped to this host's ifindexes, pinned to *vm_port* (absent yet,
        as before the VM starts here: entries without a VM, whose replies work
        all the same). Returns the counts imported and skipped (an uplink
        this host does not have)."""
        from lasthop.sync.replicator import write_changes
        from lasthop.sync.wire import decode_record

        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ConfigError(f"not a lasthop export (format {EXPORT_FORMAT!r})")
        try:
            changes = [
                dataclasses.replace(decode_record(r), vm_port=vm_port) for r in data["records"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"a malformed lasthop export: {err}") from err

        def index_of(name: str) -> int:
            try:
                return socket.if_nametoindex(name)
            except OSError:
                return 0

        with self.open_maps() as maps:
            now, _ = self._now(maps)
            written, unmapped = write_changes(maps, changes, now, index_of)
        return {
            "imported": written,
            "unmapped": unmapped,
            "vm_port_found": int(bool(index_of(vm_port))),
        }

    # -- services ----------------------------------------------------------
    @functools.cached_property
    def services(self) -> ServiceManager:
        """The services of this namespace (definitions, tables, health)."""
        from lasthop.services.manager import ServiceManager

        return ServiceManager(self.netns, self.open_maps, links=self.links, lock=self._lock)

    @contextmanager
    def open_maps(self) -> Iterator[Maps]:
        """The data path's maps: the agent's own, or the pinned ones (closed after)."""
        if self.datapath is not None:
            yield self.datapath.maps
            return
        maps = Maps.open_pinned(self.pins)
        try:
            yield maps
        finally:
            maps.close()

    # -- reading -----------------------------------------------------------

    def _now(self, maps: Maps) -> tuple[int, int]:
        """The data path's clock now (jiffies) and its HZ (0 = unknown: ages read 0)."""
        hz = maps.get_settings().hz
        if self.datapath is not None:
            return Clock(self.datapath.clock_prog.fd).jiffies(), hz
        clock = Clock.pinned(self.pins.path("lh_clock"))
        try:
            return clock.jiffies(), hz
        finally:
            clock.close()

    def iter_connections(
        self, where: ConnFilter | None = None, *, limit: int = 0
    ) -> Iterator[Connection]:
        """The entries that match *where*, decoded one at a time as the maps are
        read in batches: the table is never held in memory. With *limit*, the
        *limit* most recently seen, newest first (only those are kept)."""
        with self.open_maps() as maps:
            now, hz = self._now(maps)
            names: dict[int, str] = {}
            hop = functools.lru_cache(maxsize=abi.MAX_HOP_DESCS)(maps.hop_desc)
            conns = (decode(k, e, now, hz, names, hop) for k, e in maps.entries())
            matching = (c for c in conns if where is None or where.matches(c))
            if limit > 0:
                yield from heapq.nsmallest(limit, matching, key=lambda c: c.age_s)
            else:
                yield from matching

    def explain(self, query: Query, config: Config | None = None) -> Explanation:
        """What the tables hold for one connection, and what the data path will
        do with its packets (lasthop.explain): a few lookups, not a walk. The
        running agent's config (or *config*) names last hops and gives the scope."""
        from lasthop.explain import explain, neighbour_table

        services = self.services
        with self.open_maps() as maps:
            now, hz = self._now(maps)
            return explain(
                query, maps, now, hz, services, neighbour_table(), config or self._config
            )

    def connections(self, limit: int = 0, where: ConnFilter | None = None) -> list[Connection]:
        """As :meth:`iter_connections`, in a list, most recently seen first
        (for tests and small tables: the list holds every match)."""
        conns = list(self.iter_connections(where, limit=limit))
        return conns if limit > 0 else sorted(conns, key=lambda c: c.age_s)

    @_locked
    def attached_now(self) -> Attached:
        """A copy of what is attached, safe to read while the agent changes it."""
        return Attached(dict(self.attached.uplinks), dict(self.attached.vm_ports))

    def interfaces(self) -> list[InterfaceInfo]:
        """Every interface the data path is configured for, by ifindex."""
        with self.open_maps() as maps:
            return [
                InterfaceInfo(
                    name=ifname(i),
                    ifindex=i,
                    role=abi.Role(cfg.role).name.lower(),
                    zone=cfg.zone,
                    slot=cfg.slot,
                    mac=format_mac(bytes(cfg.mac)),
                    routed=bool(cfg.flags & abi.F_IFACE_ROUTED),
                    link_down=bool(cfg.flags & abi.F_IFACE_LINK_DOWN),
                    link_kind=link_kind_name(cfg.link_kind),
                    hook=hook_kind(i),
                )
                for i, cfg in sorted(self._host_attached(maps).items())
            ]

    @staticmethod
    def _host_attached(maps: Maps) -> dict[int, abi.IfaceCfg]:
        """The namespace's interfaces the data path is configured for: a lookup
        each, not a read of all MAX_IFINDEX slots; not self.links, whose netlink
        socket belongs to the agent's thread."""
        return maps.attached(among=(i for i, _ in socket.if_nameindex()))

    def stats(self) -> Stats:
        """Counters and the table's figures, all kept by the kernel: the cost
        does not grow with the table."""
        with self.open_maps() as maps:
            attached = self._host_attached(maps)
            names = {cfg.slot: ifname(i) for i, cfg in attached.items()}
            per_slot = maps.counter_totals(slots=[0, *names])
            totals = [0] * abi.CNT_MAX
            interfaces: dict[str, dict[str, int]] = {}
            for slot, counts in sorted(per_slot.items()):
                name = names.get(slot, "unattached" if slot == 0 else f"slot{slot}")
                interfaces[name] = {counter_name(r): n for r, n in enumerate(counts) if n}
                totals = [a + b for a, b in zip(totals, counts, strict=True)]
            self._count_elements(maps)
            ev = maps.table_totals()
            ex = maps.expiry_stats()
            now, hz = self._now(maps)
            T = abi.TableCounter
            te = abi.table_events(ev)
            quota = maps.get_settings().inplace_quota  # room of lh_conns4 kept for pending
            confirmed = self._table_stats(
                maps.capacity(abi.ChangeTable.CONFIRMED) - quota, ex, 0,
                te["confirmed_inserted"], te["confirmed_expired"], te["confirmed_removed"], 0,
            )  # fmt: skip
            pending = self._table_stats(
                maps.capacity(abi.ChangeTable.PENDING) + quota, ex, 1, te["pending_inserted"],
                te["pending_expired"], te["pending_removed"],
                max(0, te["pending_left"] - ex.elements[1]),
            )  # fmt: skip
            return Stats(
                totals={c.name.lower(): totals[c] for c in abi.Counter},
                interfaces=interfaces,
                confirmed=confirmed,
                pending=pending,
                promoted=te["promoted"],
                confirm_refused=ev[T.CONFIRM_REFUSED],
                expiry_passes=ex.passes,
                expiry_skipped=ex.skipped,
                last_pass_age_s=Clock.age_s(now, ex.finished, hz) if ex.passes else None,
                next_due_s=Clock.until_s(now, ex.next_due, hz) if ex.passes else None,
                untrusted_hops=self._refused(
                    maps.hops_refused, abi.HopKey, lambda k: format_mac(bytes(k.mac))
                ),
                untrusted_endpoints=self._refused(
                    maps.endpoints_refused, abi.EndpointKey, abi.endpoint_text
                ),
            )

    @staticmethod
    def _refused(
        m: libbpf.Map, key_type: type[_RefusedKey], text: Callable[[_RefusedKey], str]
    ) -> dict[str, dict[str, int]]:
        """A refused-senders LRU (lh_hops_refused: frames per uplink and MAC,
        lh_endpoints_refused: requests per uplink and tunnel endpoint; bounded,
        not the table) by uplink name, then by *text* of the key."""
        out: dict[str, dict[str, int]] = {}
        for raw_key, raw_value in m.items():
            key = key_type.from_buffer_copy(raw_key)
            out.setdefault(ifname(key.ifindex), {})[text(key)] = int.from_bytes(
                raw_value[:8], "little"
            )
        return out

    @staticmethod
    def _table_stats(
        capacity: int, ex: abi.ExpiryStats, t: int, inserted: int, expired: int, removed: int,
        evicted: int,
    ) -> TableStats:  # fmt: skip
        states = {abi.State(s).name.lower(): ex.live[t][s] for s in abi.State if ex.live[t][s]}
        return TableStats(
            entries=ex.elements[t],
            capacity=capacity,
            inserted=inserted,
            expired=expired,
            removed=removed,
            evicted=evicted,
            states=states,
        )

    def entry_count(self) -> int:
        """Entries in both tables, as the kernel counts them (no walk)."""
        with self.open_maps() as maps:
            self._count_elements(maps)
            return sum(maps.expiry_stats().elements)

    def _count_elements(self, maps: Maps) -> None:
        """Has the kernel write each table's element count into lh_expiry."""
        if self.datapath is not None:
            self.datapath.stats_prog.test_run(_FRAME)
            return
        fd = libbpf.obj_get(self.pins.path("lh_stats"))
        try:
            libbpf.Program(fd, "lh_stats").test_run(_FRAME)
        finally:
            os.close(fd)

    # -- changing ----------------------------------------------------------
    def expire(self) -> int:
        """One expiry pass, in the kernel (lh_expire walks both tables, reading
        the clock per entry). Returns the entries it removed. Not under the
        lock: it writes nothing the agent's other threads write."""
        assert self.datapath is not None, "only the agent expires"
        with self.open_maps() as maps:
            before = maps.expiry_stats()
            self.datapath.expire_prog.test_run(_FRAME)
            after = maps.expiry_stats()
        return sum(
            after.expired[t][s] - before.expired[t][s] for t in (0, 1) for s in range(abi.CS_MAX)
        )

    @_locked
    def flush(self) -> int:
        """Removes every entry; returns how many (keys read in batches first)."""
        total = 0
        with self.open_maps() as maps:
            for table in maps.tables():
                keys = [k for k, _ in table.map.items()]  # 16 or 40 bytes an entry, not the entries
                removed: dict[abi.TableCounter, int] = {}
                for k in keys:
                    key = table.conn_key(k)
                    counter = maps.remove(table, key)
                    if counter is not None:
                        removed[counter] = removed.get(counter, 0) + 1
                        if maps.on_change is not None:  # to the peers (sync)
                            maps.report(abi.ChangeKind.REMOVED, removed_as(counter), key)
                for counter, n in removed.items():
                    maps.add_table_counter(counter, n)
                total += sum(removed.values())
            if total:
                maps.add_counter(0, abi.Counter.AGENT_REMOVED, total)
                maps.request_expiry()  # the counts by state are the walk's
        event(log, "flush", removed=total)
        return total

    @_locked
    def detach(self) -> list[str]:
        """Removes the programs from every attached interface, the pins and the
        services state: a clean slate (docs/cli.md, "What each command keeps")."""
        from lasthop.services import store  # pydantic: only when detaching

        # every link, not just those the table names: pins may already be gone
        detached = [link.name for link in self.links.all() if detach_filter(link.index, self.pins)]
        self.pins.remove()
        store.forget(self.netns)
        return detached

"""Builds and removes the lab: network namespaces joined by veth pairs, the
transit switch, the firewalls, the host (bridged or routed) and its VMs with
their servers. docs/lab.md draws it; lasthop.lab.plan holds every name and
address.

    clN ── fwN ──┐                       ┌── vm1
                 ├── sw (br0) ── host ───┼── vm2
    ...  ── ... ─┘                       └── vm3

Every link is created directly inside the lab's namespaces (the peer moved
into its namespace on creation), so the caller's namespace never sees one.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lasthop.lab import firewall, state
from lasthop.lab import plan as P
from lasthop.lab.namespaces import (
    LabError,
    delete,
    existing,
    ip_batch,
    ns_exec,
    pids_in,
    stop_pids,
    sysctl,
)
from lasthop.lab.servers import READY
from lasthop.services.store import forget as forget_services_state

__all__ = ["Lab", "down", "lab_namespaces", "Progress"]

Progress = Callable[[str], None]
SERVER_START_TIMEOUT = 10.0
API_SOCKETS = Path("/run/lasthop")  # the agent's default API socket folder
PIN_ROOTS = (Path("/sys/fs/bpf/lasthop"), Path("/proc/1/root/sys/fs/bpf/lasthop"))

# sysctls every namespace gets before its links exist, so "default" applies to them.
COMMON_SYSCTLS: dict[str, str | int] = {
    "net.ipv6.conf.all.accept_dad": 0,  # addresses usable at once
    "net.ipv6.conf.default.accept_dad": 0,
    "net.ipv6.conf.default.router_solicitations": 0,
    "net.ipv4.conf.all.rp_filter": 0,  # replies may come back another way: that is the point
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.conf.all.accept_redirects": 0,  # a redirect would fix the asymmetry behind our back
    "net.ipv4.conf.default.accept_redirects": 0,
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv6.conf.default.accept_redirects": 0,
}
ROUTER_SYSCTLS: dict[str, str | int] = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
}
FIREWALL_SYSCTLS: dict[str, str | int] = {
    **ROUTER_SYSCTLS,
    "net.ipv4.conf.default.arp_notify": 1,  # a MAC change (fail-over) is announced at once
    "net.ipv6.conf.default.ndisc_notify": 1,
}
VM_SYSCTLS: dict[str, str | int] = {
    # No SYN-ACK retransmissions: a handshake that died without lasthop must not
    # keep knocking on fw1 (and its drop counters) while lasthop is on.
    "net.ipv4.tcp_synack_retries": 0,
}
SWITCH_SYSCTLS: dict[str, str | int] = {
    "net.ipv6.conf.all.disable_ipv6": 1,  # a pure L2 switch
    "net.ipv6.conf.default.disable_ipv6": 1,
}
UNDERLAY_MTU = 1600  # overlay lab: room for VXLAN over IPv6 (70 bytes) under 1500-byte frames
BRIDGE_OPTS = "type bridge stp_state 0 mcast_snooping 0 forward_delay 0"


def _quiet(_: str) -> None:
    pass


def lab_namespaces(name: str) -> list[str]:
    """The namespaces of lab *name* that exist now (by name pattern, state or not)."""
    pattern = P.lab_namespace_pattern(name)
    return [ns for ns in existing() if pattern.fullmatch(ns)]


def _pin_folder(ns: str) -> Path | None:
    for root in PIN_ROOTS:
        try:
            if (root / ns).exists():
                return root / ns
        except OSError:  # /proc/1/root may be closed to us (containers)
            continue
    return None


def _remove_pins(host_ns: str) -> None:
    """Removes the pins lasthop left for the lab's host in bpffs (and the pin
    root, if they were the last). Its programs need no `lasthop detach`: they
    sit on the host's links, which go with its namespace (down deletes it next)."""
    folder = _pin_folder(host_ns)
    if folder is not None:
        from lasthop.datapath import Pins  # libbpf: only when there are pins

        Pins(folder).remove()


def down(name: str, progress: Progress = _quiet) -> list[str]:
    """Removes lab *name* entirely: agent, servers, lasthop pins, namespaces, state.

    Works from the namespace names alone, so also after a crash. Returns the
    namespaces it deleted."""
    st = state.load(name)
    if st and (st.agent_pid or st.processes):
        stop_pids([p for p in [st.agent_pid, *st.processes.values()] if p])
    namespaces = lab_namespaces(name)
    host_ns = P.Plan(name).host.ns
    if namespaces:
        progress(f"removing {len(namespaces)} namespaces of lab {name}")
    delete(namespaces)  # the host's links, and lasthop's filters on them, with it
    for ns in (host_ns, P.Plan(name).ns("peer")):  # the HA lab's standby has lasthop too
        _remove_pins(ns)
    for ns in (host_ns, P.Plan(name).ns("peer")):
        _forget_services(ns)
    state.remove(name)
    return namespaces


def _forget_services(host_ns: str) -> None:
    """Removes the agent's state of the lab's host (services, drains, health):
    a later lab of the same name starts from its own config."""
    forget_services_state(host_ns)
    # a killed agent leaves its API socket (config.API_SOCKET_DIR; not imported: pydantic)
    (API_SOCKETS / f"{host_ns}.sock").unlink(missing_ok=True)


class Lab:
    """A running lab: build it with Lab.up(plan), find it with Lab.find(name)."""

    def __init__(self, st: state.LabState) -> None:
        self.state = st

    @property
    def plan(self) -> P.Plan:
        return self.state.plan

    @property
    def name(self) -> str:
        return self.state.name

    # -- life cycle ----------------------------------------------------------
    @classmethod
    def find(cls, name: str) -> Lab | None:
        st = state.load(name)
        if st is None or not lab_namespaces(name):
            return None
        return cls(st)

    @classmethod
    def up(cls, plan: P.Plan, progress: Progress = _quiet) -> Lab:
        """Builds the lab of *plan* (after removing any lab of the same name)."""
        down(plan.name, progress)
        lab = cls(state.LabState.of(P.Plan(plan.name, plan.routed, [], [], plan.overlay)))
        state.save(lab.state)
        try:
            lab._build_core(progress)
            for n in plan.sites:
                lab.add_site(n, progress)
            for n in plan.vms:
                lab.add_vm(n, progress, start=False)
            progress(f"starting servers in {len(plan.vms)} VMs")
            lab._start_servers(plan.vms)
        except BaseException:
            down(plan.name)
            raise
        return lab

    def down(self, progress: Progress = _quiet) -> list[str]:
        return down(self.name, progress)

    def _save(self) -> None:
        state.save(self.state)

    # -- building --------------------------------------------------------------
    def _new_namespaces(self, roles: list[str], sysctls: list[dict[str, str | int]]) -> None:
        names = [self.plan.ns(r) for r in roles]
        ip_batch(None, [f"netns add {n}" for n in names])
        for ns, extra in zip(names, sysctls, strict=True):
            sysctl(ns, {**COMMON_SYSCTLS, **extra})
            ip_batch(ns, ["link set lo up"])

    def _build_core(self, progress: Progress) -> None:
        """The switch and the host (with its uplink and bridge): what sites and VMs plug into."""
        plan, host = self.plan, self.plan.host
        progress(f"building the transit switch and the {plan.mode} host")
        self._new_namespaces(
            ["sw", "host"], [SWITCH_SYSCTLS, ROUTER_SYSCTLS if plan.routed else {}]
        )
        ip_batch(
            plan.switch_ns,
            [
                f"link add {P.SWITCH_BRIDGE} {BRIDGE_OPTS}",
                f"link set {P.SWITCH_BRIDGE} up",
            ],
        )
        ip_batch(
            host.ns,
            [
                f"link add {host.underlay_link} address {host.uplink_mac} type veth "
                f"peer name host address {P.mac(P.MAC_SWITCH, 0x10)} netns {plan.switch_ns}",
                f"link add {host.bridge} address {host.bridge_mac} {BRIDGE_OPTS}",
            ],
        )
        mtu = [f"link set host mtu {UNDERLAY_MTU}"] if plan.overlay else []
        ip_batch(plan.switch_ns, [*mtu, f"link set host master {P.SWITCH_BRIDGE} up"])
        lines = []
        if plan.overlay:
            lines += self._host_overlay()
        elif plan.routed:
            assert host.uplink_addr and host.vm_gateway and host.default_via
            lines += [
                f"addr add {host.uplink_addr.cidr4} dev {host.uplink}",
                f"addr add {host.uplink_addr.cidr6} dev {host.uplink} nodad",
                f"addr add {host.vm_gateway.cidr4} dev {host.bridge}",
                f"addr add {host.vm_gateway.cidr6} dev {host.bridge} nodad",
            ]
        else:
            lines.append(f"link set {host.uplink} master {host.bridge}")
        lines += [f"link set {host.bridge} up", f"link set {host.uplink} up"]
        if plan.routed:
            assert host.default_via
            lines += [
                f"route add default via {host.default_via.v4}",
                f"route add default via {host.default_via.v6}",
            ]
        ip_batch(host.ns, lines)

    def _host_overlay(self) -> list[str]:
        """Overlay lab: up0 is the host's underlay leg (its tunnel endpoint), and
        an external VXLAN device, a port of the bridge, is lasthop's uplink."""
        host = self.plan.host
        assert host.underlay
        return [
            f"link set {host.underlay_link} mtu {UNDERLAY_MTU} up",
            f"addr add {host.underlay.cidr4} dev {host.underlay_link}",
            f"addr add {host.underlay.cidr6} dev {host.underlay_link} nodad",
            f"link add {P.VXLAN} address {P.mac(P.MAC_HOST, 2)} mtu 1500 type vxlan external "
            f"dstport {P.VXLAN_PORT}",
            f"link set {P.VXLAN} master {host.bridge} up",
        ]

    def _firewall_overlay(self, n: int) -> None:
        """Overlay lab: fwN's transit leg (tr0) is a VXLAN device whose remote is
        the host's endpoint, over its underlay leg ul0; it knows the VMs' MACs
        (static neighbours: their answers cannot come back without lasthop)."""
        plan, fw = self.plan, self.plan.firewall(n)
        host = plan.host
        assert fw.underlay and host.underlay
        family = 6 if ":" in fw.endpoint else 4
        neighbours = []
        for m in range(1, P.MAX_INDEX + 1):
            vm = P.Plan(plan.name, overlay=True).vm(m)
            neighbours += [
                f"neigh replace {vm.addr.v4} lladdr {vm.mac} dev {P.FW_TRANSIT} nud permanent",
                f"neigh replace {vm.addr.v6} lladdr {vm.mac} dev {P.FW_TRANSIT} nud permanent",
            ]
        ip_batch(
            fw.ns,
            [
                f"link add {P.UNDERLAY_LINK} mtu {UNDERLAY_MTU} type veth "
                f"peer name fw{n} mtu {UNDERLAY_MTU} address {P.mac(P.MAC_SWITCH, n)} "
                f"netns {plan.switch_ns}",
                f"addr add {fw.underlay.cidr4} dev {P.UNDERLAY_LINK}",
                f"addr add {fw.underlay.cidr6} dev {P.UNDERLAY_LINK} nodad",
                f"link set {P.UNDERLAY_LINK} up",
                f"link add {P.FW_TRANSIT} address {fw.transit_mac} mtu 1500 type vxlan "
                f"id {P.VNI} local {fw.endpoint} remote {host.underlay.of(family)} "
                f"dstport {P.VXLAN_PORT} nolearning",
                *neighbours,
            ],
        )

    def _site_routes(self, n: int) -> list[str]:
        """Routes firewall n needs towards every other site (and the VM subnet)."""
        plan = self.plan
        lines = []
        for m in self.state.sites:
            if m != n:
                other = plan.firewall(m)
                net4, net6 = P.client_net(m)
                lines += [
                    f"route replace {net4} via {other.transit.v4}",
                    f"route replace {net6} via {other.transit.v6}",
                ]
        if plan.routed:
            uplink = plan.host.uplink_addr
            assert uplink
            lines += [
                f"route replace {P.VM_SUBNET[0]} via {uplink.v4}",
                f"route replace {P.VM_SUBNET[1]} via {uplink.v6}",
            ]
        return lines

    def add_site(self, n: int, progress: Progress = _quiet) -> None:
        """Adds client network clN behind firewall fwN, and routes to it on every firewall."""
        plan = self.plan
        if n in self.state.sites:
            raise LabError(f"lab {self.name} already has site {n}")
        fw, cl = plan.firewall(n), plan.client(n)
        progress(f"building {cl.name} behind {fw.name}")
        self._new_namespaces([fw.name, cl.name], [FIREWALL_SYSCTLS, {}])
        if plan.overlay:
            self._firewall_overlay(n)
        else:
            ip_batch(
                fw.ns,
                [
                    f"link add {P.FW_TRANSIT} address {fw.transit_mac} type veth "
                    f"peer name fw{n} address {P.mac(P.MAC_SWITCH, n)} netns {plan.switch_ns}",
                ],
            )
        ip_batch(
            fw.ns,
            [
                f"link add {P.FW_LAN} address {fw.lan_mac} type veth "
                f"peer name {P.ETH} address {cl.mac} netns {cl.ns}",
            ],
        )
        ip_batch(plan.switch_ns, [f"link set fw{n} master {P.SWITCH_BRIDGE} up"])
        ip_batch(
            cl.ns,
            [
                f"addr add {cl.addr.cidr4} dev {P.ETH}",
                f"addr add {cl.addr.cidr6} dev {P.ETH} nodad",
                f"link set {P.ETH} up",
                f"route add default via {cl.gateway.v4}",
                f"route add default via {cl.gateway.v6}",
            ],
        )
        firewall.install(fw.ns)
        self.state.sites = sorted([*self.state.sites, n])
        self._save()
        ip_batch(
            fw.ns,
            [
                f"addr add {fw.transit.cidr4} dev {P.FW_TRANSIT}",
                f"addr add {fw.transit.cidr6} dev {P.FW_TRANSIT} nodad",
                f"addr add {fw.lan.cidr4} dev {P.FW_LAN}",
                f"addr add {fw.lan.cidr6} dev {P.FW_LAN} nodad",
                f"link set {P.FW_TRANSIT} up",
                f"link set {P.FW_LAN} up",
                *self._site_routes(n),
            ],
        )
        for m in self.state.sites:
            if m != n:
                ip_batch(plan.firewall(m).ns, self._site_routes(m))

    def add_vm(self, n: int, progress: Progress = _quiet, *, start: bool = True) -> None:
        """Adds VM n on a new port of the host's bridge, and (start=True) its servers."""
        plan = self.plan
        if n in self.state.vms:
            raise LabError(f"lab {self.name} already has VM {n}")
        vm, host = plan.vm(n), plan.host
        progress(f"building {vm.name}")
        self._new_namespaces([vm.name], [VM_SYSCTLS])
        ip_batch(
            host.ns,
            [
                f"link add {vm.port} address {vm.port_mac} type veth "
                f"peer name {P.ETH} address {vm.mac} netns {vm.ns}",
                f"link set {vm.port} master {host.bridge} up",
            ],
        )
        ip_batch(
            vm.ns,
            [
                f"addr add {vm.addr.cidr4} dev {P.ETH}",
                f"addr add {vm.addr.cidr6} dev {P.ETH} nodad",
                f"link set {P.ETH} up",
                f"route add default via {vm.gateway.v4}",
                f"route add default via {vm.gateway.v6}",
                *(self._vm_overlay_neighbours() if plan.overlay else []),
            ],
        )
        self.state.vms = sorted([*self.state.vms, n])
        self._save()
        if start:
            self._start_servers([n])

    def _vm_overlay_neighbours(self) -> list[str]:
        """Overlay lab: the VM's gateway (fw1) by its MAC -- which fw2 shares."""
        fw1 = self.plan.firewall(1)
        return [
            f"neigh replace {fw1.transit.v4} lladdr {fw1.transit_mac} dev {P.ETH} nud permanent",
            f"neigh replace {fw1.transit.v6} lladdr {fw1.transit_mac} dev {P.ETH} nud permanent",
        ]

    def _start_servers(self, vms: list[int]) -> None:
        """Starts the servers of each VM (concurrently) and waits until they listen."""
        logs = state.folder(self.name)
        procs = {}
        for n in vms:
            vm = self.plan.vm(n)
            with open(logs / f"{vm.name}.log", "ab") as log:
                procs[vm.name] = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        vm.ns,
                        sys.executable,
                        "-m",
                        "lasthop.lab.servers",
                        vm.name,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.state.servers[vm.name] = procs[vm.name].pid
        self._save()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        for name, proc in procs.items():
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
            line = proc.stdout.readline().decode().strip() if ready else ""
            proc.stdout.close()
            if line != READY:
                detail = (logs / f"{name}.log").read_text().strip().splitlines()[-3:]
                raise LabError(
                    f"servers of {name} did not start: {' / '.join(detail) or 'no output'}"
                )

    # -- changes under test ----------------------------------------------------
    def set_firewall_mac(self, n: int, address: str) -> None:
        """Gives fwN's transit leg a new MAC, as a fail-over to a standby box
        with the same addresses and conntrack state would (announced by
        gratuitous ARP and unsolicited NA)."""
        ip_batch(self.plan.firewall(n).ns, [f"link set {P.FW_TRANSIT} address {address}"])

    def failover(self, n: int) -> str:
        """fwN fails over to its standby MAC; returns the new MAC."""
        new = self.plan.firewall(n).failover_mac
        self.set_firewall_mac(n, new)
        return new

    # -- looking -----------------------------------------------------------------
    def counters(self) -> dict[str, dict[str, int]]:
        """Every firewall's named nft counters: {"fw1": {"drop_invalid": 3, ...}}."""
        return {
            self.plan.firewall(n).name: firewall.counters(self.plan.firewall(n).ns)
            for n in self.state.sites
        }

    @property
    def lasthop_pins(self) -> Path | None:
        """Where lasthop's pinned table of this lab's host is, if it is attached."""
        return _pin_folder(self.plan.host.ns)

    def servers_alive(self) -> dict[str, bool]:
        found = pids_in([self.plan.vm(n).ns for n in self.state.vms])
        return {
            self.plan.vm(n).name: self.state.servers.get(self.plan.vm(n).name, -1)
            in found.get(self.plan.vm(n).ns, [])
            for n in self.state.vms
        }

    def exec(self, role: str, argv: list[str], input: str | None = None) -> str:
        """Runs argv in this lab's namespace of *role* ("fw2", "host", ...); returns stdout."""
        return ns_exec(self.plan.ns(role), argv, input=input).stdout

"""The HA lab: an active/standby pair of routed lasthop hosts in front of the
VMs. keepalived (VRRP, one daemon in each host's namespace) moves the two
service addresses -- the transit address the firewalls route the VM network
through, and the VMs' gateway -- and both agents replicate their tables
through a Redis server the lab starts (`lasthop run --sync`). docs/lab.md
draws it:

                     <lab>-sw          <lab>-host (A), VRRP priority 150
 clN ── fwN tr0 ──┬── br0 ─┬─ host ── up0 10.0.0.101 [10.0.0.100]
                  │        │          vms 10.2.0.2   [10.2.0.1] ── hostv ─┐
 fwN routes       │        │       <lab>-peer (B), VRRP priority 100     ├─ br1 ── vmN eth0
 10.2.0.0/24      │        └─ peer ── up0 10.0.0.102                     │   10.2.0.1N,
 via 10.0.0.100   │                   vms 10.2.0.3 ─────────── peerv ────┘   gw 10.2.0.1

[...] is a VRRP address, on whichever host is master. Redis listens on a unix
socket in the lab's state folder; the two agents reach it from their
namespaces. IPv4 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lasthop.errors import SyncError
from lasthop.lab import firewall, state
from lasthop.lab import plan as P
from lasthop.lab.namespaces import LabError, eventually, ip_batch, open_socket, run
from lasthop.lab.runner import AgentProcess, lasthop_argv
from lasthop.lab.topology import (
    BRIDGE_OPTS,
    ROUTER_SYSCTLS,
    SWITCH_SYSCTLS,
    VM_SYSCTLS,
    Lab,
    Progress,
    _quiet,
)
from lasthop.sync.store import RedisServer

__all__ = [
    "ADVERT_S",
    "HaHost",
    "HaLab",
    "Held",
    "PUSH_PORT",
    "VIP_TRANSIT",
    "VIP_VMS",
    "VIP6_TRANSIT",
    "VIP6_VMS",
    "FAMILIES",
    "VM_SIDE",
    "TakeoverRow",
    "TakeoverRun",
    "ha_hosts",
    "keepalived_conf",
    "takeover",
]

VIP_TRANSIT = "10.0.0.100"  # = Plan.host.uplink_addr: every fwN routes 10.2.0.0/24 via it
VIP_VMS = "10.2.0.1"  # = Plan.host.vm_gateway: the VMs' default gateway
VIP6_TRANSIT = "fd00::100"  # = Plan.host.uplink_addr.v6: every fwN routes fd00:2::/64 via it
VIP6_VMS = "fd00:2::1"  # = Plan.host.vm_gateway.v6: the VMs' IPv6 default gateway
FAMILIES = (4, 6)  # every client holds connections of both
VM_SIDE = "vms"  # each host's leg on the VM segment: its lasthop VM port
SEGMENT = "br1"  # the VM segment, a second bridge in the switch namespace
VRID = 100  # the VRRP virtual router id of the pair
ADVERT_S = 1  # VRRP advertisement interval: a backup takes over ~3.6 s after the last one
PUSH_PORT = 9  # where the held connections' VM end listens (TCP and UDP)
TIMEOUT = 20.0  # for anything the lab waits for (VRRP, agents, replication)


@dataclass(frozen=True)
class HaHost:
    """One host of the pair."""

    role: str  # "host" (A, starts active) or "peer" (B, starts standby)
    ns: str
    uplink_mac: str  # up0
    vm_mac: str  # vms
    transit: str  # its own address on the transit network
    vm_side: str  # its own address on the VM segment
    priority: int  # VRRP: the higher is master
    transit6: str  # the same, IPv6
    vm_side6: str

    @property
    def name(self) -> str:
        return "A" if self.role == "host" else "B"


def ha_hosts(plan: P.Plan) -> tuple[HaHost, HaHost]:
    """Host A (active first) and host B (standby first) of lab *plan*."""
    return (
        HaHost(
            "host",
            plan.ns("host"),
            P.mac(P.MAC_HOST, 0x01),
            P.mac(P.MAC_HOST, 0x02),
            "10.0.0.101",
            "10.2.0.2",
            150,
            "fd00::101",
            "fd00:2::2",
        ),
        HaHost(
            "peer",
            plan.ns("peer"),
            P.mac(P.MAC_HOST, 0x11),
            P.mac(P.MAC_HOST, 0x12),
            "10.0.0.102",
            "10.2.0.3",
            100,
            "fd00::102",
            "fd00:2::3",
        ),
    )


def keepalived_conf(h: HaHost) -> str:
    """keepalived.conf of host *h*: one VRRP instance on the uplink holding
    both service addresses and their IPv6 twins (so they always move
    together; the IPv6 ones are "excluded" from the IPv4 adverts, which
    carry one family, and announced by unsolicited neighbour adverts)."""
    return f"""\
global_defs {{
    router_id lasthop-{h.role}
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 3
}}
vrrp_instance lasthop {{
    state {"MASTER" if h.role == "host" else "BACKUP"}
    interface {P.UPLINK}
    virtual_router_id {VRID}
    priority {h.priority}
    advert_int {ADVERT_S}
    virtual_ipaddress {{
        {VIP_TRANSIT}/24 dev {P.UPLINK}
        {VIP_VMS}/24 dev {VM_SIDE}
    }}
    virtual_ipaddress_excluded {{
        {VIP6_TRANSIT}/64 dev {P.UPLINK}
        {VIP6_VMS}/64 dev {VM_SIDE}
    }}
}}
"""


_STATE_LINE = re.compile(r"\(lasthop\) Entering (\w+) STATE")


class HaLab(Lab):
    """A running HA lab (build it with HaLab.up(name)); `down` removes it
    like any lab (its processes are in the lab's state)."""

    def __init__(self, st: state.LabState) -> None:
        super().__init__(st)
        self.a, self.b = ha_hosts(self.plan)
        self.folder = state.folder(self.name)
        self.redis = RedisServer(self.folder, log=self.folder / "redis.log")
        self.redis_socket = self.redis.socket
        self.url = self.redis.url
        self.agents: dict[str, AgentProcess] = {}

    @classmethod
    def start(
        cls,
        name: str,
        sites: Iterable[int] = (1, 2, 3),
        vms: Iterable[int] = (1,),
        progress: Progress = _quiet,
    ) -> HaLab:
        """Builds the lab, starts Redis, keepalived on both hosts (A master,
        B backup) and both agents with --sync."""
        lab = cls.up(P.Plan(name, routed=True, sites=list(sites), vms=list(vms)), progress)
        assert isinstance(lab, HaLab)
        try:
            progress("starting redis-server, keepalived and lasthop on both hosts")
            lab.start_redis()
            lab.start_keepalived(lab.a)
            lab.wait_vrrp(lab.a, "MASTER")
            lab.start_keepalived(lab.b)
            lab.wait_vrrp(lab.b, "BACKUP")
            for h in (lab.a, lab.b):
                lab.start_agent(h)
        except BaseException:
            lab.down()
            raise
        return lab

    # -- building (Lab.up calls these) ---------------------------------------------
    def _build_core(self, progress: Progress) -> None:
        """The switch (transit br0, VM segment br1) and both hosts."""
        plan, sw = self.plan, self.plan.switch_ns
        progress("building the transit switch, the VM segment and the host pair")
        self._new_namespaces(
            ["sw", "host", "peer"], [SWITCH_SYSCTLS, ROUTER_SYSCTLS, ROUTER_SYSCTLS]
        )
        ip_batch(
            sw,
            [
                f"link add {P.SWITCH_BRIDGE} {BRIDGE_OPTS}",
                f"link set {P.SWITCH_BRIDGE} up",
                f"link add {SEGMENT} {BRIDGE_OPTS}",
                f"link set {SEGMENT} up",
            ],
        )
        fw1 = plan.firewall(1).transit
        for h in (self.a, self.b):
            ip_batch(
                h.ns,
                [
                    f"link add {P.UPLINK} address {h.uplink_mac} type veth "
                    f"peer name {h.role} netns {sw}",
                    f"link add {VM_SIDE} address {h.vm_mac} type veth "
                    f"peer name {h.role}v netns {sw}",
                    f"addr add {h.transit}/24 dev {P.UPLINK}",
                    f"addr add {h.vm_side}/24 dev {VM_SIDE}",
                    f"addr add {h.transit6}/64 dev {P.UPLINK}",
                    f"addr add {h.vm_side6}/64 dev {VM_SIDE}",
                    f"link set {P.UPLINK} up",
                    f"link set {VM_SIDE} up",
                    f"route add default via {fw1.v4}",
                    f"route add default via {fw1.v6}",
                ],
            )
            ip_batch(
                sw,
                [
                    f"link set {h.role} master {P.SWITCH_BRIDGE} up",
                    f"link set {h.role}v master {SEGMENT} up",
                    # the hosts' legs hear the VMs, not each other (a private VLAN):
                    # a host's IPv6 neighbour solicitations would otherwise reach
                    # the other's VM port first and pass for its guest's MAC
                    f"link set dev {h.role}v type bridge_slave isolated on",
                ],
            )

    def add_vm(self, n: int, progress: Progress = _quiet, *, start: bool = True) -> None:
        """VM n on the VM segment (not on a host: it must outlive either)."""
        plan = self.plan
        if n in self.state.vms:
            raise LabError(f"lab {self.name} already has VM {n}")
        vm = plan.vm(n)
        progress(f"building {vm.name}")
        self._new_namespaces([vm.name], [VM_SYSCTLS])
        ip_batch(
            plan.switch_ns,
            [
                f"link add {vm.port} type veth peer name {P.ETH} address {vm.mac} netns {vm.ns}",
                f"link set {vm.port} master {SEGMENT} up",
            ],
        )
        ip_batch(
            vm.ns,
            [
                f"addr add {vm.addr.cidr4} dev {P.ETH}",
                f"addr add {vm.addr.cidr6} dev {P.ETH}",
                f"link set {P.ETH} up",
                f"route add default via {VIP_VMS}",
                f"route add default via {VIP6_VMS}",
            ],
        )
        self.state.vms = sorted([*self.state.vms, n])
        self._save()
        if start:
            self._start_servers([n])

    # -- processes ---------------------------------------------------------------
    def _record(self, what: str, pid: int) -> None:
        self.state.processes[what] = pid
        self._save()

    def start_redis(self) -> None:
        try:
            self._record("redis", self.redis.start())
        except SyncError as err:
            raise LabError(str(err)) from err

    def stop_redis(self) -> None:
        """The store goes down (SIGTERM); start_redis() brings it back, empty."""
        self.redis.stop()

    def _pidfile(self, h: HaHost, kind: str) -> Path:
        return self.folder / f"keepalived-{h.role}-{kind}.pid"

    def keepalived_log(self, h: HaHost) -> Path:
        return self.folder / f"keepalived-{h.role}.log"

    def start_keepalived(self, h: HaHost) -> None:
        exe = shutil.which("keepalived") or "/usr/sbin/keepalived"
        if not os.path.exists(exe):
            raise LabError("needs keepalived (Debian package keepalived: scripts/setup)")
        conf = self.folder / f"keepalived-{h.role}.conf"
        conf.write_text(keepalived_conf(h))
        argv = ["ip", "netns", "exec", h.ns, exe, "--dont-fork", "--log-console", "--log-detail"]
        argv += ["--no-syslog", "--vrrp", "--dont-respawn", "--use-file", str(conf)]
        argv += [
            "--pid",
            str(self._pidfile(h, "main")),
            "--vrrp_pid",
            str(self._pidfile(h, "vrrp")),
        ]
        with open(self.keepalived_log(h), "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._record(f"keepalived-{h.role}", proc.pid)

    def keepalived_pids(self, h: HaHost) -> list[int]:
        """The VRRP child's and the parent's PIDs (child first)."""
        pids = []
        for kind in ("vrrp", "main"):
            try:
                pids.append(int(self._pidfile(h, kind).read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def vrrp_state(self, h: HaHost) -> str:
        """The state keepalived on *h* last entered (MASTER, BACKUP, FAULT), "" before any."""
        try:
            found = _STATE_LINE.findall(self.keepalived_log(h).read_text(errors="replace"))
        except FileNotFoundError:
            return ""
        return found[-1] if found else ""

    def holds_vips(self, h: HaHost) -> bool:
        out = run(["ip", "-n", h.ns, "-o", "addr", "show"], check=False).stdout
        return all(f" {vip}/" in out for vip in (VIP_TRANSIT, VIP_VMS, VIP6_TRANSIT, VIP6_VMS))

    def wait_vrrp(self, h: HaHost, want: str) -> None:
        """Waits until keepalived on *h* is in state *want* (MASTER: also holds
        both addresses and their IPv6 twins; BACKUP: not all of them)."""

        def ok() -> bool:
            return self.vrrp_state(h) == want and self.holds_vips(h) == (want == "MASTER")

        if not eventually(ok, TIMEOUT, 0.05):
            got = self.vrrp_state(h) or "no state yet"
            raise LabError(f"keepalived on host {h.name} is not {want} ({got})")

    def wait_neighbours(self, h: HaHost) -> None:
        """Waits until the VMs' gateway and the firewalls' next hop to the VM
        network resolve to *h*'s MACs (keepalived's gratuitous ARPs and
        unsolicited neighbour adverts), both families."""
        who = [
            (self.plan.vm(n).ns, P.ETH, vip, h.vm_mac)
            for n in self.state.vms
            for vip in (VIP_VMS, VIP6_VMS)
        ]
        who += [
            (self.plan.firewall(n).ns, P.FW_TRANSIT, vip, h.uplink_mac)
            for n in self.state.sites
            for vip in (VIP_TRANSIT, VIP6_TRANSIT)
        ]

        def resolved() -> bool:
            for ns, dev, ip, mac in who:
                out = run(["ip", "-n", ns, "-j", "neigh", "show", ip, "dev", dev], check=False)
                entries = json.loads(out.stdout or "[]")
                if entries and entries[0].get("lladdr") not in (None, mac):
                    return False
            return True

        if not eventually(resolved, TIMEOUT, 0.05):
            raise LabError(f"the lab's neighbours did not learn host {h.name}'s MACs")

    def agent_argv(self, h: HaHost) -> list[str]:
        args = ["run", "--netns", h.ns, "--uplink", P.UPLINK, "--vm-port", VM_SIDE, "--routed"]
        return lasthop_argv(*args, "--sync", self.url)

    def start_agent(self, h: HaHost) -> None:
        agent = AgentProcess(self.agent_argv(h), self.folder / f"lasthop-{h.role}.log")
        agent.start()
        assert agent.proc is not None
        self.agents[h.role] = agent
        self._record(f"lasthop-{h.role}", agent.proc.pid)

    # -- what happens to the active host -------------------------------------------
    def crash(self, h: HaHost) -> None:
        """Host *h* dies: its links go (nothing leaves it any more), then its
        keepalived and its agent are killed (SIGKILL: no goodbye of any kind)."""
        ip_batch(h.ns, [f"link del {P.UPLINK}", f"link del {VM_SIDE}"])
        for pid in self.keepalived_pids(h):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if h.role in self.agents:
            self.agents[h.role].kill()

    def switch_over(self, h: HaHost) -> None:
        """A planned switch-over away from *h*: its keepalived stops (SIGTERM:
        it sends a priority-0 advertisement and drops the addresses at once);
        its agent keeps running."""
        pids = self.keepalived_pids(h)
        if not pids:
            raise LabError(f"keepalived on host {h.name} is not running")
        os.kill(pids[-1], signal.SIGTERM)

    # -- looking -------------------------------------------------------------------
    def show(self, h: HaHost) -> list[dict[str, Any]]:
        """`lasthop show --json` on host *h* (the pins, agent or not)."""
        out = run(lasthop_argv("show", "--netns", h.ns, "--json"))
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def wait_replicated(self, conns: Iterable[Held]) -> None:
        """Waits until B holds A's entry of every connection: the same last-hop
        MAC and state (for TCP, established)."""
        conns = list(conns)

        def done() -> bool:
            a, b = entries_by_port(self.show(self.a)), entries_by_port(self.show(self.b))
            for c in conns:
                ea, eb = a.get(c.row_key), b.get(c.row_key)
                if not ea or not eb or (eb["mac"], eb["state"]) != (ea["mac"], ea["state"]):
                    return False
            return True

        if not eventually(done, TIMEOUT, 0.2):
            raise LabError("host B does not hold host A's entries of the held connections")

    def stop(self) -> None:
        """Stops the agents and Redis (down() removes the rest)."""
        for agent in self.agents.values():
            agent.stop()
        self.stop_redis()


@dataclass
class Held:
    """One connection held open across a takeover, from client clN to VM vmM
    port PUSH_PORT, TCP or UDP, IPv4 or IPv6; its VM end can speak first."""

    client: int
    vm: int
    proto: str  # "tcp" or "udp"
    family: int  # 4 or 6
    src: str  # the client's address
    sport: int  # the client's port
    cli: socket.socket
    srv: socket.socket  # TCP: the accepted socket; UDP: the VM's bound socket
    peer: tuple[str, int] = ("", 0)  # UDP: the client as the VM sees it
    _buf: bytes = field(default=b"", repr=False)

    @property
    def row_key(self) -> tuple[str, str, int]:
        """Its key in entries_by_port."""
        return (self.proto, self.src, self.sport)

    def push(self, payload: bytes, timeout: float = 5.0) -> bool:
        """The server speaks first: whether *payload* reaches the client within
        *timeout* (TCP retransmits meanwhile; UDP sends once)."""
        try:
            if self.proto == "tcp":
                self.srv.sendall(payload)
            else:
                self.srv.sendto(payload, self.peer)
            return self.receive(payload, timeout)
        except OSError:
            return False

    def echo(self, payload: bytes, timeout: float = 5.0) -> bool:
        """The client speaks, the server answers: both ways work."""
        try:
            self.cli.sendall(payload) if self.proto == "tcp" else self.cli.send(payload)
            self.srv.settimeout(timeout)
            if self.proto == "tcp":
                got = b""
                while len(got) < len(payload):
                    chunk = self.srv.recv(4096)
                    if not chunk:
                        return False
                    got += chunk
                if got != payload:
                    return False
            else:
                got, self.peer = self.srv.recvfrom(4096)
        except OSError:
            return False
        return self.push(payload, timeout)

    def receive(self, payload: bytes, timeout: float) -> bool:
        """Whether *payload* reaches the client within *timeout*."""
        deadline = time.monotonic() + timeout
        while payload not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.cli.settimeout(left)
            try:
                chunk = self.cli.recv(4096)
            except TimeoutError:
                return False
            if not chunk:
                return False
            self._buf += chunk
        self._buf = self._buf.split(payload, 1)[1]
        return True

    def close(self) -> None:
        self.cli.close()
        if self.proto == "tcp":
            self.srv.close()


class HeldSet:
    """Connections from clients to VMs, opened and then left idle: the VM end
    of each TCP one accepted, of each UDP one knowing its client."""

    def __init__(self, lab: HaLab) -> None:
        self.lab = lab
        self.held: list[Held] = []
        self._listeners: dict[tuple[int, str, int], socket.socket] = {}

    def _listener(self, vm: int, proto: str, family: int) -> socket.socket:
        if (vm, proto, family) not in self._listeners:
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            s = open_socket(self.lab.plan.vm(vm).ns, af, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == 6:  # beside the IPv4 one on the same port
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("0.0.0.0" if family == 4 else "::", PUSH_PORT))
            if proto == "tcp":
                s.listen(64)
            s.settimeout(5.0)
            self._listeners[(vm, proto, family)] = s
        return self._listeners[(vm, proto, family)]

    def open(self, client: int, vm: int, proto: str, family: int = 4) -> Held:
        """One connection, opened by the client (through its own firewall and
        the active host) and answered once by the VM."""
        listener = self._listener(vm, proto, family)
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        cli = open_socket(self.lab.plan.client(client).ns, af, kind)
        cli.settimeout(5.0)
        dst = (self.lab.plan.vm(vm).addr.of(family), PUSH_PORT)
        src = self.lab.plan.client(client).addr.of(family)
        if proto == "tcp":
            cli.connect(dst)
            srv, _ = listener.accept()
            held = Held(client, vm, proto, family, src, cli.getsockname()[1], cli, srv)
        else:
            cli.connect(dst)
            cli.send(b"hello")
            _, peer = listener.recvfrom(4096)
            held = Held(client, vm, proto, family, src, cli.getsockname()[1], cli, listener, peer)
        self.held.append(held)
        if not held.push(b"welcome\n"):
            raise LabError(
                f"cl{client} -> vm{vm} {proto} IPv{family}: the VM's first answer did not arrive"
            )
        return held

    def close(self) -> None:
        for h in self.held:
            h.close()
        for s in self._listeners.values():
            s.close()
        self.held.clear()
        self._listeners.clear()

    def __enter__(self) -> HeldSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def entries_by_port(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """`show` rows of the held connections, by (proto, client address, client port)."""
    return {
        (r["proto"], r["src"], int(r["sport"])): r for r in rows if int(r["dport"]) == PUSH_PORT
    }


@dataclass
class TakeoverRow:
    """One (client, protocol, family) of a takeover run: how many connections."""

    held: int = 0  # opened through A, then idle
    on_standby: int = 0  # whose entry B held, naming the client's own firewall
    pushed: int = 0  # whose server's first bytes after the takeover reached the client
    echoed: int = 0  # that then worked both ways, client first


@dataclass
class TakeoverRun:
    planned: bool
    takeover_s: float  # from the kill (or keepalived's stop) to B master with both addresses
    rows: dict[tuple[int, str, int], TakeoverRow]
    drops: dict[str, int]  # each firewall's drops during the takeover and after

    @property
    def lost(self) -> int:
        return sum(r.held - min(r.pushed, r.echoed) for r in self.rows.values())


def takeover(
    lab: HaLab, *, planned: bool, per_path: int = 3, say: Progress = _quiet
) -> TakeoverRun:
    """Holds *per_path* TCP and UDP connections, IPv4 and IPv6, from every
    client to vm1 through A, waits for B's copies, then kills A (or,
    *planned*, stops its keepalived) and has every server speak first, then
    every client."""
    vm = lab.state.vms[0]
    with HeldSet(lab) as held:
        say(f"holding {per_path} TCP and UDP connections of each family per client through A")
        conns = [
            held.open(c, vm, proto, family)
            for c in lab.state.sites
            for proto in ("tcp", "udp")
            for family in FAMILIES
            for _ in range(per_path)
        ]
        lab.wait_replicated(conns)
        b_rows = entries_by_port(lab.show(lab.b))
        before = lab.counters()
        say("switching over to B (keepalived on A stops)" if planned else "killing host A")
        start = time.monotonic()
        if planned:
            lab.switch_over(lab.a)
        else:
            lab.crash(lab.a)
        lab.wait_vrrp(lab.b, "MASTER")
        took = time.monotonic() - start
        lab.wait_neighbours(lab.b)
        say(f"B is master after {took:.1f} s; the servers speak first")
        rows: dict[tuple[int, str, int], TakeoverRow] = {}
        for c in conns:
            row = rows.setdefault((c.client, c.proto, c.family), TakeoverRow())
            row.held += 1
            entry = b_rows.get(c.row_key)
            row.on_standby += bool(entry and P.firewall_of(entry["mac"]) == f"fw{c.client}")
            row.pushed += c.push(b"server first\n")
        for c in conns:
            rows[(c.client, c.proto, c.family)].echoed += c.echo(b"client again\n")
        after = lab.counters()
    drops = {
        fw: sum(after[fw][k] - before[fw].get(k, 0) for k in firewall.DROP_COUNTERS) for fw in after
    }
    return TakeoverRun(planned, took, rows, drops)

"""A service in the lab: a virtual address (IPv4 and IPv6, TCP ports 80 and
7) served by the VMs. The guests hold the address on their loopback, the
firewalls route it to the host (docs/services.md, "Setting up the guests");
the agent's config defines one service per address family over every VM.
Also: a plain HTTP GET from a namespace, the services' state as `lasthop
service list` reports it, and the VM the data path's Maglev table gives a
new connection (predicted with lasthop.services.maglev from the pinned table).

Used by the demo's service section and tests/lab/test_services_lab.py.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from lasthop import abi
from lasthop.lab import plan as P
from lasthop.lab import runner
from lasthop.lab.namespaces import LabError, ip_batch, open_socket, sysctl
from lasthop.lab.topology import Lab
from lasthop.services.maglev import slot_of

__all__ = [
    "VIP",
    "SERVICES",
    "PORTS",
    "TIMEOUT",
    "config",
    "write_config",
    "serve_vip",
    "vm_states",
    "serving",
    "drain",
    "http_get",
    "Prediction",
]

VIP = P.Addr("10.3.0.1", "fd00:3::1", 32, 128)
SERVICES = {4: "web", 6: "web6"}  # address family -> the service of VIP in that family
PORTS = (P.HTTP_PORT, P.ECHO_PORT)
TIMEOUT = 2.0


def config(plan: P.Plan, *, macs: bool = False, **health: object) -> str:
    """The agent's config: one service per address family over every VM of
    *plan*, HTTP-checked (a bridged host has no address to check from: no
    checks there); *health* overrides [health] keys; with *macs* the guests'
    MACs are given, else the agent learns them from their first packet."""
    kind = "http" if plan.routed else "none"
    settings = {"type": kind, "interval": 0.3, "timeout": 0.5, "fall": 2, "rise": 1, **health}
    lines = ["[health]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    for family, name in SERVICES.items():
        vms = []
        for n in plan.vms:
            vm = plan.vm(n)
            mac = f', mac = "{vm.mac}"' if macs else ""
            vms.append(f'{{port = "{vm.port}", address = "{vm.addr.of(family)}"{mac}}}')
        lines += [
            "[[service]]",
            f'name = "{name}"',
            f'address = "{VIP.of(family)}"',
            f"ports = [{', '.join(map(str, PORTS))}]",
            f"vms = [{', '.join(vms)}]",
        ]
    return "\n".join(lines) + "\n"


def write_config(path: Path, plan: P.Plan, *, macs: bool = False, **health: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config(plan, macs=macs, **health))
    return path


def serve_vip(lab: Lab, firewalls: Iterable[int] | None = None, *, vms: bool = True) -> None:
    """Every VM holds VIP on lo (and does not answer ARP/ND for it); the
    firewalls (default: every site's) route it to the host's uplink (routed
    host) or, on a bridged host, to vm1's own address: either way it reaches
    the uplink."""
    plan = lab.plan
    for n in plan.vms if vms else []:
        vm = plan.vm(n)
        sysctl(vm.ns, {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
        ip_batch(vm.ns, [f"addr add {VIP.cidr4} dev lo", f"addr add {VIP.cidr6} dev lo nodad"])
    uplink = plan.host.uplink_addr or plan.vm(plan.vms[0]).addr
    for n in plan.sites if firewalls is None else firewalls:
        ip_batch(
            plan.firewall(n).ns,
            [
                f"route replace {VIP.cidr4} via {uplink.v4}",
                f"route replace {VIP.cidr6} via {uplink.v6}",
            ],
        )


def vm_states(plan: P.Plan, service: str = SERVICES[4]) -> dict[str, tuple[str, bool]]:
    """VM port -> (health, gets new connections) in *service*."""
    vms = runner.services(plan)[service]["vms"]
    return {v["port"]: (v["health"], v["serving"]) for v in vms}


def serving(plan: P.Plan) -> bool:
    """Whether the services are defined and every VM of each gets new connections."""
    defined = runner.services(plan)
    wanted = [defined.get(name) for name in SERVICES.values()]
    return all(s and all(v["serving"] for v in s["vms"]) for s in wanted)


def drain(plan: P.Plan, port: str) -> None:
    """The VM on *port* gets no new connections of any service (`lasthop service drain`)."""
    for name in SERVICES.values():
        runner.command(plan, "service", "drain", name, port)


def http_get(
    ns: str,
    family: int,
    dst: str,
    *,
    source: tuple[str, int] | None = None,
    timeout: float = TIMEOUT,
) -> tuple[str | None, int]:
    """HTTP GET / from namespace ns: (body or None on failure, local port)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s = open_socket(ns, af, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source:
            s.bind(source)
        s.connect((dst, P.HTTP_PORT))
        port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return (body.decode() if head.startswith(b"HTTP/1.0 200") else None), port
    except OSError:
        return None, 0
    finally:
        s.close()


def _words(raw: bytes) -> tuple[int, ...]:
    return struct.unpack("=4I", raw.ljust(16, b"\0"))


class Prediction:
    """The VM port the data path's table gives a new TCP connection to VIP
    (with lasthop.services.maglev), from the Maglev tables pinned in lh_maglev, read
    once: predictions hold while the pools do not change."""

    def __init__(self, lab: Lab) -> None:
        from lasthop import libbpf  # loads the system's libbpf: only once lasthop runs
        from lasthop.services.lookup import read_table  # (so does this)

        services = runner.services(lab.plan)
        pins = lab.lasthop_pins
        if pins is None:
            raise LabError("lasthop is not attached: no Maglev table to read")
        maglev = libbpf.Map.pinned(pins / "lh_maglev")
        self.tables: dict[int, tuple[list[int], dict[int, str]]] = {}
        try:
            for family, name in SERVICES.items():
                svc = services.get(name)
                if svc is None:
                    raise LabError(f"service {name}: not defined on {lab.plan.host.ns}")
                table = read_table(maglev, int(svc["id"]))
                if table is None:
                    raise LabError(f"service {name}: no Maglev table")
                self.tables[family] = table, {v["ifindex"]: v["port"] for v in svc["vms"]}
        finally:
            maglev.close()

    def vm(self, family: int, client: str, sport: int, dport: int = P.HTTP_PORT) -> str:
        """The VM port of a connection from (client, sport) to VIP port *dport*."""
        table, by_ifindex = self.tables[family]
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        key = abi.ConnKey(
            sport=socket.htons(sport), dport=socket.htons(dport), proto=6, family=family
        )
        key.saddr[:] = list(_words(socket.inet_pton(af, client)))
        key.daddr[:] = list(_words(socket.inet_pton(af, VIP.of(family))))
        return by_ifindex.get(table[slot_of(key)], "?")

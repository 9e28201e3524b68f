"""The lab's addressing plan as data: namespace and interface names, MACs,
IPv4 and IPv6 addresses. Tests and the demo name every MAC and address from
here; docs/lab.md draws the same plan.

Numbering: site N is client network clN behind firewall fwN; VM N is vmN.
Every address is private (10/8, fd00::/8) and lives inside the lab's
namespaces only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "Addr",
    "Client",
    "Firewall",
    "Host",
    "Plan",
    "Vm",
    "mac",
    "who_has",
    "firewall_of",
    "client_net",
    "lab_namespace_pattern",
    "BRIDGE",
    "UPLINK",
    "VXLAN",
    "UNDERLAY_LINK",
    "VNI",
    "VXLAN_PORT",
    "FW_TRANSIT",
    "FW_LAN",
    "ETH",
    "HTTP_PORT",
    "ECHO_PORT",
    "MAC_FW",
    "MAC_FW_FAILOVER",
    "MAC_FW_LAN",
    "MAC_CLIENT",
    "MAC_VM",
    "MAC_VM_PORT",
    "MAC_HOST",
    "MAC_SWITCH",
    "MAX_INDEX",
    "DEFAULT_NAME",
]

DEFAULT_NAME = "lh"
MAX_INDEX = 9  # sites and VMs are numbered 1..9

# Interface names (each inside its own namespace, so they repeat across namespaces).
BRIDGE = "br0"  # host: bridged mode joins uplink + VM ports; routed mode joins VM ports only
UPLINK = "up0"  # host: veth to the transit switch
FW_TRANSIT = "tr0"  # firewall: leg on the transit network
FW_LAN = "lan0"  # firewall: leg on its client network
ETH = "eth0"  # clients and VMs
SWITCH_BRIDGE = "br0"  # switch namespace: the transit L2 segment
# The overlay lab (Plan.overlay): the transit network is VXLAN over an underlay
VXLAN = "vx0"  # host: the external (collect-metadata) VXLAN device, lasthop's uplink
UNDERLAY_LINK = "ul0"  # firewall: its leg on the underlay (tr0 is then its VXLAN device)
VNI = 100  # the transit network's VNI
VXLAN_PORT = 4789

HTTP_PORT = 80
ECHO_PORT = 7  # TCP and UDP echo

# MAC kinds: the 4th octet says what a MAC belongs to, the 6th octet its number.
MAC_FW = 0xF0  # firewall, transit leg (what lasthop learns)
MAC_FW_FAILOVER = 0xF1  # the same firewall's transit leg after a fail-over
MAC_FW_LAN = 0xF2  # firewall, client-network leg
MAC_CLIENT = 0xC0
MAC_VM = 0xA0  # the VM's own NIC
MAC_VM_PORT = 0xB1  # host side of the VM's veth
MAC_HOST = 0xB0  # host: 00 = br0, 01 = uplink
MAC_SWITCH = 0x50  # switch ports: 0x01..0x09 towards fwN, 0x10 towards the host

_KIND_NAMES = {
    MAC_FW: "fw{}",
    MAC_FW_FAILOVER: "fw{} (fail-over)",
    MAC_FW_LAN: "fw{} lan",
    MAC_CLIENT: "cl{}",
    MAC_VM: "vm{}",
    MAC_VM_PORT: "host port vm{}",
}


def mac(kind: int, n: int) -> str:
    """The lab MAC of kind (MAC_FW, ...) number n: 02:00:00:<kind>:00:<n>."""
    return f"02:00:00:{kind:02x}:00:{n:02x}"


def _kind_and_number(address: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"02:00:00:([0-9a-f]{2}):00:([0-9a-f]{2})", address.lower())
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


def who_has(address: str) -> str:
    """The lab object a MAC belongs to ("fw2", "fw2 (fail-over)"), or the MAC itself."""
    parsed = _kind_and_number(address)
    if not parsed:
        return address
    kind, n = parsed
    if kind in _KIND_NAMES:
        return _KIND_NAMES[kind].format(n)
    if kind == MAC_HOST:
        return "host br0" if n == 0 else "host uplink"
    return address


def firewall_of(address: str) -> str:
    """The firewall whose transit leg has MAC *address*, its own or the one
    it fails over to ("fw2"); "" when no firewall has it."""
    parsed = _kind_and_number(address)
    if not parsed or parsed[0] not in (MAC_FW, MAC_FW_FAILOVER):
        return ""
    return f"fw{parsed[1]}"


@dataclass(frozen=True)
class Addr:
    """An IPv4 and an IPv6 address of one interface, with their prefix lengths."""

    v4: str
    v6: str
    len4: int = 24
    len6: int = 64

    def of(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6

    @property
    def cidr4(self) -> str:
        return f"{self.v4}/{self.len4}"

    @property
    def cidr6(self) -> str:
        return f"{self.v6}/{self.len6}"


# Networks.
TRANSIT = ("10.0.0.0/24", "fd00::/64")  # firewalls' transit legs, host uplink, bridged VMs
VM_SUBNET = ("10.2.0.0/24", "fd00:2::/64")  # routed mode: VMs behind the host


def client_net(n: int) -> tuple[str, str]:
    return (f"10.1.{n}.0/24", f"fd00:1:{n}::/64")


def _check(n: int) -> int:
    if not 1 <= n <= MAX_INDEX:
        raise ValueError(f"lab numbers run from 1 to {MAX_INDEX}, not {n}")
    return n


@dataclass(frozen=True)
class Firewall:
    n: int
    ns: str
    name: str
    transit_mac: str
    failover_mac: str
    lan_mac: str
    transit: Addr  # on the transit net: 10.0.0.N, fd00::N
    lan: Addr  # on its client net: 10.1.N.1, fd00:1:N::1
    underlay: Addr | None = None  # overlay lab: its tunnel endpoint's addresses
    endpoint: str = ""  # overlay lab: the one its VXLAN device uses (fw2: IPv6)


@dataclass(frozen=True)
class Client:
    n: int
    ns: str
    name: str
    mac: str
    addr: Addr  # 10.1.N.2, fd00:1:N::2
    gateway: Addr  # its firewall's lan leg


@dataclass(frozen=True)
class Vm:
    n: int
    ns: str
    name: str
    mac: str
    port: str  # host-side interface name
    port_mac: str
    addr: Addr  # bridged: 10.0.0.1N, fd00::1N; routed: 10.2.0.1N, fd00:2::1N
    gateway: Addr  # bridged: fw1; routed: the host


@dataclass(frozen=True)
class Host:
    ns: str
    uplink: str
    uplink_mac: str
    bridge: str
    bridge_mac: str
    uplink_addr: Addr | None  # routed only: 10.0.0.100, fd00::100
    vm_gateway: Addr | None  # routed only, on br0: 10.2.0.1, fd00:2::1
    default_via: Addr | None  # routed only: fw1
    underlay: Addr | None = None  # overlay lab: on up0, the host's tunnel endpoint
    underlay_link: str = UPLINK


@dataclass
class Plan:
    """One lab: its name, mode, and which sites (clN + fwN) and VMs it has."""

    name: str = DEFAULT_NAME
    routed: bool = False
    sites: list[int] = field(default_factory=lambda: [1, 2, 3])
    vms: list[int] = field(default_factory=lambda: [1, 2, 3])
    # the firewalls reach the (bridged) host through VXLAN, each from its own
    # endpoint, and fw1 and fw2 share one MAC: only endpoint learning tells them apart
    overlay: bool = False

    def __post_init__(self) -> None:
        if self.overlay and self.routed:
            raise ValueError("the overlay lab is bridged: the VMs sit on the VXLAN segment")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", self.name):
            raise ValueError(
                f"lab name {self.name!r}: 1-8 lowercase letters and digits, starting with a letter"
            )
        for n in [*self.sites, *self.vms]:
            _check(n)

    @property
    def mode(self) -> str:
        return "routed" if self.routed else "overlay" if self.overlay else "bridged"

    def ns(self, role: str) -> str:
        return f"{self.name}-{role}"

    @property
    def switch_ns(self) -> str:
        return self.ns("sw")

    def firewall(self, n: int) -> Firewall:
        _check(n)
        return Firewall(
            n=n,
            ns=self.ns(f"fw{n}"),
            name=f"fw{n}",
            # overlay: fw2 answers with fw1's MAC (an anycast / virtual MAC)
            transit_mac=mac(MAC_FW, 1 if self.overlay and n == 2 else n),
            failover_mac=mac(MAC_FW_FAILOVER, n),
            lan_mac=mac(MAC_FW_LAN, n),
            transit=Addr(f"10.0.0.{n}", f"fd00::{n}"),
            lan=Addr(f"10.1.{n}.1", f"fd00:1:{n}::1"),
            underlay=self._underlay(n) if self.overlay else None,
            endpoint=self._underlay(n).of(6 if n == 2 else 4) if self.overlay else "",
        )

    @staticmethod
    def _underlay(n: int) -> Addr:
        """Overlay lab: tunnel endpoint n (100 = the host) on the underlay."""
        return Addr(f"10.255.0.{n}", f"fd00:ff::{n}")

    def client(self, n: int) -> Client:
        fw = self.firewall(n)
        return Client(
            n=n,
            ns=self.ns(f"cl{n}"),
            name=f"cl{n}",
            mac=mac(MAC_CLIENT, n),
            addr=Addr(f"10.1.{n}.2", f"fd00:1:{n}::2"),
            gateway=fw.lan,
        )

    def vm(self, n: int) -> Vm:
        _check(n)
        if self.routed:
            addr, gw = Addr(f"10.2.0.1{n}", f"fd00:2::1{n}"), self.host.vm_gateway
        else:
            addr, gw = Addr(f"10.0.0.1{n}", f"fd00::1{n}"), self.firewall(1).transit
        assert gw is not None
        return Vm(
            n=n,
            ns=self.ns(f"vm{n}"),
            name=f"vm{n}",
            mac=mac(MAC_VM, n),
            port=f"vm{n}",
            port_mac=mac(MAC_VM_PORT, n),
            addr=addr,
            gateway=gw,
        )

    @property
    def host(self) -> Host:
        return Host(
            ns=self.ns("host"),
            uplink=VXLAN if self.overlay else UPLINK,
            uplink_mac=mac(MAC_HOST, 1),
            bridge=BRIDGE,
            bridge_mac=mac(MAC_HOST, 0),
            uplink_addr=Addr("10.0.0.100", "fd00::100") if self.routed else None,
            vm_gateway=Addr("10.2.0.1", "fd00:2::1") if self.routed else None,
            default_via=self.firewall(1).transit if self.routed else None,
            underlay=self._underlay(100) if self.overlay else None,
        )

    def namespaces(self) -> list[str]:
        """Every namespace of this lab, in build order."""
        return [
            self.switch_ns,
            self.host.ns,
            *(self.firewall(n).ns for n in self.sites),
            *(self.client(n).ns for n in self.sites),
            *(self.vm(n).ns for n in self.vms),
        ]


def lab_namespace_pattern(name: str) -> re.Pattern[str]:
    """Matches exactly the namespaces of lab *name* (not those of lab "<name>x");
    `peer` is the standby host of the HA lab (lasthop.lab.ha)."""
    return re.compile(rf"{re.escape(name)}-(?:sw|host|peer|(?:cl|fw|vm)\d+)")

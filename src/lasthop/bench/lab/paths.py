"""The paths of `lasthop bench lab`: each mode's copy of one small path
(fw1 — host — vm1) in its own namespaces, built, run through and removed.
The C sender and the BPF endpoints are compiled here too."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lasthop.lab import plan as P
from lasthop.lab import recipe as lab_recipe
from lasthop.lab import runner as lab_runner
from lasthop.lab.namespaces import ip_batch, ns_exec, run, sysctl
from lasthop.lab.topology import BRIDGE_OPTS, COMMON_SYSCTLS, ROUTER_SYSCTLS
from lasthop.lab.topology import down as lab_down

__all__ = [
    "BASELINE",
    "EXTRA_MODES",
    "MODES",
    "MODE_BY_NAME",
    "BenchError",
    "BenchPath",
    "Mode",
    "Progress",
    "Tools",
    "compile_tools",
    "remove_paths",
    "rx_packets",
]

HERE = Path(__file__).resolve().parent.parent  # the sources live in lasthop/bench/
SENDER_SOURCE = HERE / "lab_sender.c"
ENDPOINTS_SOURCE = HERE / "lab_endpoints.bpf.c"

# The sender's fixed parameters (keep in sync with lab_sender.c).
SRC_IP = "10.1.1.2"  # a client behind fw1; new flows come from 10.64.0.0/10
FRAME_LEN = 60

# Extra sysctls for every namespace of the bench: no IPv6 chatter on the path.
QUIET_SYSCTLS: dict[str, str | int] = {
    "net.ipv6.conf.all.disable_ipv6": 1,
    "net.ipv6.conf.default.disable_ipv6": 1,
}
# Whether the host's bridge hands frames to the IP netfilter hooks
# (br_netfilter). Off by default: the lean bridge is the limit; on, every
# bridged packet costs ~500 ns more (docs/bench-lab.md).
BR_NETFILTER_SYSCTLS = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)

Progress = Callable[[str], None]


class BenchError(RuntimeError):
    """The benchmark could not run (not root, a tool missing, a command failed)."""


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    tag: str  # the lab is <prefix><tag>: namespaces <prefix><tag>-fw1, -host, -vm1
    host: str | None  # None (no host), "bridged", "routed"
    extra: str | None = None  # None, "lasthop", "recipe"
    peer_redirect: bool = True  # lasthop: requests into the VM's veth end (bpf_redirect_peer)
    table_size: int = 0  # lasthop: the confirmed table's size (config table_size); 0 = default
    in_place: int | None = None  # lasthop: config pending_in_place; None = the default
    tc_hook: str = "auto"  # lasthop: config tc_hook (tcx links where the kernel has them)

    def config(self) -> str:
        """The lasthop config (TOML) this mode differs by from the defaults."""
        lines = [] if self.peer_redirect else ["peer_redirect = false"]
        lines += [f"table_size = {self.table_size}"] if self.table_size else []
        lines += [] if self.in_place is None else [f"pending_in_place = {self.in_place}"]
        lines += [] if self.tc_hook == "auto" else [f'tc_hook = "{self.tc_hook}"']
        return "".join(line + "\n" for line in lines)

    def plan(self, prefix: str) -> P.Plan:
        return P.Plan(prefix + self.tag, routed=self.host == "routed", sites=[1], vms=[1])


MODES = (
    Mode("direct", "no host (baseline)", "dir", None),
    Mode("bridge", "plain bridge", "br", "bridged"),
    Mode("lasthop", "lasthop (bridged)", "lh", "bridged", "lasthop"),
    Mode("lasthop-device", "lasthop (bridged, no peer)", "lhd", "bridged", "lasthop", False),
    Mode("routed", "plain routing", "rt", "routed"),
    Mode("lasthop-routed", "lasthop (routed)", "lhrt", "routed", "lasthop"),
    Mode("recipe", "conntrack recipe (routed)", "rcp", "routed", "recipe"),
)
# Diagnostic modes, run only when asked for (--extra-modes): the bridged
# lasthop host with a smaller confirmed table (the default holds 1,048,576),
# to see what the table's size -- the pages its buckets and entries spread
# over -- costs an established flow's lookup (docs/bench-lab.md); and the
# routed lasthop host without new connections confirmed in place
# (pending_in_place = 0: every new connection through the pending LRU, as
# before the default quota, docs/table.md); and both lasthop hosts with their
# programs as clsact filters instead of tcx links (tc_hook = "clsact", as
# before tcx and on kernels older than 6.6: docs/datapath.md, tc hooks).
EXTRA_MODES = (
    Mode("lasthop-4k", "lasthop (table 4,096)", "lh4k", "bridged", "lasthop", table_size=4096),
    Mode("lasthop-64k", "lasthop (table 65,536)", "lh64k", "bridged", "lasthop", table_size=65536),
    Mode(
        "lasthop-routed-lru",
        "lasthop (routed, no in-place)",
        "lhrl",
        "routed",
        "lasthop",
        in_place=0,
    ),  # fmt: skip
    Mode("lasthop-clsact", "lasthop (clsact)", "lhc", "bridged", "lasthop", tc_hook="clsact"),
    Mode(
        "lasthop-routed-clsact",
        "lasthop (routed, clsact)",
        "lhrc",
        "routed",
        "lasthop",
        tc_hook="clsact",
    ),  # fmt: skip
)
MODE_BY_NAME = {m.name: m for m in (*MODES, *EXTRA_MODES)}
BASELINE = "direct"


@dataclass(frozen=True)
class Tools:
    sender: Path
    endpoints: Path


def compile_tools(tmp: Path) -> Tools:
    """The sender (cc) and the endpoint programs (clang -target bpf), built into tmp."""
    cc = shutil.which("cc") or shutil.which("gcc")
    clang = shutil.which("clang")
    if not cc or not clang:
        raise BenchError(
            "cc and clang are needed to build the sender and the reflector: run scripts/setup"
        )
    sender, endpoints = tmp / "lab_sender", tmp / "lab_endpoints.bpf.o"
    triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        platform.machine(), ""
    )
    include = (
        [f"-I/usr/include/{triplet}"]
        if triplet and Path(f"/usr/include/{triplet}").is_dir()
        else []
    )
    for argv in (
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(sender), str(SENDER_SOURCE)],
        [
            clang,
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            *include,
            "-c",
            str(ENDPOINTS_SOURCE),
            "-o",
            str(endpoints),
        ],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(f"{' '.join(argv)}:\n{result.stderr.strip()}")
    return Tools(sender, endpoints)


class BenchPath:
    """One mode's copy of the path: fw1 (sender) — host — vm1 (reflector)."""

    def __init__(self, mode: Mode, tools: Tools, prefix: str, br_netfilter: bool = False) -> None:
        self.mode = mode
        self.tools = tools
        self.br_netfilter = br_netfilter
        self.plan = plan = mode.plan(prefix)
        self.fw, self.vm, self.host = plan.firewall(1), plan.vm(1), plan.host
        self.fw_if = P.FW_TRANSIT
        self.lasthop: lab_runner.AgentRunner | None = None

    @property
    def namespaces(self) -> list[str]:
        return [self.fw.ns, *([self.host.ns] if self.mode.host else []), self.vm.ns]

    @property
    def dst_mac(self) -> str:
        """Where fw1 sends the requests: the VM itself, or the routed host's uplink."""
        return self.host.uplink_mac if self.mode.host == "routed" else self.vm.mac

    def build(self) -> None:
        mode, fw, vm, host = self.mode, self.fw, self.vm, self.host
        ip_batch(None, [f"netns add {ns}" for ns in self.namespaces])
        for ns in self.namespaces:
            router = ns == host.ns and mode.host == "routed"
            sysctl(ns, {**COMMON_SYSCTLS, **(ROUTER_SYSCTLS if router else {}), **QUIET_SYSCTLS})
            ip_batch(ns, ["link set lo up"])
        if mode.host is None:
            ip_batch(
                fw.ns,
                [
                    f"link add {self.fw_if} address {fw.transit_mac} type veth "
                    f"peer name {P.ETH} address {vm.mac} netns {vm.ns}"
                ],
            )
        else:
            self._build_host()
        ip_batch(
            fw.ns, [f"addr add {fw.transit.cidr4} dev {self.fw_if}", f"link set {self.fw_if} up"]
        )
        ip_batch(vm.ns, [f"addr add {vm.addr.cidr4} dev {P.ETH}", f"link set {P.ETH} up"])
        self._tc(vm.ns, P.ETH, "tc/reflect")
        self._tc(fw.ns, self.fw_if, "tc/sink")
        if mode.extra == "recipe":
            self._recipe()
        elif mode.extra == "lasthop":
            self._attach_lasthop()

    def _build_host(self) -> None:
        fw, vm, host = self.fw, self.vm, self.host
        up = f"dev {host.uplink}"
        lines = [
            f"link add {host.uplink} address {host.uplink_mac} type veth "
            f"peer name {self.fw_if} address {fw.transit_mac} netns {fw.ns}",
            f"link add {vm.port} address {vm.port_mac} type veth "
            f"peer name {P.ETH} address {vm.mac} netns {vm.ns}",
            f"link add {host.bridge} address {host.bridge_mac} {BRIDGE_OPTS}",
            f"link set {vm.port} master {host.bridge}",
        ]
        if self.mode.host == "routed":
            assert host.uplink_addr and host.vm_gateway and host.default_via
            lines += [
                f"addr add {host.uplink_addr.cidr4} dev {host.uplink}",
                f"addr add {host.vm_gateway.cidr4} dev {host.bridge}",
                f"link set {host.uplink} up",
                f"link set {vm.port} up",
                f"link set {host.bridge} up",
                f"route add default via {host.default_via.v4}",
                # static neighbours: no ARP on the path, in any run
                f"neigh replace {fw.transit.v4} lladdr {fw.transit_mac} {up} nud permanent",
                f"neigh replace {vm.addr.v4} lladdr {vm.mac} dev {host.bridge} nud permanent",
            ]
        else:
            lines += [
                f"link set {host.uplink} master {host.bridge}",
                f"link set {host.uplink} up",
                f"link set {vm.port} up",
                f"link set {host.bridge} up",
            ]
        ip_batch(host.ns, lines)
        sysctl(host.ns, {key: int(self.br_netfilter) for key in BR_NETFILTER_SYSCTLS})
        # static FDB entries: the bridge never floods, in any run
        fdb = [f"fdb replace {vm.mac} dev {vm.port} master static"]
        if self.mode.host == "bridged":
            fdb.append(f"fdb replace {fw.transit_mac} dev {host.uplink} master static")
        run(["bridge", "-n", host.ns, "-batch", "-"], input="\n".join(fdb) + "\n")

    def _tc(self, ns: str, dev: str, section: str) -> None:
        ns_exec(ns, ["tc", "qdisc", "add", "dev", dev, "clsact"])
        ns_exec(
            ns,
            [
                "tc",
                "filter",
                "add",
                "dev",
                dev,
                "ingress",
                "bpf",
                "direct-action",
                "obj",
                str(self.tools.endpoints),
                "sec",
                section,
            ],
        )

    def _recipe(self) -> None:
        """The lab's recipe (lasthop.lab.recipe's nft table), IPv4 rule and table for mark 1."""
        host, fw = self.host, self.fw
        ns_exec(
            host.ns,
            ["nft", "-f", "-"],
            input=lab_recipe.ruleset({fw.transit_mac: 1}, host.uplink, host.bridge),
        )
        table = lab_recipe.TABLE_BASE + 1
        ip_batch(
            host.ns,
            [
                f"rule add fwmark 1 lookup {table} priority {lab_recipe.RULE_PRIORITY_BASE + 1}",
                f"route replace default via {fw.transit.v4} dev {host.uplink} table {table}",
            ],
        )

    def _attach_lasthop(self) -> None:
        """Starts the agent, waits until it has attached, and stops it: the data
        path stays attached and no agent work (aging) lands in a measurement."""
        if not lab_runner.available():
            raise BenchError("the lasthop agent is not importable")
        extra: tuple[str, ...] = ()
        if self.mode.config():
            config = self.tools.sender.parent / f"{self.mode.tag}.toml"
            config.write_text(self.mode.config())
            extra = ("--config", str(config))
        agent = lab_runner.AgentRunner(self.plan, extra=extra)
        agent.start()
        agent.stop()
        self.lasthop = agent

    # -- during the runs ---------------------------------------------------------
    def flush(self) -> None:
        """Empties the host's connection table (lasthop's or conntrack's)."""
        if self.mode.extra == "recipe":
            ns_exec(self.host.ns, ["conntrack", "-F"], check=False)
        elif self.mode.extra == "lasthop":
            run([sys.executable, "-m", "lasthop", "flush", "--netns", self.host.ns])

    def send(
        self,
        count: int,
        *,
        flows: int = 0,
        new_base: int = -1,
        cpu: int = 0,
        warmup: int = 0,
        tcp: bool = False,
        handshake: bool = False,
    ) -> dict[str, int]:
        """Sends count frames (after warmup untimed ones) over flows known
        flows, or new ones from new_base; tcp: ACKs of established TCP
        connections, each flow's handshake first when handshake."""
        argv = [
            str(self.tools.sender),
            self.fw_if,
            self.dst_mac,
            self.fw.transit_mac,
            SRC_IP,
            self.vm.addr.v4,
            str(count),
            "--cpu",
            str(cpu),
        ]
        argv += ["--new", str(new_base)] if new_base >= 0 else ["--flows", str(flows)]
        argv += ["--warmup", str(warmup)] if warmup else []
        argv += ["--tcp"] if tcp else []
        argv += ["--handshake"] if handshake else []
        out = ns_exec(self.fw.ns, argv).stdout
        result: dict[str, int] = json.loads(out)
        return result

    def counters(self) -> tuple[int, int]:
        """(packets the VM received, packets fw1 received)."""
        return rx_packets(self.vm.ns, P.ETH), rx_packets(self.fw.ns, self.fw_if)

    def lasthop_stats(self) -> dict[str, Any]:
        out = run(
            [sys.executable, "-m", "lasthop", "stats", "--netns", self.host.ns, "--json"]
        ).stdout
        stats: dict[str, Any] = json.loads(out)
        return stats

    def conntrack_count(self) -> int:
        out = ns_exec(self.host.ns, ["conntrack", "-C"], check=False).stdout.strip()
        return int(out) if out.isdigit() else -1


def rx_packets(ns: str, dev: str) -> int:
    """Packets *dev* in namespace *ns* has received."""
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def remove_paths(prefix: str, progress: Progress) -> None:
    """Removes every namespace, pin, agent and state any bench mode left (by lab name)."""
    for mode in (*MODES, *EXTRA_MODES):
        removed = lab_down(mode.plan(prefix).name)
        if removed:
            progress(f"removed {len(removed)} namespaces of {mode.name}")

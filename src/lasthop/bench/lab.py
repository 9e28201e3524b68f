"""`lasthop bench lab`: what the host costs per packet and per new connection
with a plain bridge, with lasthop, and with the Linux conntrack recipe —
side by side, interleaved, in one run. docs/bench-lab.md explains the method
and its noise.

Every mode gets its own copy of one small path, in its own namespaces, with
the same addresses and MACs (from lasthop.lab.plan); only the host differs:

    <lab>-fw1 (sender, sink) ── up0 [<lab>-host] vm1 ── eth0 <lab>-vm1 (reflector)

    <lab> = prefix + mode tag: lhbbr, lhblh, lhbrcp, ... (torn down with lasthop.lab's down())

    direct          no host: fw1's veth goes straight to the VM (the baseline)
    bridge          bridged host, nothing else (the symmetric path: the limit)
    lasthop         the same bridged host with lasthop attached
    routed          routed host, nothing else
    lasthop-routed  the same routed host with lasthop --routed attached
    recipe          the routed host with the lab's conntrack recipe
                    (ct mark by the last hop's MAC, fwmark policy routing)

A C sender (bench/lab_sender.c) in fw1 writes 60-byte UDP frames to its veth,
pinned to one CPU; a tc program in the VM (bench/lab_endpoints.bpf.c) answers
each one in place, and another drops the answers in fw1. The whole round trip
runs in softirq on the sender's CPU, inside its send calls, so the sender
thread's CPU time (plus ksoftirqd's, in case the kernel deferred some) is the
CPU the path cost. The host's cost is that minus the direct path's, from the
same repetition.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from lasthop.bench.frames import quiet
from lasthop.lab import plan as P
from lasthop.lab import recipe as lab_recipe
from lasthop.lab import runner as lab_runner
from lasthop.lab.namespaces import LabError, ip_batch, ns_exec, run, sysctl
from lasthop.lab.topology import BRIDGE_OPTS, COMMON_SYSCTLS, ROUTER_SYSCTLS
from lasthop.lab.topology import down as lab_down

__all__ = [
    "MODES",
    "Mode",
    "Settings",
    "QUICK",
    "FULL",
    "Run",
    "Report",
    "BenchError",
    "run_bench",
    "summarize",
    "write_results",
    "lab_command",
]

HERE = Path(__file__).resolve().parent
SENDER_SOURCE = HERE / "lab_sender.c"
ENDPOINTS_SOURCE = HERE / "lab_endpoints.bpf.c"
DEFAULT_OUT = Path("results/bench-lab")
LOCK_DIR = Path("/run/lasthop-bench")
DEFAULT_PREFIX = "lhb"
NS_PER_S = 1e9
MAX_LOSS = 0.001  # a run that lost more than this share of its packets is flagged
SETTLE_S = 0.2  # after flushing a table: RCU frees the entries before the next run

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

    def plan(self, prefix: str) -> P.Plan:
        return P.Plan(prefix + self.tag, routed=self.host == "routed", sites=[1], vms=[1])


MODES = (
    Mode("direct", "no host (baseline)", "dir", None),
    Mode("bridge", "plain bridge", "br", "bridged"),
    Mode("lasthop", "lasthop (bridged)", "lh", "bridged", "lasthop"),
    Mode("routed", "plain routing", "rt", "routed"),
    Mode("lasthop-routed", "lasthop (routed)", "lhrt", "routed", "lasthop"),
    Mode("recipe", "conntrack recipe (routed)", "rcp", "routed", "recipe"),
)
MODE_BY_NAME = {m.name: m for m in MODES}
BASELINE = "direct"


@dataclass(frozen=True)
class Target:
    """mode's metric over base's metric must be <= (or >=) limit."""

    metric: str  # "packet_ns" (lower is better) or "conn_per_s" (higher is better)
    mode: str
    base: str
    limit: float
    primary: bool  # the three modes; False = the like-for-like routed comparison

    @property
    def op(self) -> str:
        return "<=" if self.metric == "packet_ns" else ">="

    def describe(self) -> str:
        what = "added ns/packet" if self.metric == "packet_ns" else "new connections/s"
        mode, base = MODE_BY_NAME[self.mode].label, MODE_BY_NAME[self.base].label
        return f"{mode} ÷ {base}: {what} {self.op} {self.limit:g}×"


TARGETS = (
    Target("packet_ns", "lasthop", "bridge", 0.8, True),
    Target("packet_ns", "lasthop", "recipe", 0.5, True),
    Target("conn_per_s", "lasthop", "recipe", 2.0, True),
    Target("packet_ns", "lasthop-routed", "recipe", 0.5, False),
    Target("conn_per_s", "lasthop-routed", "recipe", 2.0, False),
)


@dataclass(frozen=True)
class Settings:
    reps: int = 5
    packets: int = 200_000  # per run of the packets test
    connections: int = 50_000  # new flows per run of the connections test
    flows: int = 1024  # established flows the packets test cycles over
    warmup: int = 5_000  # packets sent (unmeasured) before each packets run
    cpu: int = 0  # the sender's CPU
    br_netfilter: bool = False  # the hosts' bridges call the IP netfilter hooks
    churn: int = 2  # fill-and-flush rounds of every table before the first repetition
    quick: bool = False


FULL = Settings()
QUICK = Settings(reps=3, packets=40_000, connections=10_000, warmup=2_000, churn=1, quick=True)


@dataclass(frozen=True)
class Run:
    """One measured run of one test through one mode."""

    mode: str
    test: str  # "packets" or "connections"
    rep: int
    sent: int  # requests the sender wrote
    reached_vm: int  # requests the VM received (and answered)
    replies: int  # answers back at fw1
    cpu_ns: int  # the sender thread's CPU time: its own work and the path's softirq work
    softirqd_ns: int  # ksoftirqd's CPU time meanwhile (work the kernel deferred), all CPUs
    wall_ns: int

    @property
    def total_ns(self) -> int:
        return self.cpu_ns + self.softirqd_ns

    @property
    def per_request_ns(self) -> float:
        return self.total_ns / self.sent

    @property
    def lost(self) -> int:
        return self.sent - self.replies


# -- topology ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    sender: Path
    endpoints: Path


def _compile(tmp: Path) -> Tools:
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
        agent = lab_runner.AgentRunner(self.plan)
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
        self, count: int, *, flows: int = 0, new_base: int = -1, cpu: int = 0
    ) -> dict[str, int]:
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
        out = ns_exec(self.fw.ns, argv).stdout
        result: dict[str, int] = json.loads(out)
        return result

    def counters(self) -> tuple[int, int]:
        """(packets the VM received, packets fw1 received)."""
        return _rx_packets(self.vm.ns, P.ETH), _rx_packets(self.fw.ns, self.fw_if)

    def lasthop_stats(self) -> dict[str, Any]:
        out = run(
            [sys.executable, "-m", "lasthop", "stats", "--netns", self.host.ns, "--json"]
        ).stdout
        stats: dict[str, Any] = json.loads(out)
        return stats

    def conntrack_count(self) -> int:
        out = ns_exec(self.host.ns, ["conntrack", "-C"], check=False).stdout.strip()
        return int(out) if out.isdigit() else -1


def _rx_packets(ns: str, dev: str) -> int:
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def _softirqd_pids() -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cpu_time_ns(pids: list[int]) -> int:
    """Summed CPU time (ns, from /proc/PID/schedstat) of pids."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _clean(prefix: str, progress: Progress) -> None:
    """Removes every namespace, pin, agent and state any bench mode left (by lab name)."""
    for mode in MODES:
        removed = lab_down(mode.plan(prefix).name)
        if removed:
            progress(f"removed {len(removed)} namespaces of {mode.name}")


@contextmanager
def _exclusive(prefix: str) -> Iterator[None]:
    """One bench lab per prefix at a time (they would share namespaces)."""
    lock = LOCK_DIR / f"lab-{prefix}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"a bench lab with prefix {prefix} is running ({lock})") from None
        yield


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so the clean-up runs as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- the benchmark ----------------------------------------------------------------


def _measure(
    path: BenchPath, settings: Settings, test: str, rep: int, new_base: int, ksoft: list[int]
) -> Run:
    vm0, fw0 = path.counters()
    soft0 = _cpu_time_ns(ksoft)
    if test == "packets":
        out = path.send(settings.packets, flows=settings.flows, cpu=settings.cpu)
    else:
        out = path.send(settings.connections, new_base=new_base, cpu=settings.cpu)
    soft = _cpu_time_ns(ksoft) - soft0
    vm1, fw1 = path.counters()
    return Run(
        path.mode.name,
        test,
        rep,
        out["sent"],
        vm1 - vm0,
        fw1 - fw0,
        out["cpu_ns"],
        soft,
        out["wall_ns"],
    )


def run_bench(
    settings: Settings, progress: Progress = quiet, prefix: str = DEFAULT_PREFIX
) -> Report:
    """Builds every mode's path, runs the tests interleaved, removes everything."""
    if os.geteuid() != 0:
        raise BenchError("the bench lab needs root (network namespaces, nftables, BPF)")
    if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", prefix):
        raise BenchError(
            f"prefix {prefix!r}: 1-4 lowercase letters and digits, starting with a letter"
        )
    if not 0 <= settings.cpu < (os.cpu_count() or 1):
        raise BenchError(f"no CPU {settings.cpu} on this machine")
    started = time.monotonic()
    with (
        _exclusive(prefix),
        _sigterm_interrupts(),
        tempfile.TemporaryDirectory(prefix="lasthop-bench-lab-") as tmp,
    ):
        progress("building the sender and the reflector")
        tools = _compile(Path(tmp))
        _clean(prefix, progress)
        try:
            paths: list[BenchPath] = []
            for mode in MODES:
                progress(f"building {mode.name}: {mode.label}")
                path = BenchPath(mode, tools, prefix, settings.br_netfilter)
                paths.append(path)
                path.build()
            runs = _interleaved(paths, settings, progress)
            checks = _checks(paths, runs)
        finally:
            progress("removing the namespaces")
            _clean(prefix, quiet)
    return summarize(runs, settings, checks, time.monotonic() - started)


def _interleaved(paths: list[BenchPath], settings: Settings, progress: Progress) -> list[Run]:
    """Every repetition runs each test through every mode in turn: A B C ... A B C ..."""
    ksoft = _softirqd_pids()
    runs: list[Run] = []
    next_flow = 0
    # A table fresh from allocation hands out its entries in address order;
    # one that has been filled and emptied does not, and inserts into it cost
    # ~10% more. A host's table is never fresh: churn every table first.
    for round_ in range(settings.churn):
        progress(f"churning the tables ({round_ + 1}/{settings.churn})")
        for path in paths:
            path.send(settings.connections, new_base=next_flow, cpu=settings.cpu)
            next_flow += settings.connections
            path.flush()
    for rep in range(settings.reps):
        progress(f"repetition {rep + 1}/{settings.reps}: {settings.packets} packets per mode")
        for path in paths:
            path.send(
                settings.warmup, flows=settings.flows, cpu=settings.cpu
            )  # every flow known, caches warm
            runs.append(_measure(path, settings, "packets", rep, -1, ksoft))
        progress(
            f"repetition {rep + 1}/{settings.reps}: {settings.connections} new connections per mode"
        )
        for path in paths:
            path.flush()
        time.sleep(SETTLE_S)
        for path in paths:
            runs.append(_measure(path, settings, "connections", rep, next_flow, ksoft))
            next_flow += settings.connections  # never a flow seen before, in any mode
    return runs


def _checks(paths: list[BenchPath], runs: list[Run]) -> dict[str, Any]:
    """Evidence each mode did what it is named for: lasthop redirected the
    replies, the recipe tracked the connections; no run lost packets."""
    checks: dict[str, Any] = {}
    for path in paths:
        mine = [r for r in runs if r.mode == path.mode.name]
        lost = max((r.lost / r.sent for r in mine), default=0.0)
        entry: dict[str, Any] = {"max_loss": lost, "ok": lost <= MAX_LOSS}
        if path.mode.extra == "lasthop":
            totals = path.lasthop_stats()["totals"]
            replies = sum(r.replies for r in mine)
            entry |= {
                "redirected": totals.get("redirected", 0),
                "learned": totals.get("learned", 0),
                "replies": replies,
            }
            entry["ok"] = entry["ok"] and entry["redirected"] >= replies
        elif path.mode.extra == "recipe":
            last = [r for r in mine if r.test == "connections"][-1]
            entry |= {"conntrack_entries": path.conntrack_count(), "last_connections": last.sent}
            entry["ok"] = entry["ok"] and entry["conntrack_entries"] >= last.sent
        checks[path.mode.name] = entry
    return checks


# -- the figures ------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """A median over the repetitions, with the lowest and highest value."""

    median: float
    low: float
    high: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Figure:
        return cls(statistics.median(values), min(values), max(values), values)

    @property
    def spread(self) -> float:
        """(high - low) / median: the whole range, relative."""
        return (self.high - self.low) / self.median if self.median else float("inf")


@dataclass
class ModeResult:
    name: str
    label: str
    path_ns: Figure  # CPU per request-and-reply through the whole path
    packet_ns: Figure | None  # the host's added CPU per forwarded packet (None for the baseline)
    conn_ns: Figure | None  # the host's added CPU per new connection (its request and reply)
    conn_per_s: Figure | None  # new connections per second of one host CPU: 1e9 / conn_ns


@dataclass
class TargetResult:
    target: Target
    ratio: Figure  # the median's ratio as .median; per-repetition ratios as low/high

    @property
    def passed(self) -> bool:
        return (
            self.ratio.median <= self.target.limit
            if self.target.op == "<="
            else self.ratio.median >= self.target.limit
        )


@dataclass
class Report:
    settings: Settings
    modes: dict[str, ModeResult]
    targets: list[TargetResult]
    checks: dict[str, Any]
    runs: list[Run]
    elapsed_s: float
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        return all(c.get("ok", False) for c in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        def fig(f: Figure | None) -> dict[str, Any] | None:
            return (
                None
                if f is None
                else {"median": f.median, "low": f.low, "high": f.high, "values": f.values}
            )

        return {
            "settings": asdict(self.settings),
            "environment": self.environment,
            "elapsed_s": round(self.elapsed_s, 1),
            "modes": {
                name: {
                    "label": m.label,
                    "path_ns_per_request": fig(m.path_ns),
                    "host_ns_per_packet": fig(m.packet_ns),
                    "host_ns_per_connection": fig(m.conn_ns),
                    "connections_per_s": fig(m.conn_per_s),
                }
                for name, m in self.modes.items()
            },
            "targets": [
                {
                    "metric": t.target.metric,
                    "mode": t.target.mode,
                    "base": t.target.base,
                    "op": t.target.op,
                    "limit": t.target.limit,
                    "primary": t.target.primary,
                    "ratio": t.ratio.median,
                    "ratio_low": t.ratio.low,
                    "ratio_high": t.ratio.high,
                    "passed": t.passed,
                }
                for t in self.targets
            ],
            "checks": self.checks,
            "consistent": self.consistent,
            "runs": [asdict(r) | {"per_request_ns": r.per_request_ns} for r in self.runs],
        }


def _irq_time_accounting() -> bool | None:
    """Whether the kernel takes softirq time out of the interrupted task's
    time (CONFIG_IRQ_TIME_ACCOUNTING): then the sender thread's CPU time
    misses the path's work and the figures are too low. None: unknown."""
    import gzip

    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        return b"\nCONFIG_IRQ_TIME_ACCOUNTING=y\n" in raw
    return None


def _environment(settings: Settings) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "sender_cpu": settings.cpu,
        "irq_time_accounting": _irq_time_accounting(),
        "command": "lasthop bench lab" + (" --quick" if settings.quick else ""),
    }


def summarize(
    runs: list[Run],
    settings: Settings,
    checks: dict[str, Any] | None = None,
    elapsed_s: float = 0.0,
) -> Report:
    """Per mode and repetition: the host's cost = the mode's path minus the
    direct path of the same repetition; then medians over the repetitions."""
    by: dict[tuple[str, str, int], Run] = {(r.mode, r.test, r.rep): r for r in runs}
    reps = sorted({r.rep for r in runs})
    names = [m.name for m in MODES if any(r.mode == m.name for r in runs)]
    per_pkt: dict[str, list[float]] = {}
    per_conn: dict[str, list[float]] = {}
    modes: dict[str, ModeResult] = {}
    for name in names:
        path = [by[(name, "packets", rep)].per_request_ns for rep in reps]
        if name != BASELINE:
            # a request and its reply: the host forwards two packets
            per_pkt[name] = [
                (
                    by[(name, "packets", rep)].per_request_ns
                    - by[(BASELINE, "packets", rep)].per_request_ns
                )
                / 2
                for rep in reps
            ]
            per_conn[name] = [
                by[(name, "connections", rep)].per_request_ns
                - by[(BASELINE, "connections", rep)].per_request_ns
                for rep in reps
            ]
        pkt = Figure.of(per_pkt[name]) if name in per_pkt else None
        conn = Figure.of(per_conn[name]) if name in per_conn else None
        rate = (
            Figure.of([NS_PER_S / v if v > 0 else float("inf") for v in per_conn[name]])
            if name in per_conn
            else None
        )
        modes[name] = ModeResult(name, MODE_BY_NAME[name].label, Figure.of(path), pkt, conn, rate)
    targets = []
    for t in TARGETS:
        if t.mode not in modes or t.base not in modes:
            continue
        if t.metric == "packet_ns":
            a, b = per_pkt[t.mode], per_pkt[t.base]
            median = statistics.median(a) / statistics.median(b)
            each = [x / y for x, y in zip(a, b, strict=True)]
        else:  # connections per second: the inverse ratio of the costs
            a, b = per_conn[t.mode], per_conn[t.base]
            median = statistics.median(b) / statistics.median(a)
            each = [y / x for x, y in zip(a, b, strict=True)]
        targets.append(TargetResult(t, Figure(median, min(each), max(each), each)))
    return Report(settings, modes, targets, checks or {}, runs, elapsed_s, _environment(settings))


# -- output ---------------------------------------------------------------------------


def _fmt(f: Figure | None) -> str:
    return "–" if f is None else f"{f.median:,.0f} ({f.low:,.0f}–{f.high:,.0f})"


COLUMNS = (
    "mode",
    "host ns/packet",
    "× plain bridge",
    "× recipe",
    "host ns/connection",
    "connections/s per CPU",
    "× recipe",
)


def _ratio_to(report: Report, name: str, base: str, metric: str) -> str:
    m, b = report.modes[name], report.modes.get(base)
    if b is None or m.packet_ns is None or m.conn_ns is None:
        return "–"
    if metric == "packet_ns":
        assert b.packet_ns
        return f"{m.packet_ns.median / b.packet_ns.median:.2f}×"
    assert b.conn_ns
    return f"{b.conn_ns.median / m.conn_ns.median:.2f}×"


def _rows(report: Report) -> list[list[str]]:
    """One row per mode (not the baseline), cells as COLUMNS names them."""
    return [
        [
            m.label,
            _fmt(m.packet_ns),
            _ratio_to(report, name, "bridge", "packet_ns"),
            _ratio_to(report, name, "recipe", "packet_ns"),
            _fmt(m.conn_ns),
            _fmt(m.conn_per_s),
            _ratio_to(report, name, "recipe", "conn_per_s"),
        ]
        for name, m in report.modes.items()
        if name != BASELINE
    ]


def _measured(t: TargetResult) -> str:
    return f"{t.ratio.median:.2f}× ({t.ratio.low:.2f}–{t.ratio.high:.2f})"


def _setup_line(report: Report) -> str:
    env, s = report.environment, report.settings
    return (
        f"`{env.get('command')}` on {env.get('date')}: kernel {env.get('kernel')}, "
        f"{env.get('cpus')} × {env.get('cpu')}; sender on CPU {s.cpu}; bridges "
        f"{'with' if s.br_netfilter else 'without'} br_netfilter; {s.reps} repetitions, modes "
        f"interleaved; per mode and repetition {s.packets:,} packets ({FRAME_LEN}-byte UDP over "
        f"{s.flows} flows, each answered) and {s.connections:,} new connections (a request and "
        f"its answer each); {report.elapsed_s:.0f} s."
    ) + ACCOUNTING_WARNING.get(env.get("irq_time_accounting"), "")


ACCOUNTING_WARNING = {
    True: " WARNING: this kernel has CONFIG_IRQ_TIME_ACCOUNTING=y, so softirq time is not in "
    "the sender's CPU time and every figure is too low (docs/bench-lab.md).",
    None: " (kernel config unreadable: the method assumes CONFIG_IRQ_TIME_ACCOUNTING is off.)",
}


def markdown(report: Report) -> str:
    lines = [
        "# lasthop bench lab",
        "",
        _setup_line(report),
        "",
        "Median over the repetitions (lowest–highest). *host ns/packet*: CPU the host adds per "
        "packet it forwards (requests and answers alike), over the same traffic on a path "
        "without a host. *host ns/connection*: CPU it adds per new connection. "
        "*connections/s per CPU* = 10⁹ / host ns/connection. Method and noise: "
        "docs/bench-lab.md.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(COLUMNS) - 1),
        *("| " + " | ".join(row) + " |" for row in _rows(report)),
    ]
    base = report.modes.get(BASELINE)
    if base:
        lines += [
            "",
            f"Path without a host: {_fmt(base.path_ns)} ns of CPU per request and answer.",
        ]
    lines += ["", "## Targets", "", "| target | measured | result |", "| --- | ---: | --- |"]
    for t in report.targets:
        scope = "" if t.target.primary else " (routed host, like for like)"
        result = "**pass**" if t.passed else "**miss**"
        lines.append(f"| {t.target.describe()}{scope} | {_measured(t)} | {result} |")
    lines += ["", "## Checks", ""]
    for name, c in report.checks.items():
        detail = ", ".join(
            f"{k} {v:.3%}" if k == "max_loss" else f"{k} {v}" for k, v in c.items() if k != "ok"
        )
        lines.append(f"- {name}: {'ok' if c.get('ok') else 'FAILED'} ({detail})")
    return "\n".join(lines) + "\n"


PANELS = (
    ("packet_ns", "host CPU added per forwarded packet", "ns / packet (lower is better)"),
    (
        "conn_per_s",
        "new connections per second of one host CPU",
        "connections / s (higher is better)",
    ),
)


def chart(report: Report, path: Path) -> None:
    """Two bar charts (ns/packet, connections/s) with the primary targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    shown = [m for name, m in report.modes.items() if name != BASELINE]
    labels = [m.label.replace(" (", "\n(") for m in shown]
    grey, blue, red = "#7f7f7f", "#1f77b4", "#d62728"
    colours = [blue if "lasthop" in m.name else red if m.name == "recipe" else grey for m in shown]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 4.8))
    for ax, (attr, title, unit) in zip(axes, PANELS, strict=True):
        figs: list[Figure] = [getattr(m, attr) for m in shown]
        med = [f.median for f in figs]
        err = [[f.median - f.low for f in figs], [f.high - f.median for f in figs]]
        bars = ax.bar(range(len(shown)), med, yerr=err, capsize=4, color=colours)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in med], padding=3, fontsize=8)
        ax.set_xticks(range(len(shown)), labels, fontsize=8)
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        lines = iter(["--", ":", "-."])
        for t in report.targets:
            base = report.modes.get(t.target.base)
            if t.target.primary and t.target.metric == attr and base:
                level = getattr(base, attr).median * t.target.limit
                op = "≤" if t.target.op == "<=" else "≥"
                label = f"lasthop target: {op} {t.target.limit:g}× {base.label}"
                ax.axhline(level, color=blue, linestyle=next(lines), linewidth=0.9, label=label)
        ax.legend(fontsize=7, loc="upper left" if attr == "packet_ns" else "upper right")
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
    fig.suptitle(
        f"lasthop bench lab: median of {report.settings.reps} interleaved repetitions "
        f"(whiskers: lowest–highest); kernel {report.environment.get('kernel')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(report: Report, out: Path) -> list[Path]:
    """bench-lab.md, bench-lab.png and bench-lab.json in out (created)."""
    out.mkdir(parents=True, exist_ok=True)
    md, png, js = out / "bench-lab.md", out / "bench-lab.png", out / "bench-lab.json"
    md.write_text(markdown(report))
    chart(report, png)
    js.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return [md, png, js]


def print_report(report: Report, console: Console) -> None:
    console.print(_setup_line(report), highlight=False)
    table = Table(title="the host's added cost: median (lowest–highest)", title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "mode" else "right")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    base = report.modes.get(BASELINE)
    if base:
        console.print(f"path without a host: {_fmt(base.path_ns)} ns per request and answer")
    targets = Table(title="targets", title_justify="left")
    for col in ("target", "measured", "result"):
        targets.add_column(col, justify="right" if col == "measured" else "left")
    for t in report.targets:
        scope = "" if t.target.primary else " [dim](routed host, like for like)[/dim]"
        result = "[green]pass[/green]" if t.passed else "[red]miss[/red]"
        targets.add_row(t.target.describe() + scope, _measured(t), result)
    console.print(targets)
    for name, c in report.checks.items():
        if not c.get("ok"):
            console.print(f"[red]check failed:[/red] {name}: {json.dumps(c)}", highlight=False)


# -- command ------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_CANNOT_RUN = 0, 1, 3


@click.command("lab")
@click.option(
    "--quick",
    is_flag=True,
    help=f"A short run for CI (~20 s): {QUICK.reps} repetitions, fewer packets.",
)
@click.option("--reps", type=click.IntRange(1), help="Repetitions (each runs every mode once).")
@click.option("--packets", type=click.IntRange(1000), help="Packets per mode and repetition.")
@click.option(
    "--connections",
    type=click.IntRange(100, 200_000),
    help="New connections per mode and repetition.",
)
@click.option(
    "--cpu",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="The sender's CPU (the whole path runs there).",
)
@click.option(
    "--br-netfilter",
    is_flag=True,
    help="Leave br_netfilter on in the hosts' bridges (the kernel default once loaded).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_OUT,
    show_default=True,
    help="Folder for bench-lab.md, bench-lab.png, bench-lab.json.",
)
@click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Start of every namespace name (<prefix><mode>-host, ...): two runs need two prefixes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
@click.option("--strict", is_flag=True, help="Exit 1 when a primary target is missed.")
def lab_command(quick: bool, reps: int | None, packets: int | None, connections: int | None,
                cpu: int, br_netfilter: bool, out: Path, prefix: str,
                as_json: bool, strict: bool) -> None:  # fmt: skip
    """The host's CPU per packet and new connections per second: plain bridge,
    lasthop, conntrack recipe, side by side (docs/bench-lab.md).

    Exit codes: 0 it ran (targets are reported, not enforced); 1 a check
    failed (packets lost, or lasthop or the recipe did not do its work), or
    with --strict a target was missed; 3 it could not run (not root, a tool
    missing, a command failed)."""
    base = QUICK if quick else FULL
    settings = replace(
        base,
        reps=reps or base.reps,
        packets=packets or base.packets,
        connections=connections or base.connections,
        cpu=cpu,
        br_netfilter=br_netfilter,
    )
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True)
    try:
        with console.status("starting") as status:
            report = run_bench(settings, status.update, prefix)
    except (BenchError, LabError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(EXIT_CANNOT_RUN)
    except KeyboardInterrupt:
        err.print("interrupted: every namespace of the bench removed")
        sys.exit(130)
    files = write_results(report, out)
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print_report(report, console)
    console.print(f"written: {', '.join(map(str, files))}")
    missed = strict and not all(t.passed for t in report.targets if t.target.primary)
    sys.exit(EXIT_OK if report.consistent and not missed else EXIT_FAILED)


if __name__ == "__main__":
    lab_command()

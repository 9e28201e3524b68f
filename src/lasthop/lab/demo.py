"""The demo's script, without the rendering (lasthop.lab.cli draws it): per
host mode, build the lab, run the traffic check without lasthop, optionally
with the Linux recipe (before and after a fail-over and a new firewall), then
with lasthop; then a service: a virtual address served by every VM, without
and with lasthop, and one VM drained; record what each phase should have
shown; always tear down.

The expectations are the end-to-end script of STYLE.md: it fails without
lasthop (cl1 works, every path through fw2/fw3 dies), it works with it. For
the service: every connection is answered by the VM the Maglev table names,
its entry's last hop is its client's firewall, every VM serves; after the
drain no new connection reaches the drained VM and the open one still works.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lasthop.lab import capture, recipe, runner, services, state, traffic, ways
from lasthop.lab import plan as P
from lasthop.lab.discover import discover
from lasthop.lab.namespaces import LabError, eventually
from lasthop.lab.topology import Lab
from lasthop.lab.traffic import Attempt, CheckResult

__all__ = [
    "Phase",
    "ModeRun",
    "PhaseCapture",
    "ServedConn",
    "ServiceRun",
    "DrainRun",
    "run_mode",
    "expect_asymmetric",
    "expect_all_ok",
    "expect_dead_only",
    "expect_served",
    "expect_unserved",
    "expect_drained",
    "counter_delta",
    "sample_rows",
]

Say = Callable[[str], None]
FAILOVER_SITE = 2  # the firewall that fails over to a standby MAC in the recipe scenario
ADDED_SITE = 4  # the firewall (and client network) added while the recipe is configured
SERVICE_CONNECTIONS = 20  # connections to the service per client and address family
DRAIN_SITE = 2  # the client that keeps a connection open to the service across the drain


@dataclass
class Phase:
    key: str  # off | recipe | recipe-changed | on
    title: str  # column title
    check: CheckResult
    drops: dict[str, dict[str, int]]  # firewall -> counter -> packets during this phase
    problems: list[str] = field(default_factory=list)
    capture: PhaseCapture | None = None  # with --capture: the uplink's capture and its report


@dataclass
class PhaseCapture:
    """The host uplink's capture during a phase and what `lasthop pcap` says of it."""

    path: Path
    summary: dict[str, int]  # lasthop.capture.Report.summary()
    pairs: dict[tuple[str, str], int]  # (request came from, reply went to) -> connections


@dataclass(frozen=True)
class ServedConn:
    """One HTTP connection to the service address, and where it went."""

    client: str
    firewall: str  # the client's own firewall
    family: int
    sport: int
    vm: str | None  # the VM that answered (the HTTP body names it); None: no answer
    predicted: str = ""  # the VM the Maglev table gives it ("": not predicted)
    entry_vm: str = ""  # lasthop show: the VM of its entry
    last_hop: str = ""  # lasthop show: the firewall of its entry's last-hop MAC


@dataclass
class DrainRun:
    """A VM drained while a client holds a connection to it (TCP echo)."""

    vm: str  # the drained VM: the one the open connection was given
    client: str
    kept: bool  # the open connection still echoed after the drain
    conns: list[ServedConn] = field(default_factory=list)  # new connections after the drain


@dataclass
class ServiceRun:
    address: P.Addr
    ports: tuple[int, ...]
    vms: list[str]
    off: list[Attempt] = field(default_factory=list)  # without lasthop
    conns: list[ServedConn] = field(default_factory=list)  # with lasthop
    drops: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # column -> drops
    drain: DrainRun | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class ModeRun:
    mode: str
    phases: list[Phase] = field(default_factory=list)
    show_rows: list[dict[str, Any]] = field(default_factory=list)
    service: ServiceRun | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # beyond the phases' own
    seconds: float = 0.0
    sketch: ways.Sketch | None = None  # with draw=True: the lab and the sampled ways
    capture_dir: Path | None = None  # --capture: each phase's uplink capture goes here

    @property
    def all_problems(self) -> list[str]:
        return [
            *(p for ph in self.phases for p in ph.problems),
            *(self.service.problems if self.service else []),
            *self.problems,
        ]

    @property
    def ok(self) -> bool:
        return not self.all_problems


def _fam(family: int) -> str:
    return f"IPv{family}"


def expect_asymmetric(check: CheckResult, label: str, symmetric: str = "cl1") -> list[str]:
    """Without lasthop: every path from the symmetric client works, every other one dies."""
    problems = []
    for (client, _fw, proto, family), (tried, ok) in check.grouped().items():
        if client == symmetric and ok != tried:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected all"
            )
        if client != symmetric and ok:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected none"
            )
    return problems


def expect_all_ok(check: CheckResult, label: str) -> list[str]:
    return [
        f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected all"
        for (client, _fw, proto, family), (tried, ok) in check.grouped().items()
        if ok != tried
    ]


def expect_dead_only(check: CheckResult, label: str, dead: set[str]) -> list[str]:
    """Paths from the clients in *dead* die; every other path works."""
    problems = []
    for (client, _fw, proto, family), (tried, ok) in check.grouped().items():
        if client in dead and ok:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected none"
            )
        if client not in dead and ok != tried:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected all"
            )
    return problems


def expect_unserved(attempts: list[Attempt], label: str, served: set[str]) -> list[str]:
    """Without lasthop: the clients in *served* reach the address, every other one does not."""
    problems = []
    for client in sorted({a.client for a in attempts}):
        mine = [a for a in attempts if a.client == client]
        ok = sum(a.ok for a in mine)
        want = len(mine) if client in served else 0
        if ok != want:
            expected = "all" if want else "none"
            problems.append(f"{label}: {client}: {ok}/{len(mine)} worked, expected {expected}")
    return problems


def expect_served(conns: list[ServedConn], vms: list[str], label: str) -> list[str]:
    """With lasthop: every connection answered, by the VM the table names, its
    entry naming that VM and its client's firewall; every VM serves."""
    problems = []
    for c in conns:
        what = f"{label}: {c.client} IPv{c.family} port {c.sport}"
        if c.vm is None:
            problems.append(f"{what}: no answer")
        elif c.vm != c.predicted:
            problems.append(f"{what}: answered by {c.vm}, the Maglev table says {c.predicted}")
        elif c.entry_vm != c.vm:
            problems.append(f"{what}: answered by {c.vm}, its entry says {c.entry_vm or '-'}")
        if c.vm is not None and c.last_hop != c.firewall:
            problems.append(f"{what}: last hop {c.last_hop or '-'}, expected {c.firewall}")
    idle = [vm for vm in vms if not any(c.vm == vm for c in conns)]
    if idle and conns:
        problems.append(f"{label}: {', '.join(idle)} served no connection")
    return problems


def expect_drained(drain: DrainRun, label: str) -> list[str]:
    """After the drain: every new connection answered, none by the drained
    VM; the connection open before it still works."""
    problems = []
    if not drain.kept:
        problems.append(f"{label}: {drain.client}'s open connection to {drain.vm} stopped")
    failed = sum(c.vm is None for c in drain.conns)
    if failed:
        problems.append(f"{label}: {failed}/{len(drain.conns)} new connections not answered")
    landed = sum(c.vm == drain.vm for c in drain.conns)
    if landed:
        problems.append(f"{label}: {landed} new connections reached the drained {drain.vm}")
    return problems


def counter_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    return {
        fw: {k: v - before.get(fw, {}).get(k, 0) for k, v in c.items()} for fw, c in after.items()
    }


def _phase(lab: Lab, run: ModeRun, key: str, title: str, n: int) -> Phase:
    before = lab.counters()
    path = run.capture_dir / f"{run.mode}-{key}.pcap" if run.capture_dir else None
    with capture.capturing(lab.plan, path) if path else contextlib.nullcontext():
        result = traffic.check(lab.plan, n=n)
    phase = Phase(key, title, result, counter_delta(before, lab.counters()))
    if path:
        phase.capture = _report(path, capture.names(lab.plan))
    return phase


def _report(path: Path, names: dict[str, str]) -> PhaseCapture:
    from lasthop.capture import analyse

    report = analyse([path])
    pairs = {
        (names.get(came.mac, came.mac), names.get(went.mac, went.mac)): n
        for (came, went), n in report.pairs().items()
    }
    return PhaseCapture(path, report.summary(), pairs)


def expect_capture(phase: Phase, symmetric: bool) -> list[str]:
    """The capture's report agrees with the phase: no reply by another way
    (with lasthop), or some (without it)."""
    if phase.capture is None:
        return []
    s = phase.capture.summary
    if symmetric and s["return_asymmetric"]:
        return [f"{phase.title}: the capture shows {s['return_asymmetric']} replies by another way"]
    if not symmetric and not s["return_asymmetric"]:
        return [f"{phase.title}: the capture shows no reply by another way"]
    return []


def sample_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A few table rows to show: one per client address (IPv4 and IPv6), TCP if it has one."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        src = str(row.get("src"))
        if src not in best or (best[src].get("proto") != "tcp" and row.get("proto") == "tcp"):
            best[src] = row
    return [best[src] for src in sorted(best, key=lambda s: (":" in s, s))]


def run_mode(
    name: str,
    routed: bool,
    *,
    with_recipe: bool = False,
    with_service: bool = True,
    n: int = 3,
    service_n: int = SERVICE_CONNECTIONS,
    say: Say = print,
    detail: Say = print,
    draw: bool = False,
    capture_dir: Path | None = None,
    overlay: bool = False,
) -> ModeRun:
    """Runs the demo on one host mode; the lab is removed afterwards, whatever
    happens. With *draw*, run.sketch holds what its drawing shows: the lab as
    built and the ways of one sampled connection per client. With
    *capture_dir*, each phase's traffic is also captured on the host's uplink
    (<mode>-<phase>.pcap, and names.txt for `lasthop pcap`)."""
    start = time.monotonic()
    if overlay:  # VXLAN from each firewall's endpoint: no service, recipe, drawing or capture
        with_recipe = with_service = draw = False
        capture_dir = None
    plan = P.Plan(name, routed=routed, overlay=overlay)
    run = ModeRun(plan.mode, capture_dir=capture_dir)
    say(f"{run.mode} host: building the lab")
    lab = Lab.up(plan, detail)
    if capture_dir:
        capture_dir.mkdir(parents=True, exist_ok=True)
        capture.write_names(lab.plan, capture_dir)
    try:
        if draw:
            topo = discover(lab.plan)
            run.sketch = ways.Sketch(topo, ways.by_routes(lab.plan, topo))
        say(f"{run.mode} host: traffic without lasthop")
        off = _phase(lab, run, "off", "without", n)
        if overlay:  # an external VXLAN device sends nothing without a tunnel key
            everyone = {P.Plan(name).client(n).name for n in lab.plan.sites}
            off.problems = expect_dead_only(off.check, "without lasthop", everyone)
            run.notes.append(
                "overlay: without lasthop no reply crosses the external VXLAN device; with "
                "it each reply leaves with its request's endpoint and VNI (fw1 and fw2 share "
                "one MAC)"
            )
        else:
            off.problems = expect_asymmetric(off.check, "without lasthop") + expect_capture(
                off, False
            )
        run.phases.append(off)
        if run.sketch is not None:
            run.sketch.ways = ways.settle_off(run.sketch.ways, off.check)
            run.sketch.drops = ways.drops_of(lab.plan, off.drops)
        if with_recipe:
            _recipe_phases(lab, run, n, say)
        extra: tuple[str, ...] = ()
        if with_service:
            run.service = _service_off(lab, run.mode, say)
            cfg = services.write_config(state.folder(name) / "lasthop.toml", lab.plan, macs=True)
            extra = ("--config", str(cfg))
        if not runner.available():
            run.notes.append(
                "lasthop agent not built yet (lasthop.controller missing): "
                "the 'with' half did not run"
            )
            run.problems.append("lasthop agent not available")
            return run
        say(f"{run.mode} host: starting lasthop")
        try:
            with runner.AgentRunner(lab.plan, extra=extra):
                say(f"{run.mode} host: traffic with lasthop")
                on = _phase(lab, run, "on", "with lasthop", n)
                on.problems = expect_all_ok(on.check, "with lasthop") + expect_capture(on, True)
                run.phases.append(on)
                rows = runner.show(lab.plan)
                run.show_rows = sample_rows(rows)
                if run.sketch is not None:
                    if with_recipe:  # a fail-over and a new firewall since: read it again
                        run.sketch.topology = discover(lab.plan)
                    topo = run.sketch.topology
                    run.sketch.ways += ways.with_lasthop(lab.plan, topo, rows, on.check)
                if run.service is not None:
                    _service_on(lab, run.service, run.mode, service_n, say)
                    if run.sketch is not None:
                        _sketch_service(run.sketch, run.service)
        except LabError as err:
            run.problems.append(f"lasthop: {err}")
        return run
    finally:
        say(f"{run.mode} host: removing the lab")
        lab.down(detail)
        run.seconds = time.monotonic() - start


def _sketch_service(sketch: ways.Sketch, svc: ServiceRun) -> None:
    """The service on the drawing: per VM, the connections of each client it
    answered; a caption line with the totals with and without lasthop."""
    for c in svc.conns:
        if c.vm is not None:
            per_client = sketch.service.setdefault(c.vm, {})
            per_client[c.client] = per_client.get(c.client, 0) + 1
    answered = [c for c in svc.conns if c.vm is not None]
    own = sum(c.last_hop == c.firewall for c in answered)
    sketch.caption.append(
        f"service {svc.address.v4}, {svc.address.v6}: without lasthop "
        f"{sum(a.ok for a in svc.off)}/{len(svc.off)} answered; with lasthop "
        f"{len(answered)}/{len(svc.conns)}, {own} of them back through their client's own firewall"
    )


def _service_off(lab: Lab, mode: str, say: Say) -> ServiceRun:
    """Sets the service address up on every VM and firewall; tries it without lasthop."""
    plan = lab.plan
    vip = services.VIP
    svc = ServiceRun(vip, services.PORTS, [plan.vm(n).name for n in plan.vms])
    say(f"{mode} host: service {vip.v4} and {vip.v6} on every VM; without lasthop")
    services.serve_vip(lab)
    before = lab.counters()
    svc.off = traffic.connect(plan, vip, n=1)
    svc.drops["service without"] = counter_delta(before, lab.counters())
    # A bridged host: the firewalls send the address to vm1's own address,
    # and vm1 answers cl1 by fw1; a routed host has no one to answer it.
    symmetric = set() if plan.routed else {plan.client(plan.sites[0]).name}
    svc.problems += expect_unserved(svc.off, "service without lasthop", symmetric)
    return svc


def _service_on(lab: Lab, svc: ServiceRun, mode: str, n: int, say: Say) -> None:
    """With lasthop: n connections per client and family to the address, each
    checked against the Maglev table and lasthop's table; then a drain. The
    firewalls' drops are counted over both."""
    plan = lab.plan
    if not eventually(lambda: services.serving(plan)):
        states = {name: services.vm_states(plan, name) for name in services.SERVICES.values()}
        svc.problems.append(f"service: not every VM serving: {states}")
        return
    say(f"{mode} host: service with lasthop: {n} connections per client and family")
    predict = services.Prediction(lab)
    before = lab.counters()
    try:
        attempts = traffic.connect(plan, svc.address, n=n)
        svc.conns = _served(plan, attempts, runner.show(plan), predict)
        svc.problems += expect_served(svc.conns, svc.vms, "service with lasthop")
        _service_drain(lab, svc, mode, n, say)
    finally:
        svc.drops["service with lasthop"] = counter_delta(before, lab.counters())


def _service_drain(lab: Lab, svc: ServiceRun, mode: str, n: int, say: Say) -> None:
    """A client holds a connection to the service; its VM is drained; n new
    connections per client and family avoid it, the open one still works."""
    plan = lab.plan
    client = plan.client(DRAIN_SITE if DRAIN_SITE in plan.sites else plan.sites[0])
    label = "service drain"
    try:
        session = traffic.EchoSession(plan, client.n, address=svc.address)
    except OSError as err:
        svc.problems.append(f"{label}: {client.name} could not connect to {svc.address.v4}: {err}")
        return
    with session:
        mine = (client.addr.v4, session.local_port, svc.address.v4, P.ECHO_PORT)
        rows = [
            r
            for r in runner.show(plan)
            if (r.get("src"), r.get("sport"), r.get("dst"), r.get("dport")) == mine
        ]
        port = str(rows[0].get("vm_port") or "") if rows else ""
        if not port or not session.exchange():
            svc.problems.append(
                f"{label}: {client.name}'s connection does not work, or no VM has it"
            )
            return
        vm = _vm_name(plan, port)
        say(f"{mode} host: service: drain {vm} ({client.name} holds a connection to it)")
        services.drain(plan, port)
        svc.drain = DrainRun(vm, client.name, kept=False)
        svc.drain.conns = _served(plan, traffic.connect(plan, svc.address, n=n), [], None)
        svc.drain.kept = session.exchange()
    svc.problems += expect_drained(svc.drain, label)


def _vm_name(plan: P.Plan, port: str) -> str:
    return next((plan.vm(n).name for n in plan.vms if plan.vm(n).port == port), port)


def _served(
    plan: P.Plan,
    attempts: list[Attempt],
    rows: list[dict[str, Any]],
    predict: services.Prediction | None,
) -> list[ServedConn]:
    """Each attempt with the VM the table predicts and lasthop's entry for it."""
    entries = {(r.get("src"), r.get("sport"), r.get("dst"), r.get("dport")): r for r in rows}
    out = []
    for a in attempts:
        entry = entries.get((a.src, a.sport, a.dst, a.dport), {})
        out.append(
            ServedConn(
                a.client,
                a.firewall,
                a.family,
                a.sport,
                a.body if a.ok else None,
                _vm_name(plan, predict.vm(a.family, a.src, a.sport, a.dport)) if predict else "",
                _vm_name(plan, str(entry.get("vm_port") or "")),
                P.firewall_of(str(entry.get("mac") or "")),
            )
        )
    return out


def _recipe_phases(lab: Lab, run: ModeRun, n: int, say: Say) -> None:
    try:
        recipe.configure(lab)
    except recipe.RecipeError as err:
        run.notes.append(f"Linux recipe: {err}")
        return
    say(f"{run.mode} host: traffic with the Linux recipe (ct mark by firewall MAC + ip rule)")
    known = _phase(lab, run, "recipe", "recipe", n)
    known.problems = expect_all_ok(known.check, "recipe, known MACs")
    run.phases.append(known)
    fw = lab.plan.firewall(FAILOVER_SITE)
    say(
        f"{run.mode} host: {fw.name} fails over to MAC {fw.failover_mac}; "
        f"fw{ADDED_SITE} (cl{ADDED_SITE}) is added"
    )
    lab.failover(FAILOVER_SITE)
    lab.add_site(ADDED_SITE)
    changed = _phase(lab, run, "recipe-changed", "recipe after changes", n)
    changed.problems = expect_dead_only(
        changed.check, "recipe after changes", {f"cl{FAILOVER_SITE}", f"cl{ADDED_SITE}"}
    )
    run.phases.append(changed)
    run.notes.append(
        f"Linux recipe: knows fw1-fw3 by MAC; after {fw.name}'s fail-over to {fw.failover_mac} and "
        f"the new fw{ADDED_SITE}, their connections get no mark and die at fw1"
    )
    recipe.remove(lab)

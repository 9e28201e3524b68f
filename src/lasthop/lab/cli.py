"""`lasthop lab`: build, inspect and remove the lab, and run the demo.

Exit codes: 0 success (demo: every expectation held); 1 the demo ran but an
expectation failed; 2 usage (click's own); 3 the lab could not be built or
run (not root, a command failed, the lasthop agent is missing).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lasthop.endpoint import format_endpoint
from lasthop.lab import capture, demo, firewall, recipe, runner, traffic, ways
from lasthop.lab import plan as P
from lasthop.lab.discover import discover
from lasthop.lab.namespaces import LabError
from lasthop.lab.topology import Lab, lab_namespaces
from lasthop.lab.topology import down as lab_down

if TYPE_CHECKING:
    from lasthop.lab import ha

__all__ = ["lab", "EXIT_OK", "EXIT_EXPECTATION", "EXIT_USAGE", "EXIT_LAB"]

EXIT_OK, EXIT_EXPECTATION, EXIT_USAGE, EXIT_LAB = 0, 1, 2, 3
console = Console(width=None if sys.stdout.isatty() else 120, emoji=False)
err_console = Console(stderr=True, emoji=False)

name_option = click.option(
    "--name",
    default=P.DEFAULT_NAME,
    show_default=True,
    help="Lab name: the prefix of every namespace (<name>-fw1, ...).",
)


def _require_root() -> None:
    if os.geteuid() != 0:
        err_console.print(
            "[red]error:[/red] the lab needs root (network namespaces, nftables, BPF)"
        )
        sys.exit(EXIT_LAB)


@contextmanager
def _lab_errors() -> Iterator[None]:
    try:
        yield
    except (LabError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(EXIT_LAB)


class _Steps:
    """Progress: a spinner for details, a printed line (with elapsed time) per step."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.status = console.status("starting")

    def say(self, msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - self.start:5.1f}s[/dim] {msg}", highlight=False)
        self.status.update(msg)

    def detail(self, msg: str) -> None:
        self.status.update(msg)

    def __enter__(self) -> _Steps:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.__exit__(None, None, None)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.group()
def lab() -> None:
    """The lab: clients behind stateful firewalls, a host with VMs, in network namespaces."""


@lab.command()
@name_option
@click.option(
    "--routed", is_flag=True, help="Routed host (VMs on their own subnet) instead of bridged."
)
@click.option(
    "--recipe",
    "with_recipe",
    is_flag=True,
    help="Configure the Linux recipe (ct mark by firewall MAC + ip rule) on the routed host.",
)
def up(name: str, routed: bool, with_recipe: bool) -> None:
    """Build the lab (replacing a lab of the same name)."""
    _require_root()
    if with_recipe and not routed:
        raise click.UsageError(
            "--recipe needs --routed: on a bridged host the VMs' replies are not routed"
        )
    with _lab_errors(), _Steps() as steps:
        the_lab = Lab.up(P.Plan(name, routed=routed), steps.detail)
        if with_recipe:
            recipe.configure(the_lab)
    _print_lab(the_lab)


@lab.command()
@name_option
def down(name: str) -> None:
    """Remove the lab: processes, lasthop pins, namespaces (also after a crash)."""
    _require_root()
    with _lab_errors():
        removed = lab_down(name)
    console.print(
        f"removed {len(removed)} namespaces of lab {name}" if removed else f"no lab {name}"
    )


@lab.command()
@name_option
@click.option(
    "--check",
    "run_check",
    is_flag=True,
    help="Also run the traffic check (one connection per path).",
)
def status(name: str, run_check: bool) -> None:
    """What the lab has: namespaces, addresses, servers, firewall drop counters."""
    _require_root()
    the_lab = Lab.find(name)
    if the_lab is None:
        leftovers = lab_namespaces(name)
        console.print(
            f"no lab {name}"
            + (f" (leftover namespaces: {', '.join(leftovers)}; run down)" if leftovers else "")
        )
        sys.exit(EXIT_LAB)
    with _lab_errors():
        _print_lab(the_lab)
        _print_counters({"now": the_lab.counters()}, "firewall drops since up")
        pins = the_lab.lasthop_pins
        console.print(
            f"lasthop: attached (table pinned at {pins})" if pins else "lasthop: not attached"
        )
        if run_check:
            result = traffic.check(the_lab.plan, n=1)
            _print_paths([("now", result)], f"traffic check ({result.elapsed_s:.1f} s)")


@lab.command("demo")
@name_option
@click.option(
    "--recipe",
    "with_recipe",
    is_flag=True,
    help="On the routed host also show the Linux recipe, and where it stops working.",
)
@click.option(
    "--mode",
    type=click.Choice(["both", "bridged", "routed", "overlay", "all"]),
    default="both",
    show_default=True,
    help="both = bridged and routed; overlay: the firewalls reach the host through VXLAN "
    "(two share one MAC); all = the three.",
)
@click.option(
    "-n",
    "--connections",
    default=3,
    show_default=True,
    help="Connections per (client, VM, protocol, family).",
)
@click.option(
    "--service-connections",
    default=demo.SERVICE_CONNECTIONS,
    show_default=True,
    type=click.IntRange(1, 200),
    help="Connections to the service per (client, family), before and after the drain.",
)
@click.option("--no-service", is_flag=True, help="Leave out the service section.")
@click.option(
    "--draw",
    "draw_to",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also draw each host mode's lab and sampled connections: FILE.png or FILE.svg "
    "(both modes: FILE-bridged.svg and FILE-routed.svg).",
)
@click.option(
    "--capture", "capture_dir", type=click.Path(path_type=Path, file_okay=False),
    help="Capture the host's uplink in each phase into DIR (for `lasthop pcap`).",
)  # fmt: skip
def demo_cmd(
    name: str,
    with_recipe: bool,
    mode: str,
    connections: int,
    service_connections: int,
    no_service: bool,
    draw_to: Path | None,
    capture_dir: Path | None,
) -> None:
    """Build the lab, show replies dying without lasthop and arriving with it,
    spread a service over the VMs, clean up."""
    modes = {"both": [False, True], "bridged": [False], "routed": [True], "overlay": [],
             "all": [False, True]}[mode]  # fmt: skip
    overlay = mode in ("overlay", "all")
    drawings = _drawing_files(draw_to, modes) if draw_to and modes else {}
    _require_root()
    runs: list[demo.ModeRun] = []
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        with _Steps() as steps:
            for routed in modes:
                runs.append(
                    demo.run_mode(
                        name,
                        routed,
                        with_recipe=with_recipe,
                        with_service=not no_service,
                        n=connections,
                        service_n=service_connections,
                        say=steps.say,
                        detail=steps.detail,
                        draw=bool(drawings),
                        capture_dir=capture_dir,
                    )
                )
            if overlay:
                runs.append(
                    demo.run_mode(
                        name,
                        False,
                        overlay=True,
                        n=connections,
                        say=steps.say,
                        detail=steps.detail,
                    )
                )
    except KeyboardInterrupt:
        lab_down(name)
        err_console.print("interrupted: lab removed")
        sys.exit(130)
    except LabError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        lab_down(name)
        sys.exit(EXIT_LAB)
    for run in runs:
        _print_run(run)
    for run in runs:
        if run.sketch is not None:
            path = drawings[run.mode == "routed"]  # no sketch for the overlay run
            _draw(run.sketch, path, f"lasthop lab demo: {run.mode} host")
            console.print(f"drawing of the {run.mode} host: {path}", highlight=False)
    problems = [f"{run.mode}: {p}" for run in runs for p in run.all_problems]
    elapsed = time.monotonic() - started
    if not problems:
        recipe_line = (
            "; the Linux recipe worked for the MACs it knew and broke for the others"
            if any(ph.key == "recipe" for run in runs for ph in run.phases)
            else ""
        )
        service_line = (
            "; the service: each connection on the VM Maglev chose, back through its own "
            "firewall, and a drained VM got no new one but kept its open one"
            if any(run.service and run.service.conns for run in runs)
            else ""
        )
        died = (
            "every path through fw2 and fw3 died"
            if modes
            else "no reply crossed the overlay (fw1 and fw2 share one MAC)"
        )
        if modes and overlay:
            died += "; in the overlay no reply crossed at all"
        console.print(
            f"[green bold]demo passed[/green bold] in {elapsed:.1f} s: every connection worked "
            f"with lasthop; without it, {died}{recipe_line}{service_line}",
            highlight=False,
        )
        sys.exit(EXIT_OK)
    console.print(f"[red bold]demo failed[/red bold] in {elapsed:.1f} s:", highlight=False)
    for p in problems[:20]:
        console.print(f"  - {p}", highlight=False)
    if len(problems) > 20:
        console.print(f"  ... and {len(problems) - 20} more")
    sys.exit(EXIT_EXPECTATION if runner.available() else EXIT_LAB)


@lab.command("draw")
@name_option
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The drawing: FILE.png or FILE.svg.",
)
@click.option(
    "--check",
    "run_check",
    is_flag=True,
    help="Also try one connection per client now and draw its way (and where it dies).",
)
def draw_cmd(name: str, out: Path, run_check: bool) -> None:
    """Draw the running lab as it is: namespaces, interfaces, addresses, links."""
    _drawing_files(out, [False])
    _require_root()
    the_lab = Lab.find(name)
    if the_lab is None:
        err_console.print(f"[red]error:[/red] no lab {name}", highlight=False)
        sys.exit(EXIT_LAB)
    with _lab_errors():
        plan = the_lab.plan
        sketch = ways.Sketch(discover(plan))
        if run_check:
            before = the_lab.counters()
            result = traffic.check(plan, n=1)
            if the_lab.lasthop_pins:
                requests = [w for w in ways.by_routes(plan, sketch.topology) if w.kind == "request"]
                sketch.ways = ways.settle_off(requests, result) + ways.with_lasthop(
                    plan, sketch.topology, runner.show(plan), result
                )
            else:
                sketch.ways = ways.settle_off(ways.by_routes(plan, sketch.topology), result)
            sketch.drops = ways.drops_of(plan, demo.counter_delta(before, the_lab.counters()))
        _draw(sketch, out, f"lab {name}: {plan.mode} host")
    console.print(f"drew lab {name} to {out}", highlight=False)


def _drawing_files(path: Path, modes: list[bool]) -> dict[bool, Path]:
    """Where each host mode's drawing goes (routed -> path); a bad suffix is a usage error."""
    from lasthop.lab.drawing import DrawingError, check_format

    try:
        check_format(path)
    except DrawingError as err:
        raise click.BadParameter(str(err), param_hint="--draw/--out") from err
    if len(modes) == 1:
        return {modes[0]: path}
    return {
        routed: path.with_name(f"{path.stem}-{'routed' if routed else 'bridged'}{path.suffix}")
        for routed in modes
    }


def _draw(sketch: ways.Sketch, path: Path, title: str) -> None:
    from lasthop.lab.drawing import DrawingError, render

    try:
        render(sketch, path, title)
    except DrawingError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(EXIT_LAB)


@lab.command("ha")
@name_option
@click.option(
    "--planned",
    is_flag=True,
    help="A planned switch-over (keepalived on A stops) instead of killing host A.",
)
@click.option(
    "-n",
    "--connections",
    default=3,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Connections held per (client, protocol).",
)
def ha_cmd(name: str, planned: bool, connections: int) -> None:
    """Build the HA lab (an active/standby pair with keepalived and --sync),
    hold server-first connections through A, kill A (or switch over), and
    show every server speaking first through B; clean up."""
    from lasthop.lab import ha

    _require_root()
    if not runner.available():
        err_console.print("[red]error:[/red] the lasthop agent is not built (scripts/setup)")
        sys.exit(EXIT_LAB)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    the_lab: ha.HaLab | None = None
    try:
        with _Steps() as steps:
            steps.say("building the HA lab: hosts A and B, keepalived, Redis, lasthop --sync")
            the_lab = ha.HaLab.start(name, progress=steps.detail)
            result = ha.takeover(the_lab, planned=planned, per_path=connections, say=steps.say)
    except KeyboardInterrupt:
        err_console.print("interrupted: lab removed")
        sys.exit(130)
    except LabError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(EXIT_LAB)
    finally:
        if the_lab is not None:
            the_lab.stop()
        lab_down(name)
    _print_takeover(result)
    elapsed = time.monotonic() - started
    what = "planned switch-over" if planned else "crash of host A"
    if result.lost == 0 and not any(result.drops.values()):
        console.print(
            f"[green bold]takeover passed[/green bold] in {elapsed:.1f} s: {what}, B master "
            f"after {result.takeover_s:.1f} s, 0 connections lost, server-first included",
            highlight=False,
        )
        sys.exit(EXIT_OK)
    console.print(
        f"[red bold]takeover failed[/red bold]: {what}, {result.lost} connections lost, "
        f"firewall drops {result.drops}",
        highlight=False,
    )
    sys.exit(EXIT_EXPECTATION)


# -- rendering -------------------------------------------------------------------


def _ratio(tried: int, ok: int, expect_ok: bool | None) -> str:
    colour = "green" if ok == tried else ("red" if ok == 0 else "yellow")
    mark = ""
    if expect_ok is not None and (ok == tried) != expect_ok:
        mark = " !"
    return f"[{colour}]{ok}/{tried}[/{colour}]{mark}"


def _print_paths(columns: list[tuple[str, traffic.CheckResult]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("client", "firewall", "protocol", "family"):
        table.add_column(col)
    for heading, _ in columns:
        table.add_column(heading, justify="right")
    grouped = [res.grouped() for _, res in columns]
    keys: list[tuple[str, str, str, int]] = []
    for g in grouped:
        keys += [k for k in g if k not in keys]
    keys.sort(key=lambda k: (k[0], traffic.PROTOS.index(k[2]), k[3]))
    for key in keys:
        cells = []
        for g in grouped:
            cells.append(_ratio(*g[key], None) if key in g else "[dim]-[/dim]")
        table.add_row(key[0], key[1], key[2], f"IPv{key[3]}", *cells)
    console.print(table)


def _print_run(run: demo.ModeRun) -> None:
    console.rule(f"[bold]{run.mode} host[/bold] ({run.seconds:.1f} s)")
    columns = [(ph.title, ph.check) for ph in run.phases]
    if columns:
        _print_paths(columns, "connections that worked, per path (summed over the VMs)")
    if run.show_rows:
        _print_show(run.show_rows)
    if run.phases:
        drops = {ph.title: ph.drops for ph in run.phases}
        _print_counters(
            drops | (run.service.drops if run.service else {}), "firewall drops, per phase"
        )
    if run.service:
        _print_service(run.service)
    _print_captures(run)
    for note in run.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def _print_captures(run: demo.ModeRun) -> None:
    """What `lasthop pcap` says of each phase's capture of the host's uplink."""
    for ph in run.phases:
        if ph.capture is None:
            continue
        s, path = ph.capture.summary, ph.capture.path
        pairs = ", ".join(
            f"{came} -> {went}: {n}" for (came, went), n in sorted(ph.capture.pairs.items())
        )
        console.print(
            f"capture {ph.title}: {s['answered']} answered connections, "
            f"{s['return_asymmetric']} replied by another way" + (f" ({pairs})" if pairs else ""),
            highlight=False,
        )
        console.print(
            f"  lasthop pcap {path} --names {path.parent / capture.NAMES_FILE}", highlight=False
        )


def _count(ok: int, tried: int) -> str:
    colour = "green" if ok == tried else "red"
    return f"[{colour}]{ok}/{tried}[/{colour}]"


def _print_service(svc: demo.ServiceRun) -> None:
    """Per VM: the connections it served (from each client, per family), its
    share, how many the Maglev table predicted and came back through their
    client's own firewall; then the service without lasthop and the drain."""
    ports = "/".join(map(str, svc.ports))
    conns = svc.conns
    if conns:
        table = Table(
            title=f"service {svc.address.v4}, {svc.address.v6} (TCP {ports}) with lasthop: "
            "HTTP connections each VM served",
            title_justify="left",
        )
        clients = sorted({(c.client, c.firewall) for c in conns})
        table.add_column("VM")
        for client, fw in clients:
            table.add_column(f"{client} via {fw}", justify="right")
        for col in ("IPv4", "IPv6", "served", "share", "as Maglev said", "via own firewall"):
            table.add_column(col, justify="right")
        answered = [c for c in conns if c.vm is not None]
        for vm in svc.vms:
            mine = [c for c in answered if c.vm == vm]
            table.add_row(
                vm,
                *(str(sum(c.client == cl for c in mine)) for cl, _ in clients),
                *(str(sum(c.family == f for c in mine)) for f in traffic.FAMILIES),
                str(len(mine)),
                f"{len(mine) / len(conns):.0%}",
                _count(sum(c.predicted == vm for c in mine), len(mine)),
                _count(sum(c.last_hop == c.firewall for c in mine), len(mine)),
            )
        table.add_section()
        table.add_row(
            "all",
            *(
                _count(sum(c.client == cl for c in answered), sum(c.client == cl for c in conns))
                for cl, _ in clients
            ),
            *(
                _count(sum(c.family == f for c in answered), sum(c.family == f for c in conns))
                for f in traffic.FAMILIES
            ),
            _count(len(answered), len(conns)),
            f"{len(answered) / len(conns):.0%}",
            _count(sum(c.predicted == c.vm for c in answered), len(conns)),
            _count(sum(c.last_hop == c.firewall for c in answered), len(conns)),
        )
        console.print(table)
    if svc.off:
        by_client = ", ".join(
            f"{cl} {sum(a.ok for a in svc.off if a.client == cl)}/"
            f"{sum(a.client == cl for a in svc.off)}"
            for cl in sorted({a.client for a in svc.off})
        )
        ok = sum(a.ok for a in svc.off)
        console.print(
            f"service without lasthop: {ok}/{len(svc.off)} connections answered ({by_client})",
            highlight=False,
        )
    if svc.drain:
        d = svc.drain
        new = [c for c in d.conns if c.vm is not None]
        spread = ", ".join(f"{vm} {sum(c.vm == vm for c in new)}" for vm in svc.vms if vm != d.vm)
        landed = sum(c.vm == d.vm for c in new)
        kept = "[green]still echoes[/green]" if d.kept else "[red]stopped[/red]"
        console.print(
            f"drain {d.vm}: {_count(len(new), len(d.conns))} new connections answered, "
            f"{'[green]none[/green]' if not landed else f'[red]{landed}[/red]'} by {d.vm} "
            f"({spread}); {d.client}'s open connection to {d.vm} {kept}",
            highlight=False,
        )


def _print_show(rows: list[dict[str, Any]]) -> None:
    table = Table(title="lasthop show: where each connection's replies go", title_justify="left")
    tunnels = any(r.get("endpoint") for r in rows)  # the overlay lab: endpoint, VNI
    cols = ["proto", "client", "server", "last-hop MAC", "firewall", "uplink", "packets"]
    for col in cols + (["endpoint", "vni"] if tunnels else []):
        table.add_column(col, justify="right" if col in ("packets", "vni") else "left")
    for r in rows:
        mac = str(r.get("mac", ""))
        cells = [
            str(r.get("proto")),
            escape(format_endpoint(r.get("src"), r.get("sport"))),
            escape(format_endpoint(r.get("dst"), r.get("dport"))),
            mac,
            P.who_has(mac),
            str(r.get("uplink", "")),
            str(r.get("packets", "")),
        ]
        if tunnels:
            cells += [str(r.get("endpoint") or "-"), str(r.get("vni") or "-")]
        table.add_row(*cells)
    console.print(table)


def _print_counters(phases: dict[str, dict[str, dict[str, int]]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("firewall")
    table.add_column("counter")
    for heading in phases:
        table.add_column(heading, justify="right")
    firewalls = sorted({fw for c in phases.values() for fw in c})
    for fw in firewalls:
        for counter in firewall.DROP_COUNTERS:
            values = [c.get(fw, {}).get(counter) for c in phases.values()]
            if not any(values):
                continue
            table.add_row(
                fw,
                counter,
                *(f"[red]{v}[/red]" if v else ("-" if v is None else "0") for v in values),
            )
    if not table.row_count:
        table.add_row("all", "drops", *("0" for _ in phases))
    console.print(table)


def _print_takeover(result: ha.TakeoverRun) -> None:
    table = Table(
        title=("planned switch-over" if result.planned else "host A killed")
        + f": B master after {result.takeover_s:.1f} s",
        title_justify="left",
    )
    for col in (
        "client",
        "proto",
        "IP",
        "held via A",
        "on B, own fw",
        "server first",
        "then client",
    ):
        table.add_column(col, justify="right")
    for (client, proto, family), row in sorted(result.rows.items()):
        table.add_row(
            f"cl{client}",
            proto,
            f"v{family}",
            str(row.held),
            _count(row.on_standby, row.held),
            _count(row.pushed, row.held),
            _count(row.echoed, row.held),
        )
    console.print(table)
    drops = ", ".join(f"{fw} {n}" for fw, n in sorted(result.drops.items()))
    console.print(f"firewall drops during and after the takeover: {drops}", highlight=False)


def _print_lab(the_lab: Lab) -> None:
    plan = the_lab.plan
    st = the_lab.state
    alive = the_lab.servers_alive()
    table = Table(
        title=f"lab {plan.name}: {plan.mode} host" + (", Linux recipe on" if st.recipe else ""),
        title_justify="left",
    )
    for col in ("namespace", "role", "interface", "MAC", "IPv4", "IPv6", "gateway / note"):
        table.add_column(col)
    for n in st.sites:
        cl, fw = plan.client(n), plan.firewall(n)
        table.add_row(
            cl.ns, "client", P.ETH, cl.mac, cl.addr.cidr4, cl.addr.cidr6, f"via {fw.name}"
        )
        table.add_row(fw.ns, "firewall", P.FW_LAN, fw.lan_mac, fw.lan.cidr4, fw.lan.cidr6, "")
        table.add_row(
            "", "", P.FW_TRANSIT, fw.transit_mac, fw.transit.cidr4, fw.transit.cidr6, "transit"
        )
    host = plan.host
    table.add_row(
        host.ns,
        "host",
        host.uplink,
        host.uplink_mac,
        host.uplink_addr.cidr4 if host.uplink_addr else "-",
        host.uplink_addr.cidr6 if host.uplink_addr else "-",
        "default via fw1" if plan.routed else f"port of {host.bridge}",
    )
    table.add_row(
        "",
        "",
        host.bridge,
        host.bridge_mac,
        host.vm_gateway.cidr4 if host.vm_gateway else "-",
        host.vm_gateway.cidr6 if host.vm_gateway else "-",
        "VM ports" if plan.routed else "uplink + VM ports",
    )
    for n in st.vms:
        vm = plan.vm(n)
        table.add_row(
            vm.ns,
            "VM",
            P.ETH,
            vm.mac,
            vm.addr.cidr4,
            vm.addr.cidr6,
            f"via {'host' if plan.routed else 'fw1'}; servers "
            + ("[green]up[/green]" if alive.get(vm.name) else "[red]down[/red]")
            + f"; host port {vm.port}",
        )
    table.add_row(
        plan.switch_ns, "switch", P.SWITCH_BRIDGE, "", "", "", "transit L2: fwN tr0 + host uplink"
    )
    console.print(table)


if __name__ == "__main__":
    lab()

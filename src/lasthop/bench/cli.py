"""`lasthop bench ...`: every benchmark command (datapath, lab, services,
table), declared here as one click group the main CLI adds. The benches
themselves live in lasthop.bench.datapath, .lab, .services and .table."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import click
from rich.console import Console

from lasthop.bench import datapath as dp_bench
from lasthop.bench import lab as lab_bench
from lasthop.bench import services as svc_bench
from lasthop.bench import startup as startup_bench
from lasthop.bench import table as table_bench
from lasthop.bench.signals import stop_signals_interrupt
from lasthop.errors import DatapathError
from lasthop.lab.namespaces import LabError
from lasthop.libbpf import BpfError

__all__ = ["bench"]

# Every bench: 0 it ran; 1 a check failed or, with --strict, a target was missed;
# 3 it could not run.
EXIT_OK, EXIT_TARGET_MISSED, EXIT_CANNOT_RUN = 0, 1, 3

F = TypeVar("F", bound=Callable[..., Any])

# -- what the datapath and services benches share ---------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
strict_option = click.option(
    "--strict", is_flag=True, help="Exit 1 when a figure misses its target."
)
rounds_option = click.option(
    "--rounds",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Rounds (the median is reported).",
)


def repeat_option(default: int) -> Callable[[F], F]:
    return click.option(
        "--repeat",
        type=click.IntRange(1000),
        default=default,
        show_default=True,
        help="Back-to-back runs of each program per round.",
    )


class Figures(Protocol):
    """The results of the datapath and the services benches."""

    @property
    def ok(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Figures)


def _figures(
    run: Callable[[Callable[[str], None]], R],
    error: type[Exception] | tuple[type[Exception], ...],
    print_results: Callable[[R, Console], None],
    *,
    as_json: bool,
    strict: bool,
) -> NoReturn:
    """Runs a bench under a progress line, prints its figures (or their JSON)
    and exits: 0 ran; 1 with strict, a target missed; 3 could not run."""
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 120, emoji=False)
    try:
        with console.status("starting") as status:
            results = run(lambda msg: status.update(msg))
    except error as err:
        Console(stderr=True, emoji=False).print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(EXIT_CANNOT_RUN)
    if as_json:
        print(json.dumps(results.to_json(), indent=1))
    else:
        print_results(results, console)
    sys.exit(EXIT_TARGET_MISSED if strict and not results.ok else EXIT_OK)


@click.group("bench")
def bench() -> None:
    """Benchmarks of the data path and of the lab."""


@bench.command("datapath")
@repeat_option(2_000_000)
@rounds_option
@click.option(
    "--inserts",
    type=click.IntRange(100),
    default=20_000,
    show_default=True,
    help="New connections inserted, each by a single run, per table state.",
)
@click.option(
    "--table",
    type=click.IntRange(1024),
    default=65_536,
    show_default=True,
    help="Connection-table size for the runs (the full-table inserts evict).",
)
@click.option(
    "--memory-entries",
    type=click.IntRange(0),
    default=1 << 20,
    show_default=True,
    help="Entries of the table whose kernel memory is reported (0: skip).",
)
@json_option
@strict_option
def datapath(
    repeat: int,
    rounds: int,
    inserts: int,
    table: int,
    memory_entries: int,
    as_json: bool,
    strict: bool,
) -> None:
    """ns per packet of each program path vs an empty tc program, and kernel
    memory per connection entry (docs/datapath.md).

    Exit codes: 0 ran (targets reported); 1 with --strict, a target missed;
    3 could not run."""
    _figures(
        lambda progress: dp_bench.run(
            repeat=repeat,
            rounds=rounds,
            inserts=inserts,
            table=table,
            memory_entries=memory_entries,
            progress=progress,
        ),
        dp_bench.BenchError,
        dp_bench.print_results,
        as_json=as_json,
        strict=strict,
    )


@bench.command("lab")
@click.option(
    "--quick",
    is_flag=True,
    help=f"A short run for CI (~30 s): {lab_bench.QUICK.reps} repetitions, smaller bursts.",
)
@click.option("--reps", type=click.IntRange(1), help="Repetitions (each one burst of every mode).")
@click.option("--packets", type=click.IntRange(1000), help="Packets per mode and repetition.")
@click.option(
    "--connections",
    type=click.IntRange(100, 200_000),
    help="New connections per mode and repetition.",
)
@click.option(
    "--flows",
    type=click.IntRange(1, 50_000),
    help="Established flows the packets test cycles over (default 1,024).",
)
@click.option(
    "--tcp",
    is_flag=True,
    help="The packets test sends TCP ACKs of established connections instead of UDP.",
)
@click.option(
    "--extra-mode",
    "extra_modes",
    multiple=True,
    type=click.Choice([m.name for m in lab_bench.EXTRA_MODES]),
    help="Also run this diagnostic mode (repeatable): lasthop with a smaller table, without "
    "the in-place quota, or with clsact filters instead of tcx links.",
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
    default=lab_bench.DEFAULT_OUT,
    show_default=True,
    help="Folder for bench-lab.md, bench-lab.png, bench-lab.json.",
)
@click.option(
    "--prefix",
    default=lab_bench.DEFAULT_PREFIX,
    show_default=True,
    help="Start of every namespace name (<prefix><mode>-host, ...): two runs need two prefixes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
@click.option("--strict", is_flag=True, help="Exit 1 when a primary target is missed.")
def lab(quick: bool, reps: int | None, packets: int | None, connections: int | None,
                flows: int | None, tcp: bool, extra_modes: tuple[str, ...], cpu: int,
                br_netfilter: bool,
                out: Path, prefix: str, as_json: bool, strict: bool) -> None:  # fmt: skip
    """The host's CPU per packet and new connections per second: plain bridge,
    lasthop, conntrack recipe, side by side (docs/bench-lab.md).

    Exit codes: 0 it ran (targets are reported, not enforced); 1 a check
    failed (packets lost, or lasthop or the recipe did not do its work), or
    with --strict a target was missed; 3 it could not run (not root, a tool
    missing, a command failed)."""
    base = lab_bench.QUICK if quick else lab_bench.FULL
    settings = replace(
        base,
        reps=reps or base.reps,
        packets=packets or base.packets,
        connections=connections or base.connections,
        flows=flows or base.flows,
        warmup=3 * (flows or base.flows),
        extra_modes=extra_modes,
        tcp=tcp,
        cpu=cpu,
        br_netfilter=br_netfilter,
    )
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 160, emoji=False)
    err = Console(stderr=True, emoji=False)
    try:
        with console.status("starting") as status:
            report = lab_bench.run_bench(settings, status.update, prefix)
    except (lab_bench.BenchError, LabError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(EXIT_CANNOT_RUN)
    except KeyboardInterrupt:
        err.print("interrupted: every namespace of the bench removed")
        sys.exit(130)
    files = lab_bench.write_results(report, out)
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        lab_bench.print_report(report, console)
    console.print(f"written: {', '.join(map(str, files))}")
    missed = strict and not all(t.passed for t in report.targets if t.target.primary)
    sys.exit(EXIT_OK if report.consistent and not missed else EXIT_TARGET_MISSED)


@bench.command("services")
@click.option(
    "--keys",
    type=click.IntRange(1000),
    default=1_000_000,
    show_default=True,
    help="Simulated connection keys for the spread and movement figures.",
)
@repeat_option(1_000_000)
@rounds_option
@click.option(
    "--singles",
    type=click.IntRange(100),
    default=5000,
    show_default=True,
    help="New service connections timed as single runs.",
)
@click.option(
    "--datapath/--no-datapath",
    default=True,
    show_default=True,
    help="Also measure per-packet cost and the table swap (needs root).",
)
@click.option(
    "--move-entries",
    type=click.IntRange(0),
    default=1_000_000,
    show_default=True,
    help="Live entries when a VM leaves a pool (the kernel walk vs reading them; 0: skip).",
)
@json_option
@strict_option
def services(
    keys: int,
    repeat: int,
    rounds: int,
    singles: int,
    datapath: bool,
    move_entries: int,
    as_json: bool,
    strict: bool,
) -> None:
    """Maglev spread and movement over simulated connections, table rebuild
    time, and the service path's ns per packet vs an empty tc program.

    Exit codes: 0 ran (targets reported); 1 with --strict, a target missed;
    3 could not run."""
    _figures(
        lambda progress: svc_bench.run(
            keys=keys,
            repeat=repeat,
            rounds=rounds,
            singles=singles,
            datapath=datapath,
            move_entries=move_entries,
            progress=progress,
        ),
        svc_bench.BenchError,
        svc_bench.print_results,
        as_json=as_json,
        strict=strict,
    )


@bench.command("table")
@click.option(
    "--entries",
    type=click.IntRange(1000, 1 << 27),
    default=1_000_000,
    show_default=True,
    help="Live entries in the tables (table_size = this).",
)
@click.option(
    "--rest",
    type=click.FloatRange(1),
    default=30.0,
    show_default=True,
    help="Seconds the agent's CPU is measured at rest (each table).",
)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=7,
    show_default=True,
    help="Runs of each timed command (the median is reported).",
)
@click.option(
    "--expiring",
    type=click.IntRange(2),
    default=1000,
    show_default=True,
    help="Entries with a short timeout whose removal is timed.",
)
@click.option(
    "--short-timeout",
    type=click.FloatRange(1),
    default=table_bench.SHORT_TIMEOUT,
    show_default=True,
    help="Seconds those entries' states time out after (udp_new, udp_stream).",
)
@json_option
@strict_option
def table(
    entries: int,
    rest: float,
    repeat: int,
    expiring: int,
    short_timeout: float,
    as_json: bool,
    strict: bool,
) -> None:
    """The agent's cost at N live entries: CPU at rest, stats and /metrics
    time, expiry pass and lateness, kernel memory per entry (docs/table.md).

    Exit codes: 0 ran (targets reported); 1 with --strict, a target missed;
    3 could not run."""
    with stop_signals_interrupt(signal.SIGTERM):  # clean up on TERM too
        _figures(
            lambda progress: table_bench.run(
                entries=entries,
                rest=rest,
                repeat=repeat,
                expiring=expiring,
                short_timeout=short_timeout,
                progress=progress,
            ),
            (table_bench.BenchError, BpfError, subprocess.CalledProcessError),
            table_bench.print_results,
            as_json=as_json,
            strict=strict,
        )


@bench.command("startup")
@rounds_option
@json_option
@strict_option
def startup(rounds: int, as_json: bool, strict: bool) -> None:
    """The data path's load at agent start with every program and without
    lh_uplink_l3 (loaded at the first L3 attach), in turn; processed insns.

    Exit codes: 0 ran; 1 with --strict, the lazy load is not faster; 3 could not run."""
    _figures(
        lambda progress: startup_bench.run(rounds, progress),
        (BpfError, DatapathError),
        startup_bench.print_results,
        as_json=as_json,
        strict=strict,
    )


@bench.command("sync")
@click.option(
    "--changes",
    type=click.IntRange(1000),
    default=300_000,
    show_default=True,
    help="Records of the throughput phase, and again of the lag phase.",
)
@click.option(
    "--rate",
    type=click.IntRange(1000),
    default=101_000,
    show_default=True,
    help="Records/s offered in the lag phase (1%% above the 100,000/s it must publish: "
    "its published rate counts from its first run to its last XADD).",
)
@click.option(
    "--resync",
    "resync_entries",
    type=click.IntRange(1000),
    default=1_000_000,
    show_default=True,
    help="Entries a fresh peer receives in the resync phase.",
)
@click.option(
    "--connections",
    type=click.IntRange(100),
    default=5_000,
    show_default=True,
    help="New connections per data-path round (sync off and on alternate).",
)
@rounds_option
@json_option
@strict_option
def sync(
    changes: int,
    rate: int,
    resync_entries: int,
    connections: int,
    rounds: int,
    as_json: bool,
    strict: bool,
) -> None:
    """Replication through a real Redis: data-path cost per new connection
    with sync on / off, changes/s published and applied, lag p50/p99 at
    --rate, full resync to a fresh peer (docs/ha.md).

    Exit codes: 0 ran (targets reported); 1 with --strict, a target missed;
    3 could not run."""
    from lasthop.bench import sync as sync_bench

    with stop_signals_interrupt(signal.SIGTERM):
        _figures(
            lambda progress: sync_bench.run(
                changes=changes,
                rate=rate,
                resync=resync_entries,
                conns=connections,
                rounds=rounds,
                progress=progress,
            ),
            (sync_bench.BenchError, BpfError, OSError),
            sync_bench.print_results,
            as_json=as_json,
            strict=strict,
        )

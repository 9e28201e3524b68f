"""`lasthop bench ...`: the benchmarks, as a click group the main CLI adds."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from lasthop.bench import datapath as dp_bench
from lasthop.bench.services import services_command
from lasthop.bench.table import table_command

__all__ = ["bench"]

EXIT_OK, EXIT_TARGET_MISSED, EXIT_CANNOT_RUN = 0, 1, 3


@click.group("bench")
def bench() -> None:
    """Benchmarks of the data path and of the lab."""


@bench.command("datapath")
@click.option("--repeat", type=click.IntRange(1000), default=2_000_000, show_default=True,
              help="Back-to-back runs of each program per round.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True,
              help="Rounds (the median is reported).")
@click.option("--inserts", type=click.IntRange(100), default=20_000, show_default=True,
              help="New connections inserted, each by a single run, per table state.")
@click.option("--table", type=click.IntRange(1024), default=65_536, show_default=True,
              help="Connection-table size for the runs (the full-table inserts evict).")
@click.option("--memory-entries", type=click.IntRange(0), default=1 << 20, show_default=True,
              help="Entries of the table whose kernel memory is reported (0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--strict", is_flag=True, help="Exit 1 when a figure misses its target.")
def datapath(repeat: int, rounds: int, inserts: int, table: int, memory_entries: int,
             as_json: bool, strict: bool) -> None:
    """ns per packet of each program path vs an empty tc program, and kernel
    memory per connection entry (docs/datapath.md).

    Exit codes: 0 ran (targets reported); 1 with --strict, a target missed;
    3 could not run."""
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 120)
    try:
        with console.status("starting") as status:
            results = dp_bench.run(repeat=repeat, rounds=rounds, inserts=inserts, table=table,
                                   memory_entries=memory_entries,
                                   progress=lambda msg: status.update(msg))
    except dp_bench.BenchError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(EXIT_CANNOT_RUN)
    if as_json:
        print(json.dumps(results.to_json(), indent=1))
    else:
        dp_bench.print_results(results, console)
    sys.exit(EXIT_TARGET_MISSED if strict and not results.ok else EXIT_OK)


def _add_lab() -> None:
    """`bench lab` lives in lasthop.bench.lab (the lab's own benchmark)."""
    try:
        from lasthop.bench.lab import lab_command
    except ModuleNotFoundError as err:
        if err.name != "lasthop.bench.lab":
            raise
        return
    bench.add_command(lab_command)


_add_lab()
bench.add_command(services_command)  # `bench services`: lasthop.bench.services
bench.add_command(table_command)  # `bench table`: lasthop.bench.table

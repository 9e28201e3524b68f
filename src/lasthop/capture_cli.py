"""`lasthop pcap`: the asymmetry report of lasthop.capture, as tables or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lasthop.capture import Hop, Report, analyse, read_names
from lasthop.errors import EXIT_FAILURE, ConfigError, friendly

__all__ = ["pcap"]


def _names(pairs: tuple[str, ...], names_file: Path | None) -> dict[str, str]:
    lines = [p.replace("=", " ", 1) for p in pairs]
    if names_file is not None:
        try:
            lines = names_file.read_text().splitlines() + lines
        except OSError as err:
            raise ConfigError(f"--names {names_file}: cannot read: {err.strerror}") from err
    return read_names(lines)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--name", "pairs", multiple=True, metavar="MAC=NAME",
    help="Name a last hop (a firewall) in the report (repeatable).",
)  # fmt: skip
@click.option(
    "--names", "names_file", type=click.Path(path_type=Path, dir_okay=False),
    help='File of "MAC NAME" lines naming last hops.',
)  # fmt: skip
@click.option("--limit", default=20, show_default=True, help="Connections listed per kind.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.option(
    "--fail-on-asymmetry", is_flag=True,
    help="Exit 1 when a reply left by another way than its request came.",
)  # fmt: skip
@friendly
def pcap(
    files: tuple[Path, ...],
    pairs: tuple[str, ...],
    names_file: Path | None,
    limit: int,
    as_json: bool,
    fail_on_asymmetry: bool,
) -> None:
    """Connections whose replies left by another last hop than their requests
    came, from captures taken on a host's uplinks (pcap or pcapng; one file
    per uplink, named for it: up0.pcap)."""
    names = _names(pairs, names_file)
    report = analyse(list(files))
    if as_json:
        print(json.dumps(report.to_json(names, limit), indent=1))
    else:
        _print(report, names, limit)
    if fail_on_asymmetry and report.return_asymmetric():
        sys.exit(EXIT_FAILURE)


def _print(report: Report, names: dict[str, str], limit: int) -> None:
    console = Console(width=None if sys.stdout.isatty() else 200)
    s = report.summary()
    console.print(
        f"{s['frames']} frames, {s['connections']} connections: {s['symmetric']} symmetric, "
        f"{s['return_asymmetric']} replied by another way, {s['forward_asymmetric']} answered "
        f"from another way, {s['unanswered']} unanswered"
        + (f"; {s['guessed']} first seen mid-stream (direction guessed)" if s["guessed"] else ""),
        highlight=False,
    )
    if report.skipped:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items()))
        console.print(f"frames without a connection: {skipped}", highlight=False)
    several = len(report.files) > 1  # name the capture (the uplink) of each hop

    def hop(h: Hop) -> str:
        return escape(h.label(names, where=several))

    pairs = report.pairs()
    if pairs:
        table = Table(title="replies that left by another way, per pair of last hops")
        table.add_column("request came from")
        table.add_column("reply went to")
        table.add_column("connections", justify="right")
        for (came, went), n in pairs.most_common():
            table.add_row(hop(came), hop(went), str(n))
        console.print(table)
    for title, conns in (
        ("replied by another way", report.return_asymmetric()),
        ("answered from another way", report.forward_asymmetric()),
    ):
        if not conns:
            continue
        table = Table(title=f"{title} ({len(conns)}, first {min(limit, len(conns))})")
        for col in ("connection", "request from", "reply to", "requests", "replies"):
            table.add_column(col, justify="right" if col in ("requests", "replies") else "left")
        for c in conns[:limit]:
            table.add_row(
                escape(c.describe() + (" (guessed)" if c.guessed else "")),
                "\n".join(hop(h) for h in sorted(c.request_from)),
                "\n".join(hop(h) for h in sorted(c.reply_to)),
                str(c.requests),
                str(c.replies),
            )
        console.print(table)

"""`lasthop explain`: lasthop.explain's words, or its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lasthop.cli import _controller, config_option, netns_option
from lasthop.errors import friendly
from lasthop.explain import PROTOS, Query, parse_endpoint

__all__ = ["explain"]


@click.command()
@config_option
@netns_option
@click.argument("proto", type=click.Choice(sorted(PROTOS)))
@click.argument("client", metavar="CLIENT[:PORT]")
@click.argument("server", metavar="SERVER[:PORT]")
@click.option("--zone", default=0, show_default=True, help="Routing domain of the uplink.")
@click.option("--id", "echo_id", type=click.IntRange(0, 65535), help="ICMP echo identifier.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@friendly
def explain(
    config_path: Path | None,
    netns: str | None,
    proto: str,
    client: str,
    server: str,
    zone: int,
    echo_id: int | None,
    as_json: bool,
) -> None:
    """What lasthop knows of one connection and will do with its packets:
    `lasthop explain tcp 10.1.2.2:40000 10.0.0.11:80` (the client first)."""
    caddr, cport = parse_endpoint(client, "client")
    saddr, sport = parse_endpoint(server, "server")
    if proto == "icmp":
        cport = sport = echo_id or 0
    q = Query(proto, caddr, cport, saddr, sport, zone)
    config = None
    if config_path is not None:  # its last_hop_names and scope rules
        from lasthop.config import load

        config = load(config_path)
    ex = _controller(netns, config_path).explain(q, config)
    if as_json:
        print(json.dumps(ex.to_json(), indent=1))
        return
    for line in ex.words:
        click.echo(line)

"""The `lasthop` command: a thin layer over :class:`lasthop.controller.Controller`.

Exit codes (each error class carries its own: lasthop.errors): 0 success,
1 runtime failure (kernel, netlink, the API's sockets), 2 usage, config
error (also: table_size differs from the pinned table's), unknown interface
or namespace, 3 nothing attached here, 4 no such service or VM.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from lasthop import configfile, logs
from lasthop.endpoint import format_endpoint
from lasthop.errors import (
    EXIT_FAILURE,
    EXIT_NOT_ATTACHED,
    EXIT_USAGE,
    ConfigError,
    NotAttachedError,
    friendly,
)

# What only some commands need is imported in them: a command that reads the
# pinned maps (`stats --json`, `show --json`) starts without pyroute2,
# pydantic, rich or the subcommand groups' packages, which were ~1 s of its
# start (issue 8; tests/test_cli_startup.py keeps it so).
if TYPE_CHECKING:
    from rich.console import Console

    from lasthop.config import Config
    from lasthop.controller import Controller

__all__ = ["EXIT_FAILURE", "EXIT_NOT_ATTACHED", "EXIT_USAGE", "cli", "main"]


@functools.cache
def _console() -> Console:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, emoji=False)


netns_option = click.option(
    "--netns", metavar="NAME", help="Named network namespace (/run/netns/NAME)."
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config file (its netns and pin_root are used).",
)


def _controller(netns: str | None, config_path: Path | None) -> Controller:
    """A controller for a command that reads or removes what `run` set up:
    --netns, else the config's netns; the config's pin_root."""
    from lasthop.controller import Controller

    place = configfile.place(config_path)
    return Controller(netns or place.netns, place.pin_root)


class _Group(click.Group):
    """The root group: the subcommand groups that live in their own packages
    are imported when named (or listed by --help), not at every start
    (click's documented lazy-loading pattern)."""

    LAZY = {  # name -> (module, attribute)
        "service": ("lasthop.services.cli", "service"),
        "lab": ("lasthop.lab.cli", "lab"),
        "bench": ("lasthop.bench.cli", "bench"),
        "pcap": ("lasthop.capture_cli", "pcap"),
        "explain": ("lasthop.explain_cli", "explain"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            module, name = self.LAZY[cmd_name]
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as err:
                # a package left out of this install (lab, bench): no such command
                if err.name is None or not module.startswith(err.name):
                    raise
                return None
            self.add_command(getattr(mod, name))
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group)
@click.version_option(package_name="lasthop", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log what the agent does (--log-level info).")
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    show_default=True,
    envvar="LASTHOP_LOG_FORMAT",
    help="Log lines as text (key=value) or JSON objects, on stderr.",
)
@click.option(
    "--log-level",
    type=click.Choice(logs.LEVELS),
    envvar="LASTHOP_LOG_LEVEL",
    help="Least severe level logged [default: warning; info with -v].",
)
def cli(verbose: bool, log_format: str, log_level: str | None) -> None:
    """lasthop: send every reply back by the MAC and interface its request came in on."""
    logs.setup(log_format, log_level or ("info" if verbose else "warning"))


@cli.command()
@config_option
@netns_option
@click.option(
    "--uplink", "uplinks", multiple=True, metavar="IF", help="Uplink interface (repeatable)."
)
@click.option("--vm-port", "vm_ports", multiple=True, metavar="IF", help="VM port (repeatable).")
@click.option(
    "--bridge", metavar="BR", help="Attach to every non-uplink port of BR, following changes."
)
@click.option(
    "--routed",
    is_flag=True,
    default=None,
    help="Routed host: replies also get the uplink's MAC and TTL-1.",
)
@click.option(
    "--relearn", type=click.Choice(["latest", "first"]), help="Which MAC a connection keeps."
)
@click.option("--table-size", type=int, help="Connection table entries.")
@click.option(
    "--idle-timeout", type=float, metavar="SECONDS", help="Remove entries idle this long."
)
@click.option("--api", metavar="HOST:PORT", help="Also serve the REST API over TCP here.")
@click.option("--api-socket", metavar="PATH", help='Unix socket of the REST API ("" = none).')
@click.option(
    "--sync", metavar="URL", help="Replicate the table through Redis: redis://HOST:PORT/DB."
)
@friendly
def run(
    config_path: Path | None,
    netns: str | None,
    uplinks: tuple[str, ...],
    vm_ports: tuple[str, ...],
    bridge: str | None,
    routed: bool | None,
    relearn: str | None,
    table_size: int | None,
    idle_timeout: float | None,
    api: str | None,
    api_socket: str | None,
    sync: str | None,
) -> None:
    """Attach and run in the foreground; SIGTERM leaves the data path attached."""
    from lasthop import config as config_mod
    from lasthop.agent import Agent
    from lasthop.controller import Controller

    flags = dict(
        netns=netns,
        uplinks=uplinks,
        vm_ports=vm_ports,
        bridge=bridge,
        routed=routed,
        relearn=relearn,
        table_size=table_size,
        idle_timeout=idle_timeout,
        api=api,
        api_socket=api_socket,
        sync=sync,
    )

    def source() -> Config:
        """The config as now on disk, this command line's flags on top (a reload)."""
        return config_mod.load(config_path).merged(**flags)

    cfg = source()
    controller = Controller(cfg.netns, cfg.pin_root)
    try:
        Agent(controller, cfg, source=source).run(ready=lambda line: print(line, flush=True))
    finally:
        controller.close()


@cli.command()
@config_option
@netns_option
@click.option(
    "--api-socket",
    type=click.Path(path_type=Path),
    help="The agent's unix socket (default: the config's, or /run/lasthop/<netns>.sock).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def reload(
    config_path: Path | None, netns: str | None, api_socket: Path | None, as_json: bool
) -> None:
    """Have the running agent re-read its config and apply the difference
    (as SIGHUP does); a bad config is refused with the keys named (exit 2)."""
    from lasthop import netns as netns_mod
    from lasthop.config import API_SOCKET_DIR
    from lasthop.services.cli import AgentClient

    if api_socket is None:
        # the socket from the file's two keys alone: the agent judges the rest,
        # so a bad config is refused by it, naming the keys (and logged there)
        data = configfile.read(config_path) if config_path is not None else {}
        name, where = data.get("netns"), data.get("api_socket")
        if where == "":
            raise ConfigError('api_socket is "": no socket to ask; send SIGHUP to the agent')
        name = netns or (name if isinstance(name, str) else None) or netns_mod.current_name()
        api_socket = Path(where) if isinstance(where, str) else API_SOCKET_DIR / f"{name}.sock"
    client = AgentClient.probe(api_socket)
    if client is None:
        raise NotAttachedError(f"no agent answers on {api_socket}")
    from lasthop.errors import ServiceError

    try:
        answer = client.call("POST", "/v1/reload")
    except ServiceError as err:  # 422: the agent refused the config
        raise ConfigError(str(err)) from None
    if as_json:
        print(json.dumps(answer, indent=1))
        return
    changed = ", ".join(answer["changed"]) or "nothing"
    print(f"reloaded: changed {changed}")
    for key in answer["kept"]:
        print(
            f"warning: {key} cannot change while running: it keeps its value "
            "(restart to change it)",
            file=sys.stderr,
        )


@cli.command("systemd-unit")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default="/etc/lasthop/lasthop.toml",
    show_default=True,
    help="The config file the unit runs the agent with.",
)
def systemd_unit(config_path: Path) -> None:
    """Print the systemd unit (lasthop.service) for this install (docs/operations.md)."""
    from lasthop.systemd import unit_text

    sys.stdout.write(unit_text(config_path.absolute()))


@cli.command()
@config_option
@netns_option
@friendly
def detach(config_path: Path | None, netns: str | None) -> None:
    """Remove the programs from every interface and drop the pinned table."""
    controller = _controller(netns, config_path)
    names = controller.detach()
    _console().print(f"detached from {', '.join(names) if names else 'no interface'}; pins removed")


@cli.command()
@config_option
@netns_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=0,
    help="At most this many entries, the most recently seen first (0 = all, in table order).",
)
@click.option("--client", help="Client address or prefix (the request's source).")
@click.option("--server", help="Server address or prefix (the request's destination).")
@click.option("--uplink", help="Uplink the request arrived on.")
@click.option("--vm-port", "vm_port", help="VM port that serves or opened the connection.")
@click.option("--state", help="Connection state (tcp_established, udp_new, ...).")
@click.option("--mac", help="Last-hop MAC.")
@friendly
def show(
    config_path: Path | None,
    netns: str | None,
    as_json: bool,
    limit: int,
    **filters: str | None,
) -> None:
    """The per-connection table (streams: the table is never held in memory)."""
    from lasthop.connections import ConnFilter, json_array, tunnel_str

    where = ConnFilter(**filters)  # FilterError: exit 2, naming the filter
    conns = _controller(netns, config_path).iter_connections(where, limit=limit)
    if as_json:
        sys.stdout.writelines(json_array(c.to_json() for c in conns))
        return
    from rich.table import Table

    conns_list = list(conns)
    table = Table(title=f"{len(conns_list)} connections", title_justify="left")
    for col in (
        "proto",
        "source",
        "destination",
        "zone",
        "last-hop MAC",
        "uplink",
        "vlan",
        "tunnel",
        "age s",
        "pkts",
        "replies",
        "VM port",
        "state",
    ):
        table.add_column(
            col, justify="right" if col in ("zone", "age s", "pkts", "replies") else "left"
        )
    for c in conns_list:
        table.add_row(
            c.proto,
            _ep(c.src, c.sport),
            _ep(c.dst, c.dport),
            str(c.zone),
            c.mac or "-",
            c.uplink or "-",
            ",".join(map(str, c.vlan)) or "-",
            tunnel_str(c) or "-",
            f"{c.age_s:.1f}",
            str(c.packets),
            str(c.replies),
            c.vm_port or "-",
            c.state,
        )
    _console().print(table)


def _ep(addr: str, port: int) -> str:
    if not port:
        return addr
    return format_endpoint(addr, port)


@cli.command()
@config_option
@netns_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@friendly
def stats(config_path: Path | None, netns: str | None, as_json: bool) -> None:
    """The counters: per reason, in total and per interface."""
    from lasthop.stats_cli import render  # the short way's (lasthop._entry) printing

    st = _controller(netns, config_path).stats()
    if as_json:
        print(json.dumps(st.to_json(), indent=1))
        return
    render(st.to_json())


@cli.command()
@config_option
@netns_option
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True,
              metavar="SECONDS", help="Time between refreshes.")  # fmt: skip
@click.option("--sample", type=click.IntRange(1, 4096), default=1000, show_default=True,
              help="Entries read per refresh for the top last hops (bounded sample).")  # fmt: skip
@click.option("--count", type=click.IntRange(min=0), default=0, help="Stop after N refreshes.")
@friendly
def top(
    config_path: Path | None, netns: str | None, interval: float, sample: int, count: int
) -> None:
    """A live view: states, learned/expired per second, top uplinks and last hops, counters
    that moved (kernel counters and a bounded sample: no table walk). Ctrl-C quits."""
    from lasthop import top as top_view

    title = f"lasthop top{f' --netns {netns}' if netns else ''}"
    with contextlib.suppress(KeyboardInterrupt):
        controller = _controller(netns, config_path)
        top_view.run(controller, title=title, interval=interval, sample=sample, count=count)


@cli.command()
@config_option
@netns_option
@friendly
@click.option(
    "--out-of-scope",
    is_flag=True,
    help="only the entries the running agent's scope rules now pass (the kernel walks the table)",
)
def flush(config_path: Path | None, netns: str | None, out_of_scope: bool) -> None:
    """Remove every entry: connections fall back to ordinary routing until seen again."""
    controller = _controller(netns, config_path)
    if out_of_scope:
        n = controller.flush_out_of_scope()
        _console().print(f"flushed {n} entries now out of scope")
        return
    n = controller.flush()
    _console().print(f"flushed {n} entries")


sync_option = click.option(
    "--sync", metavar="URL", help="The sync store (redis://HOST:PORT/DB); default: the config's."
)


def _sync_config(config_path: Path | None, netns: str | None, url: str | None) -> Config:
    from lasthop import config as config_mod

    return config_mod.load(config_path).merged(netns=netns, sync=url)


@cli.group()
def sync() -> None:
    """Replication of the table with the cluster's hosts (docs/ha.md)."""


@sync.command("status")
@config_option
@netns_option
@sync_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def sync_status(
    config_path: Path | None, netns: str | None, sync: str | None, as_json: bool
) -> None:
    """Published, applied, lost, resyncs, malformed batches; each peer's heartbeat and lag."""
    from lasthop.controller import Controller

    cfg = _sync_config(config_path, netns, sync)
    st = Controller(cfg.netns, cfg.pin_root).sync_status(cfg)
    if as_json:
        print(json.dumps(st.to_json(), indent=1))
        return
    _console().print(
        f"host {st.host} in cluster {st.cluster}: "
        f"{'running' if st.running else 'no agent reporting'}; published {st.published}, "
        f"unpublished {st.unpublished}, applied {st.applied}, unmapped {st.unmapped}, "
        f"lost {st.lost} (ring full), resyncs {st.resyncs}, malformed batches {st.malformed}",
        highlight=False,
    )
    for host, p in sorted(st.peers.items()):
        seen = f"{p.last_seen_s:.1f} s ago" if p.last_seen_s is not None else "never"
        lag = f", lag {p.lag_ms} ms (p99 {p.lag_p99_ms} ms)" if p.lag_ms is not None else ""
        _console().print(f"  peer {host}: last seen {seen}{lag}", highlight=False)


@sync.command("resync")
@config_option
@netns_option
@sync_option
@friendly
def sync_resync(config_path: Path | None, netns: str | None, sync: str | None) -> None:
    """Publish a snapshot of this host's table (repairs peers after losses)."""
    from lasthop.controller import Controller

    cfg = _sync_config(config_path, netns, sync)
    n = Controller(cfg.netns, cfg.pin_root).sync_resync(cfg)
    _console().print(f"published a snapshot of {n} entries", highlight=False)


@cli.command("export")
@config_option
@netns_option
@click.option("--vm", "vm_port", required=True, metavar="PORT", help="The VM port leaving.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (default: standard output).",
)
@friendly
def export_cmd(config_path: Path | None, netns: str | None, vm_port: str, out: Path | None) -> None:
    """Write the entries of a VM port's connections, for `lasthop import` on another host."""
    data = _controller(netns, config_path).export_vm(vm_port)
    text = json.dumps(data)
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n")
        n = len(data["records"])  # type: ignore[arg-type]
        print(f"exported {n} entries of {vm_port} to {out}", file=sys.stderr)


@cli.command("import")
@config_option
@netns_option
@click.argument("file", type=click.File("r"))
@click.option(
    "--vm-port", "vm_port", required=True, metavar="NAME", help="The VM's port on this host."
)
@friendly
def import_cmd(config_path: Path | None, netns: str | None, file: TextIO, vm_port: str) -> None:
    """Write the entries of a `lasthop export` into this host's tables (- = standard input)."""
    try:
        data = json.load(file)
    except ValueError as err:
        raise ConfigError(f"not a lasthop export: {err}") from err
    got = _controller(netns, config_path).import_vm(data, vm_port)
    note = "" if got["vm_port_found"] else f" ({vm_port} is not here yet: no VM pinned)"
    _console().print(
        f"imported {got['imported']} entries, {got['unmapped']} skipped (uplink not here){note}",
        highlight=False,
    )


def main() -> int:
    cli.main(standalone_mode=True)
    return 0


if __name__ == "__main__":  # `python -m lasthop.cli stats`: the click path, for comparison
    raise SystemExit(main())

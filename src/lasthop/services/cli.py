"""`lasthop service list|add|remove|drain|undrain`.

With an agent running in the namespace, every command goes to its REST API
(the unix socket, /run/lasthop/<netns>.sock), so the agent's health checks
and tables follow at once. With no agent, the command edits the pinned maps
(when a data path is pinned) and the state file itself; the next agent
starts from there.

Exit codes (lasthop.errors): 0 success, 1 runtime failure (kernel, the
agent's socket), 2 invalid definition, or a name or address already taken,
4 no such service or VM.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import click
from rich.console import Console
from rich.table import Table

from lasthop import config as config_mod
from lasthop import netns as netns_mod
from lasthop.controller import Controller
from lasthop.endpoint import format_endpoint
from lasthop.errors import AgentError, ServiceError, friendly, from_answer
from lasthop.services.manager import ServiceManager
from lasthop.services.model import (
    HealthCheck,
    ServiceVm,
    parse_vm,
    validate_service,
)

__all__ = ["service", "AgentClient", "LocalServices"]

F = TypeVar("F", bound=Callable[..., Any])
console = Console(width=None if sys.stdout.isatty() else 200, emoji=False)
TIMEOUT = 30.0  # seconds: removing a VM walks the whole connection table


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """The services of a running agent, through its REST API on a unix socket."""

    where = "agent"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def probe(cls, path: Path | None) -> AgentClient | None:
        """A client when an agent answers on *path*, else None."""
        if path is None or not path.exists():
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return None  # a socket file left by an agent that died
        finally:
            sock.close()
        return cls(path)

    def _call(self, method: str, path: str, body: object = None) -> Any:
        return self.call(method, f"/v1/services{path}", body)

    def call(self, method: str, path: str, body: object = None) -> Any:
        """One request to the agent's API; its JSON answer, or the error it stands for."""
        conn = _UnixConnection(self.path, TIMEOUT)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except OSError as err:
            raise AgentError(f"the agent on {self.path}: {err.strerror or err}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(payload) if payload else None
        except ValueError:
            answer = {"detail": payload.decode(errors="replace")}
        if resp.status < 300:
            return answer
        detail = answer.get("detail") if isinstance(answer, dict) else answer
        if not isinstance(detail, str):
            detail = json.dumps(detail)
        raise from_answer(resp.status, detail)

    def all(self) -> list[dict[str, Any]]:
        return list(self._call("GET", ""))

    def add(self, definition: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "", definition))

    def add_vms(self, name: str, vms: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self._call("POST", f"/{quote(name)}/vms", vms))

    def remove(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/{quote(name)}"))

    def remove_vms(self, name: str, ports: list[str]) -> dict[str, Any]:
        query = urlencode([("port", p) for p in ports])
        return dict(self._call("DELETE", f"/{quote(name)}/vms?{query}"))

    def drain(self, name: str, ports: list[str], drained: bool) -> dict[str, Any]:
        verb = "drain" if drained else "undrain"
        return dict(self._call("POST", f"/{quote(name)}/{verb}", {"vms": ports}))


class LocalServices:
    """No agent: the pinned maps (if any) and the state file, edited here."""

    def __init__(self, manager: ServiceManager, attached: bool) -> None:
        self.manager = manager
        self.where = "pinned maps and state file" if attached else "state file (nothing pinned)"

    def all(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.manager.status()]

    def add(self, definition: dict[str, Any]) -> dict[str, Any]:
        return self.manager.add(validate_service(definition)).to_json()

    def add_vms(self, name: str, vms: list[dict[str, Any]]) -> dict[str, Any]:
        return self.manager.add_vms(name, [ServiceVm.model_validate(v) for v in vms]).to_json()

    def remove(self, name: str) -> dict[str, Any]:
        return {"removed": name, "forgotten": self.manager.remove(name)}

    def remove_vms(self, name: str, ports: list[str]) -> dict[str, Any]:
        return dict(self.manager.remove_vms(name, ports))

    def drain(self, name: str, ports: list[str], drained: bool) -> dict[str, Any]:
        return self.manager.set_drained(name, ports, drained).to_json()


ServicesClient = AgentClient | LocalServices


def _client(netns: str | None, config_path: Path | None, api_socket: Path | None) -> ServicesClient:
    """The running agent when one answers, else the pinned maps and state file."""
    cfg = config_mod.load(config_path)
    name = netns or cfg.netns or netns_mod.current_name()
    client = AgentClient.probe(api_socket or cfg.api_socket_path(name))
    if client is not None:
        return client
    controller = Controller(netns or cfg.netns, cfg.pin_root)
    return LocalServices(controller.services, controller.pins.exist())


def _common(fn: F) -> F:
    fn = click.option(
        "--api-socket",
        type=click.Path(path_type=Path),
        metavar="PATH",
        help="The agent's unix socket (default /run/lasthop/<netns>.sock).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML config file (its netns, pin_root and api_socket are used).",
    )(fn)
    fn = click.option("--netns", metavar="NAME", help="Named network namespace (/run/netns/NAME).")(
        fn
    )
    return fn


# ---------------------------------------------------------------- output


def _state(vm: dict[str, Any]) -> str:
    if vm["serving"]:
        return "[green]serving[/green]"
    if vm["down"]:
        return "[red]down[/red]"
    if vm["drained"]:
        return "[yellow]drained[/yellow]"
    if vm["link"] != "up":
        return f"[red]{vm['link']}[/red]"
    return f"[red]{vm['health']}[/red]"


def _where(svc: dict[str, Any]) -> str:
    if svc["ports"]:
        return f"{svc['proto']} {format_endpoint(svc['address'], ','.join(map(str, svc['ports'])))}"
    return f"{svc['proto']} {svc['address']}"


def _print(services: list[dict[str, Any]], where: str) -> None:
    table = Table(title=f"{len(services)} services ({where})", title_justify="left")
    for col in (
        "service",
        "address",
        "VM",
        "weight",
        "state",
        "health",
        "link",
        "slots",
        "changes",
        "last check",
    ):
        table.add_column(col, justify="right" if col in ("weight", "slots", "changes") else "left")
    size = sum(vm["slots"] for svc in services for vm in svc["vms"]) or 1
    for svc in services:
        first = True
        total = sum(vm["slots"] for vm in svc["vms"]) or size
        for vm in svc["vms"] or [None]:
            head = (svc["name"], _where(svc)) if first else ("", "")
            first = False
            if vm is None:
                table.add_row(*head, "-", "", "[red]no VM[/red]", "", "", "", "", "")
                continue
            share = f"{100 * vm['slots'] / total:.1f}%" if vm["slots"] else "0"
            since = time.strftime("%H:%M:%S", time.localtime(vm["since"])) if vm["since"] else ""
            detail = vm["detail"] + (f" (since {since})" if since else "")
            table.add_row(
                *head,
                vm["port"],
                str(vm["weight"]),
                _state(vm),
                vm["health"],
                vm["link"],
                share,
                str(vm["changes"]),
                detail,
            )
    console.print(table)


def _done(answer: dict[str, Any], client: ServicesClient, as_json: bool) -> None:
    if as_json:
        print(json.dumps(answer, indent=1))
    elif "vms" in answer:
        _print([answer], client.where)
    else:
        console.print(", ".join(f"{k}: {v}" for k, v in answer.items()), highlight=False)


# ---------------------------------------------------------------- commands


@click.group()
def service() -> None:
    """Virtual addresses served by pools of VMs (docs/services.md)."""


@service.command("list")
@_common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def list_(
    netns: str | None, config_path: Path | None, api_socket: Path | None, as_json: bool
) -> None:
    """Every service, its VMs and whether each gets new connections."""
    client = _client(netns, config_path, api_socket)
    services = client.all()
    if as_json:
        print(json.dumps(services, indent=1))
    else:
        _print(services, client.where)


@service.command()
@_common
@click.argument("name")
@click.option(
    "--address", metavar="IP", help="The virtual address (IPv4 or IPv6); needed for a new service."
)
@click.option(
    "--proto",
    type=click.Choice(["tcp", "udp", "icmp", "any"]),
    help="Protocol (default: tcp with --port, else any).",
)
@click.option(
    "--port", "ports", type=click.IntRange(1, 65535), multiple=True, help="Port (repeatable)."
)
@click.option(
    "--vm",
    "vms",
    multiple=True,
    metavar="PORT[:WEIGHT][@ADDRESS]",
    help="A VM: its port on the host, weight, address for checks (repeatable).",
)
@click.option(
    "--check",
    type=click.Choice(["tcp", "http", "none"]),
    help="Health check of this service's VMs.",
)
@click.option("--check-port", type=click.IntRange(1, 65535), help="Port the check uses.")
@click.option("--check-path", metavar="PATH", help="Path of the HTTP check.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def add(
    netns: str | None,
    config_path: Path | None,
    api_socket: Path | None,
    name: str,
    address: str | None,
    proto: str | None,
    ports: tuple[int, ...],
    vms: tuple[str, ...],
    check: str | None,
    check_port: int | None,
    check_path: str | None,
    as_json: bool,
) -> None:
    """Define service NAME, or (without --address) add VMs to it."""
    pool = [parse_vm(v) for v in vms]
    client = _client(netns, config_path, api_socket)
    if address is None:
        if proto or ports or check or check_port or check_path:
            raise ServiceError(
                "to change an existing service's address, protocol, ports or check, "
                "remove it and add it again (with --address)"
            )
        if not pool:
            raise ServiceError("give --address to define a service, or --vm to add VMs to one")
        answer = client.add_vms(name, [v.model_dump(exclude_none=True) for v in pool])
    else:
        definition: dict[str, Any] = {
            "name": name,
            "address": address,
            "ports": list(ports),
            "vms": [v.model_dump(exclude_none=True) for v in pool],
        }
        if proto:
            definition["proto"] = proto
        if check or check_port or check_path:
            health = {"type": check or "tcp", "port": check_port, "path": check_path or "/"}
            HealthCheck.model_validate(health)  # fail here, with the option's name in the message
            definition["health"] = health
        answer = client.add(definition)
    _done(answer, client, as_json)


@service.command()
@_common
@click.argument("name")
@click.argument("vms", nargs=-1, metavar="[VM]...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def remove(
    netns: str | None,
    config_path: Path | None,
    api_socket: Path | None,
    name: str,
    vms: tuple[str, ...],
    as_json: bool,
) -> None:
    """Remove service NAME (its connections are forgotten), or only the VMs
    named (their connections move to the others, or drop: on_vm_down)."""
    client = _client(netns, config_path, api_socket)
    answer = client.remove_vms(name, list(vms)) if vms else client.remove(name)
    _done(answer, client, as_json)


def _drain_command(verb: str, drained: bool, doc: str) -> None:
    """`service drain` and `service undrain`: one command each, one body."""

    @service.command(verb, help=doc)
    @_common
    @click.argument("name")
    @click.argument("vms", nargs=-1, required=True, metavar="VM...")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @friendly
    def command(
        netns: str | None,
        config_path: Path | None,
        api_socket: Path | None,
        name: str,
        vms: tuple[str, ...],
        as_json: bool,
    ) -> None:
        client = _client(netns, config_path, api_socket)
        _done(client.drain(name, list(vms), drained), client, as_json)


_drain_command("drain", True, "No new connections for these VMs; their connections stay.")
_drain_command("undrain", False, "Give drained VMs new connections again.")

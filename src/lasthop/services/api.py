"""The REST API of services: a FastAPI router over the agent's ServiceManager.

| method | path | body | answer |
| --- | --- | --- | --- |
| GET | /v1/services | | every service with its VMs' state |
| GET | /v1/services/{name} | | one service |
| POST | /v1/services | a service (as in the config) | 201, the service |
| DELETE | /v1/services/{name} | | ``{"removed": name, "forgotten": n}`` |
| POST | /v1/services/{name}/vms | ``[vm, ...]`` | the service |
| DELETE | /v1/services/{name}/vms?port=P&port=Q | | ``{"moved": n, "dropped": m}`` |
| POST | /v1/services/{name}/drain | ``{"vms": [port, ...]}`` | the service |
| POST | /v1/services/{name}/undrain | ``{"vms": [port, ...]}`` | the service |

Errors: 404 no such service or VM, 409 a name or address already taken,
422 an invalid definition (each with ``{"detail": "..."}``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from lasthop.errors import LasthopError
from lasthop.services.manager import ServiceManager
from lasthop.services.model import ServiceVm, validate_service

__all__ = ["ServicesHost", "router"]

PREFIX = "/v1/services"


class ServicesHost(Protocol):
    """What the routes need of the controller: its services."""

    @property
    def services(self) -> ServiceManager: ...


class VmList(BaseModel):
    vms: list[str]


class _Route(APIRoute):
    """A route that answers a LasthopError with its class's HTTP status (404
    no such service or VM, 409 taken, 422 invalid: lasthop.errors), so the
    app needs no handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except LasthopError as err:
                return JSONResponse({"detail": str(err)}, status_code=err.http_status)

        return handler


def router(controller: ServicesHost) -> APIRouter:
    """The routes over *controller*.services (a ServiceManager, looked up per
    request); every handler is one ServiceManager call."""
    r = APIRouter(prefix=PREFIX, tags=["services"], route_class=_Route)

    def manager() -> ServiceManager:
        return controller.services

    @r.get("")
    def list_services() -> list[dict[str, object]]:
        """Every service, its VMs and their state."""
        return [s.to_json() for s in manager().status()]

    @r.get("/{name}")
    def get_service(name: str) -> dict[str, object]:
        return manager().status(name)[0].to_json()

    @r.post("", status_code=201)
    def add_service(body: dict[str, Any]) -> dict[str, object]:
        """Defines a service: {"name", "address", "proto", "ports", "vms": [...], "health"}."""
        return manager().add(validate_service(body)).to_json()

    @r.delete("/{name}")
    def remove_service(name: str) -> dict[str, object]:
        """Removes a service; its connections are forgotten."""
        return {"removed": name, "forgotten": manager().remove(name)}

    @r.post("/{name}/vms")
    def add_vms(name: str, vms: list[ServiceVm]) -> dict[str, object]:
        """Adds VMs to the pool."""
        return manager().add_vms(name, vms).to_json()

    @r.delete("/{name}/vms")
    def remove_vms(name: str, port: Annotated[list[str], Query(min_length=1)]) -> dict[str, int]:
        """Takes VMs out of the pool; their connections move (or drop: on_vm_down)."""
        return manager().remove_vms(name, port)

    @r.post("/{name}/drain")
    def drain(name: str, body: VmList) -> dict[str, object]:
        """No new connections for these VMs; their connections stay."""
        return manager().set_drained(name, body.vms, True).to_json()

    @r.post("/{name}/undrain")
    def undrain(name: str, body: VmList) -> dict[str, object]:
        return manager().set_drained(name, body.vms, False).to_json()

    return r

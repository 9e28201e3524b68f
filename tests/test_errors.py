"""lasthop.errors: every error class carries its exit code and its HTTP
status, and the CLI, the REST API and the service CLI's client all take
them from there (no root needed)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from lasthop import api, errors
from lasthop import cli as cli_mod
from lasthop.api import create_app
from lasthop.errors import ERRORS, BpfError, LasthopError
from lasthop.services import api as service_api
from lasthop.services import cli as service_cli


def _subclasses(cls: type) -> set[type]:
    out = set(cls.__subclasses__())
    for sub in list(out):
        out |= _subclasses(sub)
    return out


def make(cls: type[LasthopError]) -> LasthopError:
    return BpfError("bpf_map_lookup_elem", 2) if cls is BpfError else cls("it broke")


def test_every_error_class_lives_in_errors_and_is_listed() -> None:
    """Each LasthopError subclass is defined in lasthop.errors and listed in ERRORS."""
    found = {c for c in _subclasses(LasthopError) if c.__module__.startswith("lasthop")}
    assert found | {LasthopError} == set(ERRORS)
    assert all(c.__module__ == "lasthop.errors" for c in ERRORS)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_class_has_an_exit_code_and_an_http_status(cls: type[LasthopError]) -> None:
    """An exit code documented in docs/cli.md (1-4) and an HTTP error status."""
    assert cls.exit_code in (
        errors.EXIT_FAILURE,
        errors.EXIT_USAGE,
        errors.EXIT_NOT_ATTACHED,
        errors.EXIT_NOT_FOUND,
    )
    assert isinstance(cls.http_status, int) and 400 <= cls.http_status < 600
    assert cls.prefix.endswith("error:")


def test_the_codes_are_those_docs_cli_md_lists() -> None:
    """The mapping as it was before the classes carried it."""
    table = {cls.__name__: (cls.exit_code, cls.http_status) for cls in ERRORS}
    assert table == {
        "LasthopError": (1, 500),
        "ConfigError": (2, 422),
        "FilterError": (2, 422),
        "NetnsError": (2, 500),
        "LinkError": (2, 500),
        "DatapathError": (1, 500),
        "NotAttachedError": (3, 503),
        "TableSizeError": (2, 500),
        "BpfError": (1, 500),
        "ApiError": (1, 500),
        "AgentError": (1, 500),
        "SyncError": (1, 503),
        "ServiceError": (2, 422),
        "ServiceNotFound": (4, 404),
        "ServiceConflict": (2, 409),
    }


def test_the_adapters_keep_no_mapping_of_their_own() -> None:
    """No sys.exit or status code in the CLIs and API modules: they ask the error."""
    for module in (cli_mod, service_cli):
        assert "sys.exit(" not in inspect.getsource(module)
    for module in (api, service_api):
        source = inspect.getsource(module)
        assert "status_code=err.http_status" in source
        assert not any(f"status_code={n}" in source for n in (404, 409, 422, 500, 503))


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_the_cli_exits_with_the_class_code(
    cls: type[LasthopError], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lasthop show` and `lasthop service list` exit with the error's code, one line on stderr."""

    class Broken:
        def iter_connections(self, where: Any = None, *, limit: int = 0) -> Any:
            raise make(cls)

        def all(self) -> Any:
            raise make(cls)

    monkeypatch.setattr(cli_mod, "_controller", lambda *a: Broken())
    monkeypatch.setattr(service_cli, "_client", lambda *a: Broken())
    for args in (["show"], ["service", "list"]):
        result = CliRunner().invoke(cli_mod.cli, args)
        assert result.exit_code == cls.exit_code, result.output
        assert result.stderr.startswith(f"{cls.prefix} "), result.stderr


def test_the_cli_exits_1_on_any_other_os_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def iter_connections(self, where: Any = None, *, limit: int = 0) -> Any:
            raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(cli_mod, "_controller", lambda *a: Broken())
    result = CliRunner().invoke(cli_mod.cli, ["show"])
    assert result.exit_code == errors.EXIT_FAILURE
    assert result.stderr.startswith("error: ")


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_the_api_answers_with_the_class_status(cls: type[LasthopError]) -> None:
    """/v1/stats and /v1/services answer the error's status, the message as detail."""

    class Manager:
        def status(self, name: str | None = None) -> Any:
            raise make(cls)

    class Broken:
        netns = "test"
        services = Manager()

        def stats(self) -> Any:
            raise make(cls)

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(Broken()))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://lasthop") as client:
            return await client.get(path)

    for path in ("/v1/stats", "/v1/services"):
        resp = asyncio.run(get(path))
        assert resp.status_code == cls.http_status
        assert resp.json() == {"detail": str(make(cls))}


@pytest.mark.parametrize(
    "cls",
    [errors.ServiceError, errors.ServiceNotFound, errors.ServiceConflict],
    ids=lambda c: c.__name__,
)
def test_the_service_client_reads_the_status_back(cls: type[LasthopError]) -> None:
    """An agent's answer of a class's status is that class again, for `lasthop service`."""
    err = errors.from_answer(cls.http_status, "why")
    assert type(err) is cls and str(err) == "why"


def test_other_answers_are_agent_errors() -> None:
    assert type(errors.from_answer(400, "bad")) is errors.ServiceError
    err = errors.from_answer(500, "boom")
    assert type(err) is errors.AgentError and str(err) == "the agent answered 500: boom"

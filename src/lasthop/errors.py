"""Every error lasthop raises on purpose, and what it becomes: each class
carries its exit code (the CLI, docs/cli.md) and its HTTP status (the REST
API), so no adapter keeps a mapping of its own.

    class                                   exit  HTTP  raised when
    LasthopError                               1   500  (the root)
    ├── ConfigError (ValueError)               2   422  the config is invalid (reload)
    ├── FilterError (ValueError)               2   422  a `show` filter is invalid
    ├── NetnsError (OSError)                   2   500  a namespace cannot be entered
    ├── LinkError (LookupError)                2   500  a named interface is missing
    ├── DatapathError (RuntimeError)           1   500  the data path cannot be loaded or attached
    │   ├── NotAttachedError                   3   503  nothing is pinned in this namespace
    │   └── TableSizeError                     2   500  table_size differs from the pinned table's
    ├── BpfError (OSError)                     1   500  a libbpf or bpf(2) call failed
    ├── ApiError (OSError)                     1   500  the API cannot listen
    ├── AgentError (OSError)                   1   500  the agent's API did not answer (CLI side)
    ├── SyncError (OSError)                    1   503  sync is off, or its store cannot be reached
    └── ServiceError (ValueError)              2   422  a service definition or change is invalid
        ├── ServiceNotFound (LookupError)      4   404  no such service or VM
        └── ServiceConflict                    2   409  a name or address already taken

Each class also keeps the built-in base it had, so ``except OSError`` and
pydantic's handling of ``ValueError`` in validators work as before. Any
other ``OSError`` (netlink, a socket) exits 1 like a LasthopError.
"""

from __future__ import annotations

import os
import sys
from functools import wraps

TYPE_CHECKING = False  # typing's, without importing typing (~12 ms of `lasthop stats`)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_NOT_ATTACHED",
    "EXIT_NOT_FOUND",
    "LasthopError",
    "fail",
    "ConfigError",
    "FilterError",
    "NetnsError",
    "LinkError",
    "DatapathError",
    "NotAttachedError",
    "TableSizeError",
    "BpfError",
    "ApiError",
    "AgentError",
    "SyncError",
    "ServiceError",
    "ServiceNotFound",
    "ServiceConflict",
    "ERRORS",
    "exit_code",
    "friendly",
    "from_answer",
]

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_ATTACHED, EXIT_NOT_FOUND = 1, 2, 3, 4


class LasthopError(Exception):
    """The root: a failure lasthop expects and explains in one line."""

    exit_code = EXIT_FAILURE
    http_status = 500
    prefix = "error:"  # how the CLI's line on stderr starts


class ConfigError(LasthopError, ValueError):
    """The configuration is invalid; the message names the key and why."""

    exit_code = EXIT_USAGE
    http_status = 422  # POST /v1/reload with a bad config
    prefix = "config error:"


class FilterError(LasthopError, ValueError):
    """A `show` filter (or the API's query) is not valid: the message names it."""

    exit_code = EXIT_USAGE
    http_status = 422


class NetnsError(LasthopError, OSError):
    """A namespace could not be entered or the bpffs not be found."""

    exit_code = EXIT_USAGE


class LinkError(LasthopError, LookupError):
    """An interface named in the config or on the command line is missing."""

    exit_code = EXIT_USAGE


class DatapathError(LasthopError, RuntimeError):
    """The data path is missing, or cannot be loaded or attached."""


class NotAttachedError(DatapathError):
    """Nothing is pinned in this namespace: no agent ever attached here (or detach ran)."""

    exit_code = EXIT_NOT_ATTACHED
    http_status = 503


class TableSizeError(DatapathError):
    """The config's table_size differs from the size of the pinned table."""

    exit_code = EXIT_USAGE


class BpfError(LasthopError, OSError):
    """A libbpf or bpf(2) call failed."""

    prefix = "kernel error:"

    def __init__(self, call: str, err: int, detail: str = "") -> None:
        err = abs(err)
        text = f"{call}: {os.strerror(err)} (errno {err})"
        if detail:
            text += f"\n{detail}"
        super().__init__(err, text)
        self.call = call


class ApiError(LasthopError, OSError):
    """The API cannot listen where it was asked to."""


class AgentError(LasthopError, OSError):
    """The agent's API could not be reached or answered with a server error."""


class SyncError(LasthopError, OSError):
    """Sync is not configured here, or its store (Redis) cannot be reached."""

    http_status = 503


class ServiceError(LasthopError, ValueError):
    """A service definition or change is invalid."""

    exit_code = EXIT_USAGE
    http_status = 422


class ServiceNotFound(ServiceError, LookupError):
    """No such service, or no such VM in its pool."""

    exit_code = EXIT_NOT_FOUND
    http_status = 404


class ServiceConflict(ServiceError):
    """The change collides with what exists (a name or an address already taken)."""

    http_status = 409


ERRORS: tuple[type[LasthopError], ...] = (
    LasthopError,
    ConfigError,
    FilterError,
    NetnsError,
    LinkError,
    DatapathError,
    NotAttachedError,
    TableSizeError,
    BpfError,
    ApiError,
    AgentError,
    SyncError,
    ServiceError,
    ServiceNotFound,
    ServiceConflict,
)


def exit_code(err: LasthopError | OSError) -> int:
    """The CLI's exit code for *err*: its class's; any other OSError (netlink, a socket) 1."""
    return err.exit_code if isinstance(err, LasthopError) else EXIT_FAILURE


def friendly(fn: F) -> F:
    """A CLI command whose expected failures (a LasthopError or an OSError)
    end it with one line on stderr, ``<prefix> <message>``, and the exit code
    of the error's class."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LasthopError, OSError) as err:
            fail(err)

    return wrapper  # type: ignore[return-value]


def fail(err: LasthopError | OSError) -> NoReturn:
    """Ends the command: ``<prefix> <message>`` on stderr, the exit code of *err*'s class."""
    from rich.console import Console  # only when there is an error to print

    head = err.prefix if isinstance(err, LasthopError) else LasthopError.prefix
    Console(stderr=True, emoji=False).print(f"[red]{head}[/red] {err}", highlight=False)
    sys.exit(exit_code(err))


# What an answer of the services API means to its client (the reverse of http_status).
_ANSWERS: tuple[type[ServiceError], ...] = (ServiceNotFound, ServiceConflict, ServiceError)


def from_answer(status: int, detail: str) -> LasthopError:
    """The error an answer of *status* from the agent's services API stands
    for: the ServiceError with that status (400, a malformed request, too),
    else an AgentError."""
    for cls in _ANSWERS:
        if status == cls.http_status or (status == 400 and cls is ServiceError):
            return cls(detail)
    return AgentError(f"the agent answered {status}: {detail}")

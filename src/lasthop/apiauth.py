"""Who may drive the REST API, and who did.

- The unix socket: whoever may open it (root, and the members of
  ``api_socket_group``: mode 0660) may read and write; the caller is named by
  its uid (SO_PEERCRED).
- TCP: with an ``api_tokens`` file, every request carries
  ``Authorization: Bearer TOKEN``; a ``read`` token may only GET, a
  ``write`` token may change things too. Without a file the agent serves TCP
  only on a loopback address (lasthop.config refuses any other).

The token file is TOML, readable by its owner only::

    [[token]]
    name = "prometheus"    # who: named in the log of every write
    access = "read"        # read | write
    secret = "..."         # 16 characters or more (openssl rand -hex 32)
"""

from __future__ import annotations

import hmac
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lasthop import configfile
from lasthop.errors import ConfigError

__all__ = ["Caller", "Refused", "Token", "Tokens", "READ_METHODS", "MIN_SECRET"]

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_SECRET = 16
Access = Literal["read", "write"]


@dataclass(frozen=True)
class Token:
    name: str
    access: Access
    secret: str


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a token's name, "uid N" (unix socket), or an address."""

    who: str
    access: Access


class Refused(Exception):
    """A request the API does not serve: its HTTP status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Tokens:
    """The tokens of an ``api_tokens`` file (none: no file)."""

    def __init__(self, tokens: list[Token], path: Path | None = None) -> None:
        self.tokens = tokens
        self.path = path

    @classmethod
    def load(cls, path: Path | None) -> Tokens:
        """Reads and checks *path*; ConfigError naming the file, the entry and the problem."""
        if path is None:
            return cls([])
        where = f"api_tokens: {path}"
        try:
            mode = path.stat().st_mode
        except OSError as err:
            raise ConfigError(f"{where}: cannot read: {err.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{where}: group or others may read it (mode {stat.S_IMODE(mode):04o}): "
                f"chmod 600 {path}"
            )
        data = configfile.read(path)
        unknown = set(data) - {"token"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected [[token]])")
        entries = data.get("token", [])
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: no [[token]] entries")
        tokens: list[Token] = []
        for n, entry in enumerate(entries):
            tokens.append(_token(entry, f"{where}: token[{n}]"))
        names = [t.name for t in tokens]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"{where}: token name {name!r} used twice")
        return cls(tokens, path)

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def find(self, secret: str) -> Token | None:
        found = None
        for token in self.tokens:  # every one compared: the time says nothing of which
            if hmac.compare_digest(token.secret.encode(), secret.encode()):
                found = token
        return found

    def caller(
        self, *, method: str, authorization: str | None, peer: str | None, unix: bool
    ) -> Caller:
        """Who sends this request, allowed to send it; else :class:`Refused`."""
        if authorization is not None or (not unix and self.required):
            caller = self._bearer(authorization)
        elif unix:
            caller = Caller(peer or "unix socket", "write")  # the socket's mode is the check
        else:
            caller = Caller(peer or "tcp", "write")  # loopback only (lasthop.config)
        if method.upper() not in READ_METHODS and caller.access != "write":
            raise Refused(
                403, f"token {caller.who!r} is read-only: {method.upper()} needs a write token"
            )
        return caller

    def _bearer(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Refused(401, "the API over TCP needs a token: Authorization: Bearer TOKEN")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Refused(401, "Authorization must be 'Bearer TOKEN'")
        token = self.find(secret.strip())
        if token is None:
            raise Refused(401, "unknown token")
        return Caller(token.name, token.access)


def _token(entry: object, where: str) -> Token:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table (name, access, secret)")
    unknown = set(entry) - {"name", "access", "secret"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for key in ("name", "access", "secret"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}: key {key!r} missing or not a string")
    if entry["access"] not in ("read", "write"):
        raise ConfigError(f"{where}: key 'access' must be read or write, got {entry['access']!r}")
    if len(entry["secret"]) < MIN_SECRET:
        raise ConfigError(f"{where}: key 'secret' is shorter than {MIN_SECRET} characters")
    return Token(entry["name"], entry["access"], entry["secret"])

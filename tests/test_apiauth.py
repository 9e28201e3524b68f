"""Who may drive the REST API (lasthop.apiauth, lasthop.api's middleware):
the token file's refusals, and each refused request with the message that
names the problem. The API is driven through FastAPI's test client, which
comes in as TCP from 'testclient'; the unix socket's side is in
tests/agent/test_ops.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lasthop.api import create_app
from lasthop.apiauth import Tokens
from lasthop.config import Config, load
from lasthop.controller import Attached
from lasthop.errors import ConfigError

READER, WRITER = "r" * 32, "w" * 32
TOKENS = f"""
[[token]]
name = "grafana"
access = "read"
secret = "{READER}"

[[token]]
name = "ops"
access = "write"
secret = "{WRITER}"
"""


class FakeController:
    """The two calls these requests reach."""

    netns = "test"

    def __init__(self) -> None:
        self.flushed = 0

    def attached_now(self) -> Attached:
        return Attached({1: "up0"}, {})

    def flush(self) -> int:
        self.flushed += 1
        return 7


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens.load(write(tmp_path / "tokens.toml", TOKENS))


def client(tokens: Tokens | None) -> tuple[TestClient, FakeController]:
    controller = FakeController()
    return TestClient(create_app(controller, tokens=tokens)), controller  # type: ignore[arg-type]


def test_no_token_over_tcp_is_refused_naming_the_header(tokens: Tokens) -> None:
    """With a token file, a TCP request without Authorization gets 401 and says what it needs."""
    c, _ = client(tokens)
    r = c.get("/healthz")
    assert r.status_code == 401
    assert "Authorization: Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_an_unknown_token_is_refused(tokens: Tokens) -> None:
    c, _ = client(tokens)
    r = c.get("/healthz", headers={"Authorization": "Bearer " + "x" * 32})
    assert (r.status_code, r.json()["detail"]) == (401, "unknown token")


def test_a_scheme_other_than_bearer_is_refused(tokens: Tokens) -> None:
    c, _ = client(tokens)
    r = c.get("/healthz", headers={"Authorization": "Basic " + WRITER})
    assert r.status_code == 401 and "Bearer TOKEN" in r.json()["detail"]


def test_a_read_token_reads_but_may_not_write(tokens: Tokens) -> None:
    """A read token GETs; its POST is refused (403) naming the token, and nothing is flushed."""
    c, controller = client(tokens)
    auth = {"Authorization": f"Bearer {READER}"}
    assert c.get("/healthz", headers=auth).status_code == 200
    r = c.post("/v1/flush", headers=auth)
    assert r.status_code == 403
    assert r.json()["detail"] == "token 'grafana' is read-only: POST needs a write token"
    assert controller.flushed == 0


def test_a_write_token_writes_and_the_write_is_logged_with_who(
    tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    c, controller = client(tokens)
    with caplog.at_level(logging.INFO, logger="lasthop"):
        r = c.post("/v1/flush", headers={"Authorization": f"Bearer {WRITER}"})
    assert r.json() == {"flushed": 7} and controller.flushed == 1
    writes = [rec for rec in caplog.records if rec.getMessage() == "api_write"]
    assert len(writes) == 1
    fields = writes[0].lasthop_fields  # type: ignore[attr-defined]
    assert (fields["who"], fields["method"], fields["path"], fields["status"]) == (
        "ops",
        "POST",
        "/v1/flush",
        200,
    )


def test_without_a_token_file_loopback_tcp_is_served_as_before() -> None:
    c, controller = client(None)
    assert c.post("/v1/flush").status_code == 200 and controller.flushed == 1


# -- the token file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        (TOKENS, 0o644, "group or others may read it (mode 0644): chmod 600"),
        ("[[token]]\nname='a'\naccess='admin'\nsecret='" + "s" * 20 + "'\n", 0o600,
         "token[0]: key 'access' must be read or write, got 'admin'"),
        ("[[token]]\nname='a'\naccess='read'\nsecret='short'\n", 0o600,
         "token[0]: key 'secret' is shorter than 16 characters"),
        ("[[token]]\nname='a'\naccess='read'\n", 0o600,
         "token[0]: key 'secret' missing or not a string"),
        (TOKENS + "\n[[token]]\nname='ops'\naccess='read'\nsecret='" + "q" * 20 + "'\n", 0o600,
         "token name 'ops' used twice"),
        ("[[tokens]]\nname='a'\n", 0o600, "unknown key 'tokens'"),
        ("", 0o600, "no [[token]] entries"),
        ("[[token]\n", 0o600, "not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_token_file_is_refused_naming_the_problem(
    tmp_path: Path, text: str, mode: int, message: str
) -> None:
    path = write(tmp_path / "tokens.toml", text, mode)
    with pytest.raises(ConfigError) as err:
        Tokens.load(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_a_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_tokens: .*nope.toml: cannot read"):
        Tokens.load(tmp_path / "nope.toml")


# -- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["0.0.0.0:9180", "10.1.2.3:9180", "[::]:9180", "myhost:9180"])
def test_a_non_loopback_api_without_tokens_is_refused_naming_the_key(
    tmp_path: Path, api: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'api = "{api}"\n')
    with pytest.raises(ConfigError) as err:
        load(cfg)
    assert f"key 'api': Value error, refusing to serve the API on {api}" in str(err.value)
    assert "api_tokens" in str(err.value)


@pytest.mark.parametrize("api", ["127.0.0.1:9180", "[::1]:9180", "localhost:9180"])
def test_a_loopback_api_needs_no_tokens(api: str) -> None:
    assert Config(api=api).api == api


def test_a_non_loopback_api_with_tokens_is_accepted(tmp_path: Path) -> None:
    assert Config(api="0.0.0.0:9180", api_tokens=tmp_path / "t.toml").api == "0.0.0.0:9180"


def test_an_unknown_socket_group_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'api_socket_group': .*no group named 'nosuchgrp'"):
        Config().merged(api_socket_group="nosuchgrp")

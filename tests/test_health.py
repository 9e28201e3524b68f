"""lasthop.services.health: the TCP and HTTP checks against real local servers, and the
monitor that runs them on each VM's interval and reports to the manager."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lasthop.errors import NotAttachedError
from lasthop.services.health import (
    CheckResult,
    HealthMonitor,
    Target,
    check_http,
    check_tcp,
    targets,
)
from lasthop.services.manager import ServiceManager
from lasthop.services.model import HealthCheck, Service


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        code = {"/ok": 200, "/moved": 302, "/slow": 200}.get(self.path, 503)
        if self.path == "/slow":
            time.sleep(1.0)
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"hi")

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client that timed out on /slow closed first: nothing to report


@pytest.fixture
def http_port() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Handler)
    # shutdown() waits for the loop's next look at its flag: every 0.05 s, not 0.5
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_check_passes_when_the_port_accepts(http_port: int) -> None:
    result = check_tcp("127.0.0.1", http_port, 1.0)
    assert result.ok and result.detail.startswith(f"tcp 127.0.0.1:{http_port}: connected")


def test_tcp_check_fails_when_refused() -> None:
    port = _closed_port()
    assert check_tcp("127.0.0.1", port, 1.0) == CheckResult(
        False, f"tcp 127.0.0.1:{port}: connection refused"
    )


@pytest.mark.parametrize(
    ("path", "ok", "status"),
    [
        ("/ok", True, "200 OK"),
        ("/moved", True, "302 Found"),
        ("/bad", False, "503 Service Unavailable"),
    ],
)
def test_http_check_wants_2xx_or_3xx(http_port: int, path: str, ok: bool, status: str) -> None:
    assert check_http("127.0.0.1", http_port, path, 1.0) == CheckResult(
        ok, f"GET http://127.0.0.1:{http_port}{path}: {status}"
    )


def test_http_check_times_out(http_port: int) -> None:
    result = check_http("127.0.0.1", http_port, "/slow", 0.2)
    assert result == CheckResult(False, f"GET http://127.0.0.1:{http_port}/slow: timed out")


def test_http_check_of_a_closed_port_fails() -> None:
    assert not check_http("127.0.0.1", _closed_port(), "/", 1.0).ok


# ---------------------------------------------------------------- the monitor


@contextlib.contextmanager
def _no_maps() -> Iterator[None]:
    raise NotAttachedError("nothing pinned")
    yield  # pragma: no cover


@pytest.fixture
def manager(tmp_path: Path) -> ServiceManager:
    m = ServiceManager("test", _no_maps, path=tmp_path / "s.json")  # type: ignore[arg-type]
    m.default_health = HealthCheck(interval=1.0, fall=1, rise=1)
    m.add(
        Service.model_validate(
            {
                "name": "web",
                "address": "192.0.2.100",
                "ports": [80],
                "vms": [
                    {"port": "vm1", "address": "10.2.0.11"},
                    {"port": "vm2", "address": "10.2.0.12"},
                    {"port": "vm3"},
                ],  # no address: not checked
            }
        )
    )
    m.add(
        Service.model_validate(
            {
                "name": "quiet",
                "address": "192.0.2.101",
                "health": {"type": "none"},
                "vms": [{"port": "vm1", "address": "10.2.0.11"}],
            }
        )
    )
    return m


def test_targets_are_the_vms_with_an_address_and_a_check(manager: ServiceManager) -> None:
    assert [(t.service, t.port, t.address, t.check.port) for t in targets(manager)] == [
        ("web", "vm1", "10.2.0.11", 80),
        ("web", "vm2", "10.2.0.12", 80),
    ]


def test_monitor_checks_each_vm_on_its_interval_and_reports(manager: ServiceManager) -> None:
    """Checks run on the pool; results reach the manager on the next tick; a VM
    is checked again only after its interval."""
    calls: list[str] = []

    def fake(target: Target) -> CheckResult:
        calls.append(target.port)
        return CheckResult(target.port == "vm1", "fake")

    mon = HealthMonitor(manager, check=fake)
    try:
        mon.tick(100.0)
        _wait(lambda: len(calls) == 2)
        _wait(lambda: all(f.done() for f in mon._running.values()))  # both results ready
        mon.tick(100.5)  # collects; nothing due yet
        assert sorted(calls) == ["vm1", "vm2"]
        assert manager.health_of("web", "vm1").status == "up"
        assert manager.health_of("web", "vm2").status == "unhealthy"
        mon.tick(101.0)  # due again
        _wait(lambda: len(calls) == 4)
    finally:
        mon.stop()
    st = {v.port: v for v in manager.status("web")[0].vms}
    assert (st["vm2"].serving, st["vm2"].detail, st["vm2"].changes) == (False, "fake", 1)


def test_a_check_that_raises_is_a_failure(manager: ServiceManager) -> None:
    def boom(target: Target) -> CheckResult:
        raise RuntimeError("bad check")

    mon = HealthMonitor(manager, check=boom)
    try:
        mon.tick(0.0)
        _wait(lambda: all(f.done() for f in mon._running.values()))
        mon.tick(0.1)
    finally:
        mon.stop()
    h = manager.health_of("web", "vm1")
    assert (h.status, h.detail) == ("unhealthy", "check failed: bad check")


def _wait(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

"""Health checks of the services' VMs, run by the agent.

Each VM with an ``address`` is checked every ``interval`` seconds from the
agent's network namespace: a TCP connect, or an HTTP GET whose status must
be 2xx or 3xx. Results go to :meth:`ServiceManager.report`, which applies
the thresholds (``rise``, ``fall``, ``down_after``), logs and counts every
change and rebuilds the service's table. The same loop re-reads the VM
ports' link states, so a VM whose port goes down or away is down at once.

Checks run on a small thread pool, so a slow VM never delays the others.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from lasthop.endpoint import format_endpoint
from lasthop.services.manager import ServiceManager
from lasthop.services.model import HealthCheck

__all__ = ["CheckResult", "HealthMonitor", "Target", "check_http", "check_tcp", "run_check"]

log = logging.getLogger("lasthop")
MAX_WORKERS = 16
LINK_EVERY = 1.0  # seconds between reads of the VM ports' link states


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Target:
    """One VM of one service, and how to check it."""

    service: str
    port: str  # the VM port (its name on the host)
    address: str
    check: HealthCheck


def check_tcp(address: str, port: int, timeout: float) -> CheckResult:
    """Healthy when a TCP connection to address:port opens within *timeout*."""
    start = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout):
            pass
    except OSError as err:
        return CheckResult(False, f"tcp {format_endpoint(address, port)}: {_reason(err)}")
    ms = (time.monotonic() - start) * 1000
    return CheckResult(True, f"tcp {format_endpoint(address, port)}: connected in {ms:.0f} ms")


def check_http(address: str, port: int, path: str, timeout: float) -> CheckResult:
    """Healthy when GET path answers 2xx or 3xx within *timeout*."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    url = f"http://{format_endpoint(address, port)}{path}"
    try:
        conn.request("GET", path, headers={"User-Agent": "lasthop-health", "Connection": "close"})
        resp = conn.getresponse()
        resp.read(65536)
    except (OSError, http.client.HTTPException) as err:
        return CheckResult(False, f"GET {url}: {_reason(err)}")
    finally:
        conn.close()
    return CheckResult(200 <= resp.status < 400, f"GET {url}: {resp.status} {resp.reason}")


def run_check(target: Target) -> CheckResult:
    check = target.check
    assert check.port is not None
    if check.type == "http":
        return check_http(target.address, check.port, check.path, check.timeout)
    return check_tcp(target.address, check.port, check.timeout)


def _reason(err: BaseException) -> str:
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def targets(manager: ServiceManager) -> list[Target]:
    """Every VM that has an address and a check."""
    out = []
    for svc in manager.services:
        check = svc.check(manager.default_health)
        if check.type == "none":
            continue
        out += [Target(svc.name, vm.port, vm.address, check) for vm in svc.vms if vm.address]
    return out


class HealthMonitor:
    """Checks every VM on its interval and keeps the link states fresh, in a
    thread of its own (started after the process entered its namespace:
    threads inherit the namespace of the thread that starts them)."""

    def __init__(
        self, manager: ServiceManager, *, check: Callable[[Target], CheckResult] = run_check
    ) -> None:
        self.manager = manager
        self._check = check
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=MAX_WORKERS, thread_name_prefix="lasthop-health"
        )
        self._due: dict[tuple[str, str], float] = {}
        self._running: dict[tuple[str, str], Future[CheckResult]] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lasthop-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        next_links = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_links:
                    self.manager.refresh_links()
                    next_links = now + LINK_EVERY
                self.tick(now)
            except Exception:  # a bad pass must not end the checks
                log.exception("health checks: pass failed")
            self._stop.wait(0.1)

    def tick(self, now: float) -> None:
        """Starts the checks that are due and reports the ones that finished."""
        wanted = {(t.service, t.port): t for t in targets(self.manager)}
        for key, future in list(self._running.items()):
            if future.done():
                del self._running[key]
                if key in wanted and not future.cancelled():
                    result = future.result()
                    self.manager.report(key[0], key[1], result.ok, result.detail)
        for key in list(self._due):
            if key not in wanted:
                del self._due[key]
        for key, target in wanted.items():
            if key in self._running or now < self._due.get(key, 0.0):
                continue
            self._due[key] = now + target.check.interval
            self._running[key] = self._pool.submit(self._safe_check, target)

    def _safe_check(self, target: Target) -> CheckResult:
        try:
            return self._check(target)
        except Exception as err:  # a check that raises is a failed check
            return CheckResult(False, f"check failed: {err}")

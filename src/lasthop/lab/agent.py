"""Running lasthop in the lab: the one place that knows the agent's command
line contract.

    <python> -m lasthop run --netns <lab>-host --uplink up0
            (--vm-port vmN ... | --bridge br0) [--routed]
        prints a line starting with "lasthop: attached" once the data path is
        attached; stops on SIGTERM, leaving the data path attached.
    <python> -m lasthop detach --netns <lab>-host
    <python> -m lasthop show --netns <lab>-host --json
        a JSON list of objects with keys including proto, src, dst, sport,
        dport, mac, uplink, zone, vlan, age_s, packets, vm_port, flags.
    <python> -m lasthop service list|drain|... --netns <lab>-host [--json]
        list --json: a JSON list of services (name, id, address, ports,
        vms: a list of objects with port, ifindex, health, serving, changes).
    <python> -m lasthop stats --netns <lab>-host --json
        an object with "totals": counter name -> value.
"""

from __future__ import annotations

import importlib.util
import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lasthop.lab import plan as P
from lasthop.lab import state
from lasthop.lab.namespaces import LabError, run

__all__ = [
    "READY_PREFIX",
    "available",
    "LasthopAgent",
    "command",
    "detach",
    "show",
    "services",
    "stats",
]

READY_PREFIX = "lasthop: attached"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def available() -> bool:
    """Whether the lasthop agent is built (its controller module importable)."""
    try:
        return importlib.util.find_spec("lasthop.controller") is not None
    except ImportError:
        return False


def _lasthop(*args: str) -> list[str]:
    return [sys.executable, "-m", "lasthop", *args]


class LasthopAgent:
    """`lasthop run` on the lab's host, as a subprocess."""

    def __init__(self, plan: P.Plan, *, bridge: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.plan = plan
        self.bridge = bridge
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""

    def argv(self, vms: list[int] | None = None) -> list[str]:
        host = self.plan.host
        args = ["run", "--netns", host.ns, "--uplink", host.uplink]
        if self.bridge:
            args += ["--bridge", host.bridge]
        else:
            for n in self.plan.vms if vms is None else vms:
                args += ["--vm-port", self.plan.vm(n).port]
        if self.plan.routed:
            args.append("--routed")
        return _lasthop(*args, *self.extra)

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Starts the agent and waits for its "attached" line; returns that line."""
        if self.proc and self.proc.poll() is None:
            raise LabError("the lasthop agent is already running")
        log_path = state.folder(self.plan.name) / "lasthop.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._record(self.proc.pid)
        try:
            buf = self._wait_ready(timeout, log_path)
        except BaseException:  # interrupted or failed: no agent left behind
            self.stop()
            raise
        self.ready_line = buf.decode(errors="replace").strip()
        # Keep reading its stdout so the agent never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
        return self.ready_line

    def _wait_ready(self, timeout: float, log_path: Path) -> bytes:
        """Reads the agent's stdout until its "attached" line; returns that line."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                argv = " ".join(self.argv())
                raise LabError(f"lasthop did not attach within {timeout:.0f} s ({argv})")
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise LabError(f"lasthop run exited ({code}) before attaching: {' / '.join(tail)}")
            if line.decode(errors="replace").startswith(READY_PREFIX):
                return line

    @staticmethod
    def _drain(stream: Any) -> None:
        while stream.read(4096):
            pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM: the agent stops, leaving the data path attached. Returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._record(0)
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _record(self, pid: int) -> None:
        st = state.load(self.plan.name)
        if st is not None:
            st.agent_pid = pid
            state.save(st)

    def __enter__(self) -> LasthopAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        detach(self.plan)


def command(plan: P.Plan, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`lasthop <args> --netns <lab>-host`; with check, a LabError when it fails."""
    return run(_lasthop(*args, "--netns", plan.host.ns), check=check)


def _json(plan: P.Plan, *args: str, kind: type) -> Any:
    out = json.loads(command(plan, *args, "--json").stdout)
    if not isinstance(out, kind):
        what = " ".join(args)
        raise LabError(
            f"lasthop {what} --json: expected a {kind.__name__}, got {type(out).__name__}"
        )
    return out


def detach(plan: P.Plan) -> None:
    """Removes lasthop from the lab's host (programs and pinned table)."""
    command(plan, "detach", check=False)


def show(plan: P.Plan, *filters: str) -> list[dict[str, Any]]:
    """The connection table of lasthop on the lab's host; *filters* are
    `lasthop show` options ("--state", "tcp_established", ...)."""
    rows: list[dict[str, Any]] = _json(plan, "show", *filters, kind=list)
    return rows


def services(plan: P.Plan) -> dict[str, dict[str, Any]]:
    """The services on the lab's host (`lasthop service list --json`), by name."""
    return {s["name"]: s for s in _json(plan, "service", "list", kind=list)}


def stats(plan: P.Plan) -> dict[str, Any]:
    """lasthop's counters on the lab's host (`lasthop stats --json`)."""
    out: dict[str, Any] = _json(plan, "stats", kind=dict)
    return out

"""Running lasthop as a subprocess: the one place that knows the agent's
command line contract (used by the lab, the benches and the tests).

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
    "AgentProcess",
    "AgentRunner",
    "available",
    "lasthop_argv",
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


def lasthop_argv(*args: str) -> list[str]:
    """The command line of `lasthop ARGS` with this interpreter."""
    return [sys.executable, "-m", "lasthop", *args]


class AgentProcess:
    """An agent's command line (`lasthop run ...`, or any wrapper of it) as a
    subprocess: started, waited for until it prints its "attached" line, and
    stopped by SIGTERM. Its stderr goes to *log*; its stdout is drained."""

    def __init__(self, argv: list[str], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Starts the agent and waits for its "attached" line; returns that line."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Starts the agent without waiting for it to attach."""
        if self.running:
            raise LabError("the lasthop agent is already running")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self._started(self.proc.pid)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Waits for the spawned agent's "attached" line; returns that line.
        On failure or interruption, the agent is stopped."""
        assert self.proc is not None
        try:
            buf = self._wait_ready(timeout)
        except BaseException:  # interrupted or failed: no agent left behind
            self.stop()
            raise
        self.ready_line = buf.decode(errors="replace").strip()
        # Keep reading its stdout so the agent never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
        return self.ready_line

    def _wait_ready(self, timeout: float) -> bytes:
        """Reads the agent's stdout until its "attached" line; returns that line."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                argv = " ".join(self.argv)
                raise LabError(f"lasthop did not attach within {timeout:.0f} s ({argv})")
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                tail = self.stderr.strip().splitlines()[-5:]
                raise LabError(f"lasthop run exited ({code}) before attaching: {' / '.join(tail)}")
            if line.decode(errors="replace").startswith(READY_PREFIX):
                return line

    def _started(self, pid: int) -> None:
        """Called with the agent's pid as soon as it runs (a hook for subclasses)."""

    @staticmethod
    def _drain(stream: Any) -> None:
        while stream.read(4096):
            pass

    @property
    def stderr(self) -> str:
        """What the agent wrote to stderr so far (its log)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM: the agent stops, leaving the data path attached; killed if
        it does not stop within *timeout*. Returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class AgentRunner(AgentProcess):
    """`lasthop run` on the lab's host, as a subprocess (its pid recorded in
    the lab's state, its stderr in the lab's lasthop.log)."""

    def __init__(self, plan: P.Plan, *, bridge: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.plan = plan
        self.bridge = bridge
        self.extra = extra
        super().__init__(self.command_line(), state.folder(plan.name) / "lasthop.log")

    def command_line(self, vms: list[int] | None = None) -> list[str]:
        host = self.plan.host
        args = ["run", "--netns", host.ns, "--uplink", host.uplink]
        if self.bridge:
            args += ["--bridge", host.bridge]
        else:
            for n in self.plan.vms if vms is None else vms:
                args += ["--vm-port", self.plan.vm(n).port]
        if self.plan.routed:
            args.append("--routed")
        return lasthop_argv(*args, *self.extra)

    def _started(self, pid: int) -> None:
        self._record(pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        code = super().stop(timeout)
        if self.proc is not None:
            self._record(0)
        return code

    def _record(self, pid: int) -> None:
        st = state.load(self.plan.name)
        if st is not None:
            st.agent_pid = pid
            state.save(st)

    def __enter__(self) -> AgentRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        detach(self.plan)


def command(plan: P.Plan, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`lasthop <args> --netns <lab>-host`; with check, a LabError when it fails."""
    return run(lasthop_argv(*args, "--netns", plan.host.ns), check=check)


def _json(plan: P.Plan, *args: str, kind: type) -> Any:
    out = json.loads(command(plan, *args, "--json").stdout)
    if not isinstance(out, kind):
        what = " ".join(args)
        raise LabError(
            f"lasthop {what} --json: expected a {kind.__name__}, got {type(out).__name__}"
        )
    return out


def detach(plan: P.Plan) -> None:
    """Removes lasthop from the lab's host (programs and pinned table), as
    `lasthop detach --netns <host>` does (the same Controller.detach), in a
    thread of this process that enters the host's namespace and ends with
    the call: no interpreter to start, ~0.6 s less at every agent a lab runs.
    As that command's exit code was, what it could not remove is not an error
    here: the lab's down removes the namespace and the pins in any case."""

    def work() -> None:
        from lasthop.controller import Controller  # libbpf, pyroute2: only when detaching
        from lasthop.errors import LasthopError

        try:
            controller = Controller(plan.host.ns)
        except LasthopError:  # no such namespace (any more): nothing attached
            return
        try:
            controller.detach()
        except LasthopError:
            pass
        finally:
            controller.close()

    worker = threading.Thread(target=work, name=f"detach {plan.host.ns}")
    worker.start()
    worker.join()


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

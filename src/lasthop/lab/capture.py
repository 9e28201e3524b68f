"""Captures of the host's uplink while the lab's traffic runs (`lasthop lab
demo --capture DIR`): what a user would record on a real host before and
after installing lasthop, for `lasthop pcap` to report on.

tcpdump (a real capture, pcap format) runs in the host's namespace on the
uplink, in immediate mode: by default the kernel hands tcpdump its frames in
blocks, and a stop right after the traffic lost every frame of the last one
(the file held none of a whole check). SIGINT makes tcpdump write what it has
and close the file. A names file beside the captures names each lab MAC.
"""

from __future__ import annotations

import contextlib
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from lasthop.lab import plan as P
from lasthop.lab.namespaces import LabError

__all__ = ["NAMES_FILE", "capturing", "names", "write_names"]

NAMES_FILE = "names.txt"
READY_TIMEOUT = 60.0  # s: a fresh machine's first tcpdump is slow to start
STOP_TIMEOUT = 30.0


def names(plan: P.Plan) -> dict[str, str]:
    """MAC -> name of every firewall (and its fail-over MAC), VM and host leg of the lab."""
    out = {plan.firewall(n).transit_mac: f"fw{n}" for n in plan.sites}
    out |= {plan.firewall(n).failover_mac: f"fw{n} (fail-over)" for n in plan.sites}
    out |= {plan.vm(n).mac: f"vm{n}" for n in plan.vms}
    return out | {plan.host.uplink_mac: "host uplink", plan.host.bridge_mac: "host br0"}


def write_names(plan: P.Plan, folder: Path) -> Path:
    """folder/names.txt: "MAC NAME" lines of :func:`names`, for `lasthop pcap --names`."""
    path = folder / NAMES_FILE
    path.write_text("".join(f"{mac} {name}\n" for mac, name in names(plan).items()))
    return path


@contextlib.contextmanager
def capturing(plan: P.Plan, path: Path) -> Iterator[Path]:
    """Records the host's uplink into *path* while the block runs; the file is
    complete when the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["ip", "netns", "exec", plan.host.ns, "tcpdump", "-i", plan.host.uplink,
            "-w", str(path), "-U", "--immediate-mode", "-s", "256"]  # fmt: skip
    try:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as err:
        raise LabError("tcpdump is not installed (scripts/setup installs it)") from err
    try:
        _wait_listening(proc)
        yield path
    finally:
        _stop(proc)


def _wait_listening(proc: subprocess.Popen[str]) -> None:
    """Until tcpdump says it listens: frames sent before would be missed."""
    assert proc.stderr is not None
    deadline = time.monotonic() + READY_TIMEOUT
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
            if "listening on" in line:
                return
        elif proc.poll() is not None:
            break
    _stop(proc)
    raise LabError(f"tcpdump did not start capturing: {seen.strip() or 'no output'}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()

"""`lasthop bench lab`: what the host costs per packet and per new connection
with a plain bridge, with lasthop, and with the Linux conntrack recipe —
side by side, interleaved, in one run. docs/bench-lab.md explains the method
and its noise.

Every mode gets its own copy of one small path, in its own namespaces, with
the same addresses and MACs (from lasthop.lab.plan); only the host differs:

    <lab>-fw1 (sender, sink) ── up0 [<lab>-host] vm1 ── eth0 <lab>-vm1 (reflector)

    <lab> = prefix + mode tag: lhbbr, lhblh, lhbrcp, ... (torn down with lasthop.lab's down())

    direct          no host: fw1's veth goes straight to the VM (the baseline)
    bridge          bridged host, nothing else (the symmetric path: the limit)
    lasthop         the same bridged host with lasthop attached
    lasthop-device  the same, peer_redirect off (requests out of the VM port)
    routed          routed host, nothing else
    lasthop-routed  the same routed host with lasthop --routed attached
    recipe          the routed host with the lab's conntrack recipe
                    (ct mark by the last hop's MAC, fwmark policy routing)

A C sender (bench/lab_sender.c) in fw1 writes 60-byte UDP frames to its veth,
pinned to one CPU; a tc program in the VM (bench/lab_endpoints.bpf.c) answers
each one in place, and another drops the answers in fw1. The whole round trip
runs in softirq on the sender's CPU, inside its send calls, so the sender
thread's CPU time (plus ksoftirqd's, in case the kernel deferred some) is the
CPU the path cost. The host's cost is that minus the direct path's, from the
same repetition: a repetition is one burst of every mode back to back, and
each ratio is the median of the repetitions' paired ratios, with its 95% CI.

The package splits that in three: paths (building each mode's path), measure
(the interleaved runs), report (the figures and the files). The command is
declared with the other benches in lasthop.bench.cli.
"""

from __future__ import annotations

from lasthop.bench.frames import quiet
from lasthop.bench.lab.measure import DEFAULT_PREFIX, FULL, QUICK, Run, Settings, measure_all
from lasthop.bench.lab.paths import BASELINE, EXTRA_MODES, MODES, BenchError, Mode, Progress
from lasthop.bench.lab.report import (
    DEFAULT_OUT,
    TARGETS,
    Report,
    print_report,
    summarize,
    write_results,
)

__all__ = [
    "BASELINE",
    "DEFAULT_OUT",
    "DEFAULT_PREFIX",
    "EXTRA_MODES",
    "FULL",
    "MODES",
    "QUICK",
    "TARGETS",
    "BenchError",
    "Mode",
    "Report",
    "Run",
    "Settings",
    "print_report",
    "run_bench",
    "summarize",
    "write_results",
]


def run_bench(
    settings: Settings, progress: Progress = quiet, prefix: str = DEFAULT_PREFIX
) -> Report:
    """Builds every mode's path, runs the tests interleaved, removes everything;
    the report of what was measured."""
    m = measure_all(settings, progress, prefix)
    return summarize(m.runs, settings, m.checks, m.elapsed_s)

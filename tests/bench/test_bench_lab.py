"""`lasthop bench lab`: the arithmetic of the report (no root), a --quick run
whose figures are positive and hang together, and its clean-up on Ctrl-C.

Benchmarks print ratios; these tests never check a target or a timing."""

from __future__ import annotations

import json
import math
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lasthop.bench import lab as L
from lasthop.bench.cli import EXIT_OK
from lasthop.bench.lab.paths import rx_packets
from lasthop.lab.namespaces import LabError, existing
from lasthop.lab.plan import FW_TRANSIT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT = 180
# per mode: CPU ns per request and answer, in the packets and the connections test
SYNTHETIC = {
    "direct": (2000, 2000),
    "bridge": (3400, 3500),
    "lasthop": (3600, 4300),
    "lasthop-device": (3700, 4300),
    "routed": (4700, 4800),
    "lasthop-routed": (4300, 5000),
    "recipe": (7000, 8000),
}


def _runs(reps: int = 3, jitter: float = 0.02) -> list[L.Run]:
    runs = []
    for rep in range(reps):
        scale = 1 + jitter * (rep - 1)  # rep 0 low, rep 1 as given, rep 2 high
        for mode, (pkt, conn) in SYNTHETIC.items():
            for test, ns, sent in (("packets", pkt, 10_000), ("connections", conn, 5_000)):
                cpu = round(ns * scale * sent)
                runs.append(L.Run(mode, test, rep, sent, sent, sent, cpu, 0, cpu + 1000))
    return runs


def test_host_cost_is_the_mode_minus_the_direct_path_per_forwarded_packet() -> None:
    """ns/packet = (mode - direct) / 2 per request (a request and its answer
    cross the host); ns/connection = mode - direct; connections/s = 1e9 / that."""
    report = L.summarize(_runs(jitter=0.0), L.QUICK)
    bridge = report.modes["bridge"]
    assert bridge.packet_ns and bridge.conn_ns and bridge.conn_per_s
    assert bridge.packet_ns.median == pytest.approx((3400 - 2000) / 2)
    assert bridge.conn_ns.median == pytest.approx(3500 - 2000)
    assert bridge.conn_per_s.median == pytest.approx(1e9 / 1500)
    assert report.modes["direct"].packet_ns is None
    assert report.modes["direct"].path_ns.median == pytest.approx(2000)


def test_ratios_come_from_the_medians_and_targets_compare_them() -> None:
    """lasthop ÷ bridge is the ratio of the medians; a lower-is-better target
    passes below its limit, a higher-is-better one above it."""
    report = L.summarize(_runs(), L.QUICK)
    by_key = {(t.target.metric, t.target.mode, t.target.base): t for t in report.targets}
    t = by_key[("packet_ns", "lasthop", "bridge")]
    assert t.ratio.median == pytest.approx(800 / 700)  # (3600-2000)/2 over (3400-2000)/2
    assert not t.passed  # 1.14 > 0.8
    conn = by_key[("conn_per_s", "lasthop", "recipe")]
    assert conn.ratio.median == pytest.approx(6000 / 2300)
    assert conn.passed  # 2.6 >= 2
    for t in report.targets:
        assert t.ratio.low <= t.ratio.median <= t.ratio.high


def _paired_runs(bridge: list[float], lasthop: list[float]) -> list[L.Run]:
    """Packets runs (per-request ns) of direct (2000 each), bridge and lasthop, one per rep."""
    runs = []
    for rep, (b, lh) in enumerate(zip(bridge, lasthop, strict=True)):
        for mode, ns in (("direct", 2000.0), ("bridge", b), ("lasthop", lh)):
            for test in ("packets", "connections"):
                runs.append(L.Run(mode, test, rep, 1000, 1000, 1000, round(ns * 1000), 0, 10**9))
    return runs


def test_a_ratio_is_the_median_of_the_repetitions_paired_ratios() -> None:
    """Each repetition's lasthop burst is divided by its own bridge burst: a
    slow repetition (everything 1.5x) moves neither the ratio nor its CI,
    where the ratio of the medians would mix slow and fast repetitions."""
    # host cost (ns/packet): bridge 700 and lasthop 490 (0.7x), but rep 1 and 3 slow
    bridge = [3400, 2000 + 1400 * 1.5, 3400, 2000 + 1400 * 1.5, 3400, 3400]
    lasthop = [2980, 2000 + 980 * 1.5, 2980, 2000 + 980 * 1.5, 2980, 2980]
    report = L.summarize(_paired_runs(bridge, lasthop), L.QUICK)
    (t,) = [r for r in report.targets if (r.target.mode, r.target.base) == ("lasthop", "bridge")]
    assert t.ratio.median == pytest.approx(0.7)
    assert t.ratio.ci_low == pytest.approx(0.7) and t.ratio.ci_high == pytest.approx(0.7)
    assert t.passed and t.judged and t.verdict == "pass"


def test_a_ci_across_the_limit_is_unsure() -> None:
    """Paired ratios that fall on both sides of the limit give a verdict
    marked unsure: the run cannot tell."""
    lasthop = [2000 + 1400 * r for r in (0.6, 0.7, 0.75, 0.85, 0.9, 1.0)]
    report = L.summarize(_paired_runs([3400] * 6, lasthop), L.QUICK)
    (t,) = [r for r in report.targets if (r.target.mode, r.target.base) == ("lasthop", "bridge")]
    assert t.ratio.median == pytest.approx(0.8)
    assert (t.ratio.ci_low, t.ratio.ci_high) == (pytest.approx(0.6), pytest.approx(1.0))
    assert not t.judged and t.verdict.endswith("(unsure)")


@pytest.mark.parametrize(("n", "k"), [(5, 1), (6, 1), (10, 2), (20, 6), (40, 14), (100, 40)])
def test_median_ci_takes_the_binomial_order_statistics(n: int, k: int) -> None:
    """The 95% interval of a median of n values is the k-th lowest to the
    k-th highest (the usual table: n=10 -> 2nd, n=40 -> 14th, n=100 -> 40th)."""
    from lasthop.bench.lab.report import median_ci

    values = [float(v) for v in range(1, n + 1)]
    assert median_ci(values) == (k, n + 1 - k)


def test_report_files_name_every_mode_and_target(tmp_path: Path) -> None:
    """write_results writes the Markdown table, a PNG and the JSON report."""
    report = L.summarize(_runs(), L.QUICK, {"lasthop": {"ok": True, "max_loss": 0.0}}, 1.0)
    md, png, js = L.write_results(report, tmp_path / "out")
    text = md.read_text()
    for mode in L.MODES[1:]:
        assert f"| {mode.label} |" in text
    assert text.count("**pass**") + text.count("**miss**") == len(L.TARGETS)
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert json.loads(js.read_text())["modes"]["recipe"]["host_ns_per_packet"]["median"] > 0


# -- on the machine (root: namespaces, nftables, BPF) -------------------------------------


def _prefix() -> str:
    return "b" + secrets.token_hex(1)  # two test runs at once never share namespaces


def _leftovers(prefix: str) -> list[str]:
    """Namespaces, lasthop pin folders and lab state a bench with prefix left behind."""
    names = {m.plan(prefix).name for m in L.MODES}
    found = [ns for ns in existing() if ns.split("-")[0] in names]
    for folder in (Path("/sys/fs/bpf/lasthop"), Path("/run/lasthop-lab")):
        if folder.is_dir():
            found += [str(p) for p in folder.iterdir() if p.name.split("-")[0] in names]
    return found


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "lasthop", "bench", "lab", *args]


def _json_run(out: Path, *args: str) -> dict[str, Any]:
    """The JSON report of a bench lab run with args (results in out), after
    checking it ran and left nothing behind."""
    prefix = _prefix()
    done = subprocess.run(
        _bench(*args, "--json", "--out", str(out), "--prefix", prefix),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert _leftovers(prefix) == []
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture
def quick_report(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    out = tmp_path / "results"
    return _json_run(out, "--quick"), out


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.bpf
@pytest.mark.slow
def test_quick_run_writes_positive_consistent_figures(
    quick_report: tuple[dict[str, Any], Path],
) -> None:
    """--quick writes bench-lab.md/png/json; every path time is positive, and
    every figure's median (a host's figure is a difference of two bursts: one
    stalled burst of the baseline can make a single repetition's negative),
    each median lies within its range, connections/s is 1e9 / ns per
    connection, every ratio is the ratio of the medians; nothing was lost;
    lasthop redirected every answer and the recipe tracked every connection."""
    report, out = quick_report
    assert (out / "bench-lab.md").read_text().startswith("# lasthop bench lab")
    assert (out / "bench-lab.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "bench-lab.json").read_text())["modes"] == report["modes"]
    assert report["consistent"], report["checks"]

    modes = report["modes"]
    assert set(modes) == {m.name for m in L.MODES}
    for name, m in modes.items():
        figures = ["path_ns_per_request"]
        if name != L.BASELINE:
            figures += ["host_ns_per_packet", "host_ns_per_connection", "connections_per_s"]
        for key in figures:
            f = m[key]
            where = (name, key, f)
            assert f["low"] <= f["ci_low"] <= f["median"] <= f["ci_high"] <= f["high"], where
            assert (f["low"] if key == "path_ns_per_request" else f["median"]) > 0, where
            assert len(f["values"]) == L.QUICK.reps
        if name != L.BASELINE:  # an odd number of repetitions: the median is one of them
            rate, cost = m["connections_per_s"]["median"], m["host_ns_per_connection"]["median"]
            assert rate == pytest.approx(1e9 / cost)

    for t in report["targets"]:  # the median of the repetitions' paired ratios
        a, b = modes[t["mode"]], modes[t["base"]]
        if t["metric"] == "packet_ns":
            x, y = a["host_ns_per_packet"]["values"], b["host_ns_per_packet"]["values"]
        else:
            y, x = a["host_ns_per_connection"]["values"], b["host_ns_per_connection"]["values"]
        pairs = [p / q for p, q in zip(x, y, strict=True)]
        assert t["ratios"] == pytest.approx(pairs)
        assert t["ratio"] == pytest.approx(statistics.median(pairs))
        assert t["ratio_ci_low"] <= t["ratio"] <= t["ratio_ci_high"]
        below = t["ratio"] <= t["limit"]
        assert t["passed"] == (below if t["op"] == "<=" else t["ratio"] >= t["limit"])

    runs = report["runs"]
    assert len(runs) == L.QUICK.reps * len(L.MODES) * 2
    for r in runs:
        assert r["sent"] + r["warmup"] == r["reached_vm"] == r["replies"], r
        assert 0 < r["cpu_ns"] <= r["wall_ns"] * 1.01, r  # one thread: no more CPU than time
        assert math.isclose(r["per_request_ns"], (r["cpu_ns"] + r["softirqd_ns"]) / r["sent"])
    for name in ("lasthop", "lasthop-device", "lasthop-routed"):
        answers = sum(r["replies"] for r in runs if r["mode"] == name)
        assert report["checks"][name]["redirected"] >= answers
        assert report["checks"][name]["fast_to_vm"] > 0  # requests skipped the bridge/routing


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.bpf
@pytest.mark.slow
def test_tcp_run_with_a_smaller_table_answers_every_segment(tmp_path: Path) -> None:
    """--tcp: every flow's handshake, then ACKs, each answered through every
    mode (the recipe's conntrack and lasthop's confirmation accept them),
    lasthop redirected every answer and sent requests by its fast path;
    --extra-mode adds the bridged lasthop host with a 4,096-entry table."""
    report = _json_run(
        tmp_path,
        *("--quick", "--tcp", "--reps", "1", "--flows", "256", "--packets", "2000"),
        *("--connections", "500", "--extra-mode", "lasthop-4k"),
    )
    assert report["consistent"], report["checks"]
    assert set(report["modes"]) == {m.name for m in L.MODES} | {"lasthop-4k"}
    assert report["settings"]["tcp"] is True
    for r in report["runs"]:
        # the handshake's SYN and ACK of each of the 256 flows are in the warm-up
        extra = 2 * 256 if r["test"] == "packets" else 0
        assert r["warmup"] == (3 * 256 + extra if r["test"] == "packets" else 1000), r
        assert r["sent"] + r["warmup"] == r["reached_vm"] == r["replies"], r
    for name in ("lasthop", "lasthop-device", "lasthop-routed", "lasthop-4k"):
        answers = sum(r["replies"] for r in report["runs"] if r["mode"] == name)
        assert report["checks"][name]["redirected"] >= answers
        assert report["checks"][name]["fast_to_vm"] > 0


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.bpf
@pytest.mark.slow
def test_ctrl_c_removes_every_namespace_pin_and_state(tmp_path: Path) -> None:
    """Interrupted once its runs have begun, the bench exits 130 and
    leaves no namespace, lasthop pin, lab state or process behind."""
    prefix = _prefix()
    last = L.MODES[-1].plan(prefix)
    # far more repetitions than the quick run's: on a quiet machine its runs
    # ended (and, as root, wrote /nonexistent) while runs_begun() was still
    # looking, and the Ctrl-C found the bench already gone (exit 0)
    proc = subprocess.Popen(
        _bench("--quick", "--reps", "1001", "--prefix", prefix, "--out", str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = L.MODES[0].plan(prefix).firewall(1).ns

    def runs_begun() -> bool:
        """The last mode's path is built and the first path's answers come back."""
        if last.vm(1).ns not in existing():
            return False
        try:
            return rx_packets(first, FW_TRANSIT) > 0
        except LabError:
            return False

    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not runs_begun():  # waited for, not slept for: slow machines build slowly
            assert proc.poll() is None and time.monotonic() < deadline, "the runs never began"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _leftovers(prefix) == []
    assert list(tmp_path.iterdir()) == []  # an interrupted run writes no results

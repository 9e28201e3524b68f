"""The report of `lasthop bench lab`: medians over the repetitions, the
targets, and the tables, Markdown, chart and JSON they are written as."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lasthop.bench.lab.measure import Run, Settings
from lasthop.bench.lab.paths import BASELINE, FRAME_LEN, MODE_BY_NAME

__all__ = [
    "DEFAULT_OUT",
    "TARGETS",
    "Figure",
    "ModeResult",
    "Report",
    "Target",
    "TargetResult",
    "markdown",
    "print_report",
    "summarize",
    "write_results",
]

DEFAULT_OUT = Path("results/bench-lab")
NS_PER_S = 1e9


@dataclass(frozen=True)
class Target:
    """mode's metric over base's metric must be <= (or >=) limit."""

    metric: str  # "packet_ns" (lower is better) or "conn_per_s" (higher is better)
    mode: str
    base: str
    limit: float
    primary: bool  # the three modes; False = the like-for-like routed comparison

    @property
    def op(self) -> str:
        return "<=" if self.metric == "packet_ns" else ">="

    def describe(self) -> str:
        what = "added ns/packet" if self.metric == "packet_ns" else "new connections/s"
        mode, base = MODE_BY_NAME[self.mode].label, MODE_BY_NAME[self.base].label
        return f"{mode} ÷ {base}: {what} {self.op} {self.limit:g}×"


TARGETS = (
    Target("packet_ns", "lasthop", "bridge", 0.8, True),
    Target("packet_ns", "lasthop", "recipe", 0.5, True),
    Target("conn_per_s", "lasthop", "recipe", 2.0, True),
    Target("packet_ns", "lasthop-routed", "recipe", 0.5, False),
    Target("conn_per_s", "lasthop-routed", "recipe", 2.0, False),
)


CONFIDENCE = 0.95  # of the interval printed beside each median


def median_ci(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the k-th lowest
    and k-th highest value, k the largest with P(Binomial(n, 1/2) < k) <=
    (1 - confidence) / 2. It assumes nothing of the noise's shape (which
    here is skewed: the machine's other work only ever adds). Fewer than 6
    values cannot reach 95%: then the lowest and highest."""
    ordered, n = sorted(values), len(values)
    tail, k, below = (1 - confidence) / 2, 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2**n  # P(X <= k) after adding P(X = k)
        if below > tail:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


@dataclass(frozen=True)
class Figure:
    """A median over the repetitions, its 95% confidence interval, and the
    lowest and highest value."""

    median: float
    low: float
    high: float
    values: list[float]
    ci_low: float = 0.0
    ci_high: float = 0.0

    @classmethod
    def of(cls, values: list[float]) -> Figure:
        ci = median_ci(values)
        return cls(statistics.median(values), min(values), max(values), values, *ci)

    @property
    def spread(self) -> float:
        """(high - low) / median: the whole range, relative."""
        return (self.high - self.low) / self.median if self.median else float("inf")


@dataclass
class ModeResult:
    name: str
    label: str
    path_ns: Figure  # CPU per request-and-reply through the whole path
    packet_ns: Figure | None  # the host's added CPU per forwarded packet (None for the baseline)
    conn_ns: Figure | None  # the host's added CPU per new connection (its request and reply)
    conn_per_s: Figure | None  # new connections per second of one host CPU: 1e9 / conn_ns


@dataclass
class TargetResult:
    target: Target
    ratio: Figure  # the repetitions' paired ratios: their median, CI and range

    def _meets(self, value: float) -> bool:
        return value <= self.target.limit if self.target.op == "<=" else value >= self.target.limit

    @property
    def passed(self) -> bool:
        """The median ratio meets the limit."""
        return self._meets(self.ratio.median)

    @property
    def judged(self) -> bool:
        """The whole confidence interval lies on the median's side of the
        limit: the run can tell pass from miss."""
        return self._meets(self.ratio.ci_low) == self._meets(self.ratio.ci_high)

    @property
    def verdict(self) -> str:
        return ("pass" if self.passed else "miss") + ("" if self.judged else " (unsure)")


@dataclass
class Report:
    settings: Settings
    modes: dict[str, ModeResult]
    targets: list[TargetResult]
    checks: dict[str, Any]
    runs: list[Run]
    elapsed_s: float
    environment: dict[str, Any] = field(default_factory=dict)
    # (mode, base, metric) -> the paired per-repetition ratios (the table's × columns)
    ratios: dict[tuple[str, str, str], Figure] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        return all(c.get("ok", False) for c in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        def fig(f: Figure | None) -> dict[str, Any] | None:
            return (
                None
                if f is None
                else {
                    "median": f.median,
                    "ci_low": f.ci_low,
                    "ci_high": f.ci_high,
                    "low": f.low,
                    "high": f.high,
                    "values": f.values,
                }
            )

        return {
            "settings": asdict(self.settings),
            "environment": self.environment,
            "elapsed_s": round(self.elapsed_s, 1),
            "modes": {
                name: {
                    "label": m.label,
                    "path_ns_per_request": fig(m.path_ns),
                    "host_ns_per_packet": fig(m.packet_ns),
                    "host_ns_per_connection": fig(m.conn_ns),
                    "connections_per_s": fig(m.conn_per_s),
                }
                for name, m in self.modes.items()
            },
            "targets": [
                {
                    "metric": t.target.metric,
                    "mode": t.target.mode,
                    "base": t.target.base,
                    "op": t.target.op,
                    "limit": t.target.limit,
                    "primary": t.target.primary,
                    "ratio": t.ratio.median,
                    "ratio_ci_low": t.ratio.ci_low,
                    "ratio_ci_high": t.ratio.ci_high,
                    "ratio_low": t.ratio.low,
                    "ratio_high": t.ratio.high,
                    "ratios": t.ratio.values,
                    "passed": t.passed,
                    "judged": t.judged,
                }
                for t in self.targets
            ],
            "checks": self.checks,
            "consistent": self.consistent,
            "runs": [asdict(r) | {"per_request_ns": r.per_request_ns} for r in self.runs],
        }


def _irq_time_accounting() -> bool | None:
    """Whether the kernel takes softirq time out of the interrupted task's
    time (CONFIG_IRQ_TIME_ACCOUNTING): then the sender thread's CPU time
    misses the path's work and the figures are too low. None: unknown."""
    import gzip

    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        return b"\nCONFIG_IRQ_TIME_ACCOUNTING=y\n" in raw
    return None


def _environment(settings: Settings) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "sender_cpu": settings.cpu,
        "irq_time_accounting": _irq_time_accounting(),
        "command": "lasthop bench lab" + (" --quick" if settings.quick else ""),
    }


def _paired(per: dict[str, list[float]], mode: str, base: str, inverse: bool = False) -> Figure:
    """mode's figure over base's, repetition by repetition (inverse: base's
    over mode's): the ratios of bursts that ran back to back."""
    a, b = per[mode], per[base]
    pairs = zip(a, b, strict=True)
    return Figure.of([y / x if inverse else x / y for x, y in pairs])


def summarize(
    runs: list[Run],
    settings: Settings,
    checks: dict[str, Any] | None = None,
    elapsed_s: float = 0.0,
) -> Report:
    """Per mode and repetition: the host's cost = the mode's burst minus the
    direct path's burst of the same repetition; medians over the
    repetitions; each ratio the median of the repetitions' paired ratios."""
    by: dict[tuple[str, str, int], Run] = {(r.mode, r.test, r.rep): r for r in runs}
    reps = sorted({r.rep for r in runs})
    names = [name for name in MODE_BY_NAME if any(r.mode == name for r in runs)]
    per_pkt: dict[str, list[float]] = {}
    per_conn: dict[str, list[float]] = {}
    modes: dict[str, ModeResult] = {}
    for name in names:
        path = [by[(name, "packets", rep)].per_request_ns for rep in reps]
        if name != BASELINE:
            # a request and its reply: the host forwards two packets
            per_pkt[name] = [
                (
                    by[(name, "packets", rep)].per_request_ns
                    - by[(BASELINE, "packets", rep)].per_request_ns
                )
                / 2
                for rep in reps
            ]
            per_conn[name] = [
                by[(name, "connections", rep)].per_request_ns
                - by[(BASELINE, "connections", rep)].per_request_ns
                for rep in reps
            ]
        pkt = Figure.of(per_pkt[name]) if name in per_pkt else None
        conn = Figure.of(per_conn[name]) if name in per_conn else None
        rate = (
            Figure.of([NS_PER_S / v if v > 0 else float("inf") for v in per_conn[name]])
            if name in per_conn
            else None
        )
        modes[name] = ModeResult(name, MODE_BY_NAME[name].label, Figure.of(path), pkt, conn, rate)
    targets = []
    for t in TARGETS:
        if t.mode not in modes or t.base not in modes:
            continue
        if t.metric == "packet_ns":
            ratio = _paired(per_pkt, t.mode, t.base)
        else:  # connections per second: the inverse ratio of the costs
            ratio = _paired(per_conn, t.mode, t.base, inverse=True)
        targets.append(TargetResult(t, ratio))
    report = Report(settings, modes, targets, checks or {}, runs, elapsed_s, _environment(settings))
    report.ratios = {
        (name, base, metric): _paired(
            per_pkt if metric == "packet_ns" else per_conn, name, base, metric != "packet_ns"
        )
        for name in per_pkt
        for base in ("bridge", "recipe")
        if base in per_pkt
        for metric in ("packet_ns", "conn_per_s")
    }
    return report


# -- output ---------------------------------------------------------------------------


def _fmt(f: Figure | None) -> str:
    return "–" if f is None else f"{f.median:,.0f} ({f.ci_low:,.0f}–{f.ci_high:,.0f})"


COLUMNS = (
    "mode",
    "host ns/packet",
    "× plain bridge",
    "× recipe",
    "host ns/connection",
    "connections/s per CPU",
    "× recipe",
)


def _ratio_to(report: Report, name: str, base: str, metric: str) -> str:
    ratio = report.ratios.get((name, base, metric))
    return "–" if ratio is None else f"{ratio.median:.2f}×"


def _rows(report: Report) -> list[list[str]]:
    """One row per mode (not the baseline), cells as COLUMNS names them."""
    return [
        [
            m.label,
            _fmt(m.packet_ns),
            _ratio_to(report, name, "bridge", "packet_ns"),
            _ratio_to(report, name, "recipe", "packet_ns"),
            _fmt(m.conn_ns),
            _fmt(m.conn_per_s),
            _ratio_to(report, name, "recipe", "conn_per_s"),
        ]
        for name, m in report.modes.items()
        if name != BASELINE
    ]


def _measured(t: TargetResult) -> str:
    r = t.ratio
    return (
        f"{r.median:.2f}× (95% CI {r.ci_low:.2f}–{r.ci_high:.2f}; "
        f"{r.low:.2f}–{r.high:.2f} over {len(r.values)})"
    )


def _setup_line(report: Report) -> str:
    env, s = report.environment, report.settings
    return (
        f"`{env.get('command')}` on {env.get('date')}: kernel {env.get('kernel')}, "
        f"{env.get('cpus')} × {env.get('cpu')}; sender on CPU {s.cpu}; bridges "
        f"{'with' if s.br_netfilter else 'without'} br_netfilter; {s.reps} repetitions, each a "
        f"burst of every mode back to back (order rotating); per burst {s.packets:,} packets "
        f"({FRAME_LEN}-byte {'TCP ACKs' if s.tcp else 'UDP'} over {s.flows} "
        f"{'established connections' if s.tcp else 'flows'}, each answered; "
        f"{s.warmup:,} untimed first) "
        f"and {s.connections:,} new connections (a request and its answer each; "
        f"{s.conn_warmup:,} untimed first); tables flushed every {s.flush_every} repetitions; "
        f"{report.elapsed_s:.0f} s."
    ) + ACCOUNTING_WARNING.get(env.get("irq_time_accounting"), "")


ACCOUNTING_WARNING = {
    True: " WARNING: this kernel has CONFIG_IRQ_TIME_ACCOUNTING=y, so softirq time is not in "
    "the sender's CPU time and every figure is too low (docs/bench-lab.md).",
    None: " (kernel config unreadable: the method assumes CONFIG_IRQ_TIME_ACCOUNTING is off.)",
}


def markdown(report: Report) -> str:
    lines = [
        "# lasthop bench lab",
        "",
        _setup_line(report),
        "",
        "Median over the repetitions (its 95% confidence interval). Each × column is the median "
        "of the repetitions' paired ratios (each repetition's bursts ran back to back). "
        "*host ns/packet*: CPU the host adds per "
        "packet it forwards (requests and answers alike), over the same traffic on a path "
        "without a host. *host ns/connection*: CPU it adds per new connection. "
        "*connections/s per CPU* = 10⁹ / host ns/connection. Method and noise: "
        "docs/bench-lab.md.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(COLUMNS) - 1),
        *("| " + " | ".join(row) + " |" for row in _rows(report)),
    ]
    base = report.modes.get(BASELINE)
    if base:
        lines += [
            "",
            f"Path without a host: {_fmt(base.path_ns)} ns of CPU per request and answer.",
        ]
    lines += ["", "## Targets", "", "| target | measured | result |", "| --- | ---: | --- |"]
    for t in report.targets:
        scope = "" if t.target.primary else " (routed host, like for like)"
        result = f"**{t.verdict}**"
        lines.append(f"| {t.target.describe()}{scope} | {_measured(t)} | {result} |")
    lines += ["", "## Checks", ""]
    for name, c in report.checks.items():
        detail = ", ".join(
            f"{k} {v:.3%}" if k == "max_loss" else f"{k} {v}" for k, v in c.items() if k != "ok"
        )
        lines.append(f"- {name}: {'ok' if c.get('ok') else 'FAILED'} ({detail})")
    return "\n".join(lines) + "\n"


PANELS = (
    ("packet_ns", "host CPU added per forwarded packet", "ns / packet (lower is better)"),
    (
        "conn_per_s",
        "new connections per second of one host CPU",
        "connections / s (higher is better)",
    ),
)


def chart(report: Report, path: Path) -> None:
    """Two bar charts (ns/packet, connections/s) with the primary targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    shown = [m for name, m in report.modes.items() if name != BASELINE]
    labels = [m.label.replace(" (", "\n(") for m in shown]
    grey, blue, red = "#7f7f7f", "#1f77b4", "#d62728"
    colours = [blue if "lasthop" in m.name else red if m.name == "recipe" else grey for m in shown]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 4.8))
    for ax, (attr, title, unit) in zip(axes, PANELS, strict=True):
        figs: list[Figure] = [getattr(m, attr) for m in shown]
        med = [f.median for f in figs]
        err = [[f.median - f.ci_low for f in figs], [f.ci_high - f.median for f in figs]]
        bars = ax.bar(range(len(shown)), med, yerr=err, capsize=4, color=colours)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in med], padding=3, fontsize=8)
        ax.set_xticks(range(len(shown)), labels, fontsize=8)
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        lines = iter(["--", ":", "-."])
        for t in report.targets:
            base = report.modes.get(t.target.base)
            if t.target.primary and t.target.metric == attr and base:
                level = getattr(base, attr).median * t.target.limit
                op = "≤" if t.target.op == "<=" else "≥"
                label = f"lasthop target: {op} {t.target.limit:g}× {base.label}"
                ax.axhline(level, color=blue, linestyle=next(lines), linewidth=0.9, label=label)
        ax.legend(fontsize=7, loc="upper left" if attr == "packet_ns" else "upper right")
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
    fig.suptitle(
        f"lasthop bench lab: median of {report.settings.reps} interleaved repetitions "
        f"(whiskers: 95% CI of the median); kernel {report.environment.get('kernel')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(report: Report, out: Path) -> list[Path]:
    """bench-lab.md, bench-lab.png and bench-lab.json in out (created)."""
    out.mkdir(parents=True, exist_ok=True)
    md, png, js = out / "bench-lab.md", out / "bench-lab.png", out / "bench-lab.json"
    md.write_text(markdown(report))
    chart(report, png)
    js.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return [md, png, js]


def print_report(report: Report, console: Console) -> None:
    console.print(_setup_line(report), highlight=False)
    table = Table(
        title="the host's added cost: median (95% CI); × columns: median of paired ratios",
        title_justify="left",
    )
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "mode" else "right")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    base = report.modes.get(BASELINE)
    if base:
        console.print(f"path without a host: {_fmt(base.path_ns)} ns per request and answer")
    targets = Table(title="targets", title_justify="left")
    for col in ("target", "measured", "result"):
        targets.add_column(col, justify="right" if col == "measured" else "left")
    for t in report.targets:
        scope = "" if t.target.primary else " [dim](routed host, like for like)[/dim]"
        colour = ("green" if t.passed else "red") if t.judged else "yellow"
        result = f"[{colour}]{t.verdict}[/{colour}]"
        targets.add_row(t.target.describe() + scope, _measured(t), result)
    console.print(targets)
    for name, c in report.checks.items():
        if not c.get("ok"):
            console.print(f"[red]check failed:[/red] {name}: {json.dumps(c)}", highlight=False)

"""The demo's script, without the rendering (lasthop.lab.cli draws it): per
host mode, build the lab, run the traffic check without lasthop, optionally
with the Linux recipe (before and after a fail-over and a new firewall), then
with lasthop; record what each phase should have shown; always tear down.

The expectations are the end-to-end script of STYLE.md: it fails without
lasthop (cl1 works, every path through fw2/fw3 dies), it works with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lasthop.lab import agent, recipe, traffic
from lasthop.lab import plan as P
from lasthop.lab.namespaces import LabError
from lasthop.lab.topology import Lab
from lasthop.lab.traffic import CheckResult

__all__ = [
    "Phase",
    "ModeRun",
    "run_mode",
    "expect_asymmetric",
    "expect_all_ok",
    "expect_dead_only",
    "counter_delta",
    "sample_rows",
]

Say = Callable[[str], None]
FAILOVER_SITE = 2  # the firewall that fails over to a standby MAC in the recipe scenario
ADDED_SITE = 4  # the firewall (and client network) added while the recipe is configured


@dataclass
class Phase:
    key: str  # off | recipe | recipe-changed | on
    title: str  # column title
    check: CheckResult
    drops: dict[str, dict[str, int]]  # firewall -> counter -> packets during this phase
    problems: list[str] = field(default_factory=list)


@dataclass
class ModeRun:
    mode: str
    phases: list[Phase] = field(default_factory=list)
    show_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # beyond the phases' own
    seconds: float = 0.0

    @property
    def all_problems(self) -> list[str]:
        return [*(p for ph in self.phases for p in ph.problems), *self.problems]

    @property
    def ok(self) -> bool:
        return not self.all_problems


def _fam(family: int) -> str:
    return f"IPv{family}"


def expect_asymmetric(check: CheckResult, label: str, symmetric: str = "cl1") -> list[str]:
    """Without lasthop: every path from the symmetric client works, every other one dies."""
    problems = []
    for (client, _fw, proto, family), (tried, ok) in check.grouped().items():
        if client == symmetric and ok != tried:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected all"
            )
        if client != symmetric and ok:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected none"
            )
    return problems


def expect_all_ok(check: CheckResult, label: str) -> list[str]:
    return [
        f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected all"
        for (client, _fw, proto, family), (tried, ok) in check.grouped().items()
        if ok != tried
    ]


def expect_dead_only(check: CheckResult, label: str, dead: set[str]) -> list[str]:
    """Paths from the clients in *dead* die; every other path works."""
    problems = []
    for (client, _fw, proto, family), (tried, ok) in check.grouped().items():
        if client in dead and ok:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected none"
            )
        if client not in dead and ok != tried:
            problems.append(
                f"{label}: {client} {proto} {_fam(family)}: {ok}/{tried} worked, expected all"
            )
    return problems


def counter_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    return {
        fw: {k: v - before.get(fw, {}).get(k, 0) for k, v in c.items()} for fw, c in after.items()
    }


def _phase(lab: Lab, key: str, title: str, n: int) -> Phase:
    before = lab.counters()
    result = traffic.check(lab.plan, n=n)
    return Phase(key, title, result, counter_delta(before, lab.counters()))


def sample_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A few table rows to show: one per client address (IPv4 and IPv6), TCP if it has one."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        src = str(row.get("src"))
        if src not in best or (best[src].get("proto") != "tcp" and row.get("proto") == "tcp"):
            best[src] = row
    return [best[src] for src in sorted(best, key=lambda s: (":" in s, s))]


def run_mode(
    name: str,
    routed: bool,
    *,
    with_recipe: bool = False,
    n: int = 3,
    say: Say = print,
    detail: Say = print,
) -> ModeRun:
    """Runs the demo on one host mode; the lab is removed afterwards, whatever happens."""
    start = time.monotonic()
    run = ModeRun("routed" if routed else "bridged")
    say(f"{run.mode} host: building the lab")
    lab = Lab.up(P.Plan(name, routed=routed), detail)
    try:
        say(f"{run.mode} host: traffic without lasthop")
        off = _phase(lab, "off", "without", n)
        off.problems = expect_asymmetric(off.check, "without lasthop")
        run.phases.append(off)
        if with_recipe:
            _recipe_phases(lab, run, n, say)
        if not agent.available():
            run.notes.append(
                "lasthop agent not built yet (lasthop.controller missing): "
                "the 'with' half did not run"
            )
            run.problems.append("lasthop agent not available")
            return run
        say(f"{run.mode} host: starting lasthop")
        try:
            with agent.LasthopAgent(lab.plan):
                say(f"{run.mode} host: traffic with lasthop")
                on = _phase(lab, "on", "with lasthop", n)
                on.problems = expect_all_ok(on.check, "with lasthop")
                run.phases.append(on)
                run.show_rows = sample_rows(agent.show(lab.plan))
        except LabError as err:
            run.problems.append(f"lasthop: {err}")
        return run
    finally:
        say(f"{run.mode} host: removing the lab")
        lab.down(detail)
        run.seconds = time.monotonic() - start


def _recipe_phases(lab: Lab, run: ModeRun, n: int, say: Say) -> None:
    try:
        recipe.configure(lab)
    except recipe.RecipeError as err:
        run.notes.append(f"Linux recipe: {err}")
        return
    say(f"{run.mode} host: traffic with the Linux recipe (ct mark by firewall MAC + ip rule)")
    known = _phase(lab, "recipe", "recipe", n)
    known.problems = expect_all_ok(known.check, "recipe, known MACs")
    run.phases.append(known)
    fw = lab.plan.firewall(FAILOVER_SITE)
    say(
        f"{run.mode} host: {fw.name} fails over to MAC {fw.failover_mac}; "
        f"fw{ADDED_SITE} (cl{ADDED_SITE}) is added"
    )
    lab.failover(FAILOVER_SITE)
    lab.add_site(ADDED_SITE)
    changed = _phase(lab, "recipe-changed", "recipe after changes", n)
    changed.problems = expect_dead_only(
        changed.check, "recipe after changes", {f"cl{FAILOVER_SITE}", f"cl{ADDED_SITE}"}
    )
    run.phases.append(changed)
    run.notes.append(
        f"Linux recipe: knows fw1-fw3 by MAC; after {fw.name}'s fail-over to {fw.failover_mac} and "
        f"the new fw{ADDED_SITE}, their connections get no mark and die at fw1"
    )
    recipe.remove(lab)

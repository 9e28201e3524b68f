"""The Grafana dashboard shipped in the package (lasthop/dashboards/): every
query names metrics the exporter (lasthop.metrics.registry) really serves,
filters and groups by labels those metrics have, and matches only label
values the exporter can give (a counter's reason, a table event, ...); the
Prometheus scrape config reads the API's /metrics."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lasthop import abi, metrics
from lasthop.controller import Stats, TableStats
from lasthop.services.metrics import HEALTH_STATES

DASHBOARDS = files("lasthop") / "dashboards"
METRIC = re.compile(r"\b(lasthop_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")
GRAFANA_LABELS = {"instance", "job"}  # added by Prometheus to every scraped sample


def _table(states: dict[str, int]) -> TableStats:
    return TableStats(sum(states.values()), 100, 5, 4, 3, 2, states)


class Everything:
    """A source for the exporter in which every counter, state and peer is non-zero."""

    def __init__(self) -> None:
        every = {c.name.lower(): 1 for c in abi.Counter}
        states = {s.name.lower(): 1 for s in abi.State}
        self.stats_value = Stats(
            totals=every, interfaces={"up0": dict(every), "vm1": dict(every)},
            confirmed=_table(states), pending=_table(states), promoted=1, confirm_refused=1,
            expiry_passes=1, expiry_skipped=1, last_pass_age_s=0.1, next_due_s=1.0,
        )  # fmt: skip
        peer = SimpleNamespace(last_seen_s=1.0, lag_ms=5)
        self.replicator = SimpleNamespace(
            status=lambda: SimpleNamespace(
                published=1,
                unpublished=1,
                applied=1,
                unmapped=1,
                malformed=1,
                lost=1,
                resyncs=1,
                peers={"host2": peer},
            )  # fmt: skip
        )
        vm = SimpleNamespace(port="vm1", serving=True, health="up", changes=1)
        service = SimpleNamespace(service=SimpleNamespace(name="web"), vms=[vm])
        self.services = SimpleNamespace(status=lambda name=None: [service])

    def stats(self) -> Stats:
        return self.stats_value


def _served() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label -> the values the exporter gave it."""
    text = generate_latest(metrics.registry(Everything())).decode()  # type: ignore[arg-type]
    served: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = served.setdefault(sample.name, {})
            for k, v in sample.labels.items():
                labels.setdefault(k, set()).add(v)
    return served


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DASHBOARDS / "grafana-lasthop.json").read_text())
    return loaded


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out += [p] if p.get("type") != "row" else _panels(p.get("panels", []))
    return out


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    dash = _dashboard()
    found = [(p["title"], t["expr"]) for p in _panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            found.append((f"variable {var['name']}", q["query"]))
    return found


# the label values the exporter can give, beyond one scrape of Everything
KNOWN_VALUES = {
    "reason": {c.name.lower() for c in abi.Counter},
    "state": {s.name.lower() for s in abi.State},
    "status": set(HEALTH_STATES),
}


def test_the_dashboard_has_a_query_in_every_panel() -> None:
    dash = _dashboard()
    panels = _panels(dash["panels"])
    assert dash["uid"] == "lasthop" and len(panels) >= 10
    for p in panels:
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert all(t.get("expr") for t in p["targets"]), p["title"]


@pytest.mark.parametrize("where,query", _queries())
def test_every_query_names_served_metrics_labels_and_values(where: str, query: str) -> None:
    """Each metric in the query is served; each label it matches or groups by
    is one of that metric's; each value it matches is one the exporter gives."""
    served = _served()
    names = METRIC.findall(query)
    assert names, f"{where}: no lasthop metric in {query!r}"
    labels_here: set[str] = set(GRAFANA_LABELS)
    for name, matchers in names:
        assert name in served, f"{where}: {name} is not served (served: {sorted(served)})"
        have = served[name]
        labels_here |= set(have)
        for label, op, value in MATCHER.findall(matchers or ""):
            if label in GRAFANA_LABELS:
                continue
            assert label in have, f"{where}: {name} has no label {label!r} ({sorted(have)})"
            values = have[label] | KNOWN_VALUES.get(label, set())
            wanted = value.split("|") if op in ("=~", "!~") else [value]
            unknown = [v for v in wanted if v not in values]
            assert not unknown, f"{where}: {name}{{{label}}} never has {unknown}"
    for group in GROUPING.findall(query):
        for label in filter(None, (g.strip() for g in group.split(","))):
            assert label in labels_here, f"{where}: groups by {label!r}, which no metric has"


def test_the_scrape_config_reads_the_apis_metrics_route() -> None:
    text = (DASHBOARDS / "prometheus.yml").read_text()
    assert re.search(r"^\s+metrics_path: /metrics$", text, re.M)
    assert re.search(r"^\s+- job_name: lasthop$", text, re.M)
    api = (files("lasthop") / "api.py").read_text()
    assert '@app.get("/metrics")' in api

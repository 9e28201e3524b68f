"""Prometheus metrics of the services, read from the ServiceManager on
every scrape (lasthop.metrics registers the collector next to its own).

| metric | type | labels |
| --- | --- | --- |
| lasthop_vm_serving | gauge | service, vm (1: gets new connections) |
| lasthop_vm_health | gauge | service, vm, status (1 for the VM's current status) |
| lasthop_vm_health_changes_total | counter | service, vm |
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lasthop.services.manager import ServiceStatus
from lasthop.services.model import Status

__all__ = ["HEALTH_STATES", "ServicesCollector", "StatusSource"]


class StatusSource(Protocol):
    def status(self, name: str | None = None) -> list[ServiceStatus]: ...


HEALTH_STATES: tuple[Status, ...] = ("unknown", "up", "unhealthy", "down")


class ServicesCollector(Collector):
    """Per VM of every service: serving or not, health, and how often the
    health changed -- one status read per scrape."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        labels = ["service", "vm"]
        serving = GaugeMetricFamily(
            "lasthop_vm_serving", "1 when the VM gets new connections", labels=labels
        )
        health = GaugeMetricFamily(
            "lasthop_vm_health", "1 for the VM's current health status", labels=[*labels, "status"]
        )
        changes = CounterMetricFamily(
            "lasthop_vm_health_changes", "Health status changes of the VM", labels=labels
        )
        for st in self.source.status():
            for vm in st.vms:
                key = [st.service.name, vm.port]
                serving.add_metric(key, int(vm.serving))
                for state in HEALTH_STATES:
                    health.add_metric([*key, state], int(vm.health == state))
                changes.add_metric(key, vm.changes)
        yield serving
        yield health
        yield changes

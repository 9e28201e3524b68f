"""The services' Prometheus metrics: per VM, serving, health and health
changes, read from the service manager's status on each scrape."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from lasthop.services.metrics import ServicesCollector


class FakeServices:
    def __init__(self) -> None:
        self.reads = 0

    def status(self, name: str | None = None) -> list[Any]:
        self.reads += 1
        vms = [
            SimpleNamespace(port="vm1", serving=True, health="up", changes=1),
            SimpleNamespace(port="vm2", serving=False, health="unhealthy", changes=3),
        ]
        return [SimpleNamespace(service=SimpleNamespace(name="web"), vms=vms)]


def _scrape(source: FakeServices) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ServicesCollector(source))  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_each_vm_has_serving_health_and_changes() -> None:
    text = _scrape(FakeServices())
    assert 'lasthop_vm_serving{service="web",vm="vm1"} 1.0' in text
    assert 'lasthop_vm_serving{service="web",vm="vm2"} 0.0' in text
    assert 'lasthop_vm_health{service="web",status="unhealthy",vm="vm2"} 1.0' in text
    assert 'lasthop_vm_health{service="web",status="up",vm="vm2"} 0.0' in text
    assert 'lasthop_vm_health_changes_total{service="web",vm="vm2"} 3.0' in text


def test_status_is_read_once_per_scrape_and_not_on_registration() -> None:
    source = FakeServices()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ServicesCollector(source))  # type: ignore[arg-type]
    assert source.reads == 0
    generate_latest(reg)
    assert source.reads == 1

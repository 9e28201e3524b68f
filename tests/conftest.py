"""Shared test set-up: tests marked ``root`` are skipped, with the reason,
when the suite does not run as root. Fixtures for one area live in that
area's own conftest (tests/bpf/conftest.py, ...)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(
        reason="needs root (CAP_NET_ADMIN, CAP_BPF): run the suite as root, e.g. sudo scripts/test"
    )
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)

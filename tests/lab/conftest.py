"""Fixtures of the lab tests: each builds a lab under a name no one else
uses, and always removes it (namespaces, processes, nft tables, pins)."""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Iterator

import pytest

from lasthop.lab import Lab, Plan, down
from lasthop.lab.topology import lab_namespaces

_PREFIX = "t" + secrets.token_hex(2)  # two test runs at once never share a lab name
_numbers = itertools.count(1)


@pytest.fixture(autouse=True)
def _root_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces, nftables tables and veth links")


@contextlib.contextmanager
def _fresh_name() -> Iterator[str]:
    """A fresh lab name; whatever lab carries it is removed afterwards, and checked gone."""
    name = f"{_PREFIX}{next(_numbers):02d}"
    assert not lab_namespaces(name), f"lab name {name} is taken"
    try:
        yield name
    finally:
        down(name)
        assert not lab_namespaces(name), f"namespaces of lab {name} left behind"


@pytest.fixture
def lab_name() -> Iterator[str]:
    """A fresh lab name; whatever lab carries it is removed afterwards, and checked gone."""
    with _fresh_name() as name:
        yield name


@pytest.fixture
def bridged_lab(lab_name: str) -> Lab:
    return Lab.up(Plan(lab_name, routed=False))


@pytest.fixture
def routed_lab(lab_name: str) -> Lab:
    return Lab.up(Plan(lab_name, routed=True))


@pytest.fixture(params=["bridged", "routed"])
def any_lab(request: pytest.FixtureRequest, lab_name: str) -> Lab:
    return Lab.up(Plan(lab_name, routed=request.param == "routed"))


@pytest.fixture(scope="module", params=["bridged", "routed"])
def module_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab per host mode for a whole module (removed after its last test): for
    the tests that only read it, or restore what they change."""
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces, nftables tables and veth links")
    with _fresh_name() as name:
        yield Lab.up(Plan(name, routed=request.param == "routed"))

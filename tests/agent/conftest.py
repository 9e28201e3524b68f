"""The agent tests' sandbox: every namespace, agent and pin a test creates is
registered on it and removed afterwards (agentlib.Sandbox). A module that
needs more (test_controller: back to the test's own namespace) defines its own.
served_site: one bridged site with its agent for all of a module's tests that
only add connections of their own and read."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentlib import BridgedSite, Sandbox, sandbox


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox() as b:
        yield b


@pytest.fixture(scope="module")
def served_site(module_box: Sandbox) -> Iterator[BridgedSite]:
    """A BridgedSite whose VM runs the echo server, with `lasthop run --uplink fw0
    --bridge br0` attached: one per module (an agent start verifies the programs,
    ~3 s), for tests that each make connections of their own and read them."""
    site = BridgedSite(module_box)
    try:
        site.serve()
        module_box.agent("--uplink", "fw0", "--bridge", "br0", netns=site.host)
        yield site
    finally:
        site.close()

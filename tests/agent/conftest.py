"""The agent tests' sandbox: every namespace, agent and pin a test creates is
registered on it and removed afterwards (agentlib.Sandbox). A module that
needs more (test_controller: back to the test's own namespace) defines its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentlib import Sandbox, sandbox


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox() as b:
        yield b

"""The demo's verdicts: what counts as "fails without lasthop" and "works
with it" (no root needed: synthetic check results)."""

from __future__ import annotations

from lasthop.lab.demo import (
    counter_delta,
    expect_all_ok,
    expect_asymmetric,
    expect_dead_only,
    sample_rows,
)
from lasthop.lab.traffic import CheckResult, PathResult


def _result(ok: dict[str, int], tried: int = 3) -> CheckResult:
    """One TCP IPv4 path per client, with ok[client] successes out of tried."""
    return CheckResult(
        [PathResult(c, f"fw{c[-1]}", "vm1", "tcp", 4, tried, n) for c, n in ok.items()],
        elapsed_s=1.0,
    )


def test_asymmetric_means_cl1_works_and_every_other_client_dies() -> None:
    assert expect_asymmetric(_result({"cl1": 3, "cl2": 0, "cl3": 0}), "off") == []
    assert expect_asymmetric(_result({"cl1": 2, "cl2": 0, "cl3": 0}), "off") == [
        "off: cl1 tcp IPv4: 2/3 worked, expected all"
    ]
    assert expect_asymmetric(_result({"cl1": 3, "cl2": 1, "cl3": 0}), "off") == [
        "off: cl2 tcp IPv4: 1/3 worked, expected none"
    ]


def test_all_ok_means_every_single_connection() -> None:
    assert expect_all_ok(_result({"cl1": 3, "cl2": 3}), "on") == []
    assert len(expect_all_ok(_result({"cl1": 3, "cl2": 2}), "on")) == 1


def test_dead_only_names_the_clients_that_must_die() -> None:
    assert expect_dead_only(_result({"cl1": 3, "cl2": 0, "cl4": 0}), "x", {"cl2", "cl4"}) == []
    assert len(expect_dead_only(_result({"cl1": 3, "cl2": 3, "cl4": 0}), "x", {"cl2", "cl4"})) == 1


def test_counter_delta_subtracts_per_firewall() -> None:
    before = {"fw1": {"drop_invalid": 5, "drop_outside": 1}}
    after = {"fw1": {"drop_invalid": 9, "drop_outside": 1}, "fw4": {"drop_invalid": 2}}
    assert counter_delta(before, after) == {
        "fw1": {"drop_invalid": 4, "drop_outside": 0},
        "fw4": {"drop_invalid": 2},
    }


def test_sample_rows_keeps_one_row_per_client_address_preferring_tcp() -> None:
    rows = [
        {"proto": "udp", "src": "10.1.2.2"},
        {"proto": "tcp", "src": "10.1.2.2"},
        {"proto": "udp", "src": "fd00:1:2::2"},
        {"proto": "tcp", "src": "10.1.1.2"},
    ]
    assert sample_rows(rows) == [
        {"proto": "tcp", "src": "10.1.1.2"},
        {"proto": "tcp", "src": "10.1.2.2"},
        {"proto": "udp", "src": "fd00:1:2::2"},
    ]

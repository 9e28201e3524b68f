"""The demo's verdicts: what counts as "fails without lasthop" and "works
with it" (no root needed: synthetic check results)."""

from __future__ import annotations

from lasthop.lab.demo import (
    DrainRun,
    ModeRun,
    ServedConn,
    ServiceRun,
    counter_delta,
    expect_all_ok,
    expect_asymmetric,
    expect_dead_only,
    expect_drained,
    expect_served,
    expect_unserved,
    sample_rows,
)
from lasthop.lab.services import PORTS, VIP
from lasthop.lab.traffic import Attempt, CheckResult, PathResult

VMS = ["vm1", "vm2", "vm3"]


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


def _conn(client: str, vm: str | None, **changes: str) -> ServedConn:
    """A connection to the service from client, answered by vm, as predicted,
    its entry naming vm and the client's own firewall (unless changed)."""
    fw = f"fw{client[-1]}"
    fields = {"predicted": vm or "", "entry_vm": vm or "", "last_hop": fw if vm else ""}
    fields.update(changes)
    return ServedConn(client, fw, 4, 40000, vm, **fields)


def _spread() -> list[ServedConn]:
    return [_conn(f"cl{1 + i % 3}", VMS[i % 3]) for i in range(9)]


def test_served_means_answered_where_maglev_said_back_through_the_own_firewall() -> None:
    assert expect_served(_spread(), VMS, "svc") == []
    assert expect_served([*_spread(), _conn("cl2", None)], VMS, "svc") == [
        "svc: cl2 IPv4 port 40000: no answer"
    ]
    assert expect_served([*_spread(), _conn("cl2", "vm1", predicted="vm2")], VMS, "svc") == [
        "svc: cl2 IPv4 port 40000: answered by vm1, the Maglev table says vm2"
    ]
    assert expect_served([*_spread(), _conn("cl2", "vm1", entry_vm="vm3")], VMS, "svc") == [
        "svc: cl2 IPv4 port 40000: answered by vm1, its entry says vm3"
    ]
    assert expect_served([*_spread(), _conn("cl2", "vm1", last_hop="fw1")], VMS, "svc") == [
        "svc: cl2 IPv4 port 40000: last hop fw1, expected fw2"
    ]


def test_served_needs_every_vm_to_serve() -> None:
    only_two = [c for c in _spread() if c.vm != "vm3"]
    assert expect_served(only_two, VMS, "svc") == ["svc: vm3 served no connection"]


def _attempt(client: str, ok: bool) -> Attempt:
    return Attempt(
        client,
        f"fw{client[-1]}",
        "10.1.1.2",
        VIP.v4,
        80,
        "http",
        4,
        40000,
        None if ok else "timeout",
        "vm1" if ok else None,
    )


def test_unserved_names_the_clients_that_reach_the_address_without_lasthop() -> None:
    routed = [_attempt("cl1", False), _attempt("cl2", False)]
    assert expect_unserved(routed, "off", set()) == []
    assert expect_unserved(routed, "off", {"cl1"}) == ["off: cl1: 0/1 worked, expected all"]
    bridged = [_attempt("cl1", True), _attempt("cl2", True)]
    assert expect_unserved(bridged, "off", {"cl1"}) == ["off: cl2: 1/1 worked, expected none"]


def test_drained_means_no_new_connection_on_the_vm_and_the_open_one_kept() -> None:
    after = [_conn(f"cl{1 + i % 3}", ["vm1", "vm3"][i % 2]) for i in range(6)]
    assert expect_drained(DrainRun("vm2", "cl2", True, after), "d") == []
    assert expect_drained(DrainRun("vm2", "cl2", False, after), "d") == [
        "d: cl2's open connection to vm2 stopped"
    ]
    assert expect_drained(DrainRun("vm2", "cl2", True, [*after, _conn("cl1", "vm2")]), "d") == [
        "d: 1 new connections reached the drained vm2"
    ]
    assert expect_drained(DrainRun("vm2", "cl2", True, [*after, _conn("cl1", None)]), "d") == [
        "d: 1/7 new connections not answered"
    ]


def test_a_service_problem_fails_the_mode() -> None:
    """The demo's verdict (and so its exit code) includes the service section."""
    service = ServiceRun(VIP, PORTS, VMS, conns=_spread())
    run = ModeRun("routed", service=service)
    assert run.ok
    service.problems = ["service with lasthop: vm3 served no connection"]
    assert not run.ok and run.all_problems == service.problems

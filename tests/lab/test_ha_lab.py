"""Takeover of an HA pair (issue 12): the active host dies, or hands over,
while server-first connections idle; the standby, holding the replicated
table, sends every server's next bytes back through the client's own
firewall.

 clN ── fwN ─┐                 ┌─ A up0 [10.0.0.100]  A vms [10.2.0.1] ─┐
             ├─ sw br0 ────────┤      (killed)                           ├─ sw br1 ── vm1
             │                 └─ B up0 ── takes the VIPs ── B vms ──────┘
    Redis (lasthop --sync on A and B), keepalived VRRP in A and B

 before: clN ─▶ fwN ─▶ A ─▶ vm1        (A learns fwN's MAC, publishes; B applies)
 after:  vm1 speaks first ─▶ B (its copy of the entry) ─▶ fwN ─▶ clN
         without B's copy: B routes by default via fw1, which drops it
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lasthop.connections import decode
from lasthop.datapath import Maps, Pins
from lasthop.lab import ha, runner, topology
from lasthop.lab import plan as P
from lasthop.lab.namespaces import eventually

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.bpf,
    pytest.mark.slow,
    pytest.mark.skipif(not runner.available(), reason="agent not built yet"),
]

PROTOS = ("tcp", "udp")
PER_PATH = 3  # connections per (client, protocol)


@pytest.fixture
def ha_lab(lab_name: str) -> Iterator[ha.HaLab]:
    lab = ha.HaLab.start(lab_name)
    try:
        yield lab
    finally:
        lab.stop()


def _hold(lab: ha.HaLab, held: ha.HeldSet, clients: list[int]) -> list[ha.Held]:
    return [
        held.open(c, 1, proto, family)
        for c in clients
        for proto in PROTOS
        for family in ha.FAMILIES
        for _ in range(PER_PATH)
    ]


def _forget_on_b(lab: ha.HaLab, client: int) -> int:
    """Removes B's copy of client *client*'s entries straight from its pins
    (an agent's delete would publish the removal to A too); returns how many."""
    folder = topology._pin_folder(lab.b.ns)
    assert folder is not None
    maps = Maps.open_pinned(Pins(folder))
    try:
        srcs = {lab.plan.client(client).addr.of(family) for family in ha.FAMILIES}
        keys = [k for k, e in maps.entries() if decode(k, e, 0, 1000).src in srcs]
        return sum(maps.delete(k) for k in keys)
    finally:
        maps.close()


def _drops(lab: ha.HaLab, fw: str) -> int:
    return sum(v for k, v in lab.counters()[fw].items() if k.startswith("drop_"))


def test_crash_of_the_active_host_loses_no_connection(ha_lab: ha.HaLab) -> None:
    """A dies (links, keepalived, agent) while connections from cl1 and cl2,
    IPv4 and IPv6, idle: B becomes master and every server speaks first through B to its
    client's own firewall; cl3's connections, whose copies were removed from
    B beforehand, show what happens without them (fw1 drops the bytes)."""
    lab = ha_lab
    with ha.HeldSet(lab) as held:
        kept = _hold(lab, held, [1, 2])
        control = _hold(lab, held, [3])
        lab.wait_replicated(kept + control)
        b_rows = ha.entries_by_port(lab.show(lab.b))
        for c in kept + control:
            assert P.firewall_of(b_rows[c.row_key]["mac"]) == f"fw{c.client}"
        assert _forget_on_b(lab, 3) == len(control)

        fw1_drops = _drops(lab, "fw1")
        lab.crash(lab.a)
        lab.wait_vrrp(lab.b, "MASTER")
        lab.wait_neighbours(lab.b)

        pushed = {(c.client, c.proto, c.sport): c.push(b"server first\n") for c in kept}
        assert all(pushed.values()), {k: v for k, v in pushed.items() if not v}
        assert all(c.echo(b"client again\n") for c in kept)

        # the control: B has no entry, routes the VM's bytes by default to fw1
        for c in control:
            c.srv.sendall(b"lost\n") if c.proto == "tcp" else c.srv.sendto(b"lost\n", c.peer)
        assert eventually(lambda: _drops(lab, "fw1") >= fw1_drops + len(control), 10)
        assert not any(c.receive(b"lost\n", 0.5) for c in control)


def test_planned_switch_over_loses_no_connection(ha_lab: ha.HaLab) -> None:
    """keepalived on A stops (a planned switch-over; A's agent stays): B takes
    the addresses at once and every held connection's server (IPv4 and IPv6) speaks first
    through B, then its client; no firewall drops a packet."""
    run = ha.takeover(ha_lab, planned=True, per_path=PER_PATH)
    assert not ha_lab.holds_vips(ha_lab.a)
    assert set(run.rows) == {(c, p, f) for c in (1, 2, 3) for p in PROTOS for f in ha.FAMILIES}
    for row in run.rows.values():
        assert row.held == row.on_standby == row.pushed == row.echoed == PER_PATH, row
    assert run.lost == 0
    assert run.drops == {"fw1": 0, "fw2": 0, "fw3": 0}

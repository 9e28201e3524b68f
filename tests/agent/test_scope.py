"""Scope end to end: the agent writes the config's [[scope]] rules; a reload
that changes them keeps the established entries; `lasthop flush
--out-of-scope` removes (in the kernel) only those the new rules pass; a
reload that drops an uplink removes that uplink's entries.

    up0 ┐                 entries: A on up0 to port 22, B on up0 to port 80,
         host ── vm0               C on up1 to port 80
    up1 ┘
"""

from __future__ import annotations

import json
from pathlib import Path

from agentlib import ROOT_MARKS, PinnedTable, Sandbox, conn_key, lasthop

pytestmark = ROOT_MARKS

BASE = '[[uplink]]\nname = "up0"\n[[vm_port]]\nname = "vm0"\n'
UP1 = '[[uplink]]\nname = "up1"\n'
PASS_SSH = '[[scope]]\naction = "pass"\nproto = "tcp"\nport = 22\n'


def _config(path: Path, netns: str, body: str) -> None:
    path.write_text(f'netns = "{netns}"\nexpiry_interval = 0.5\n{body}')


def _reload(cfg: Path) -> None:
    result = lasthop("reload", "--config", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_change_keeps_entries_until_flush_out_of_scope_and_a_removed_uplink_loses_its(
    box: Sandbox,
) -> None:
    ns = box.host(uplinks=2)
    cfg = box.logs / "lasthop.toml"
    _config(cfg, ns.name, BASE + UP1)
    box.agent("--config", str(cfg), netns=None)
    table = PinnedTable(ns.pins)
    up0, up1 = ns.ifindex("up0"), ns.ifindex("up1")
    ssh = conn_key("198.51.100.1", "192.0.2.11", 40001, 22, proto=6)
    web = conn_key("198.51.100.1", "192.0.2.11", 40002, 80, proto=6)
    other = conn_key("198.51.100.2", "192.0.2.11", 40003, 80, proto=6)
    try:
        table.add(ssh, uplink=up0)
        table.add(web, uplink=up0)
        table.add(other, uplink=up1)
        _config(cfg, ns.name, PASS_SSH + BASE + UP1)
        _reload(cfg)
        assert set(table.keys()) == {bytes(ssh), bytes(web), bytes(other)}  # all kept
        result = lasthop("flush", "--out-of-scope", "--netns", ns.name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "flushed 1 entries now out of scope"
        assert set(table.keys()) == {bytes(web), bytes(other)}
        stats = json.loads(lasthop("stats", "--netns", ns.name, "--json").stdout)
        assert stats["totals"]["scope_flushed"] == 1
        _config(cfg, ns.name, PASS_SSH + BASE)  # up1 leaves the config
        _reload(cfg)
        assert set(table.keys()) == {bytes(web)}
        assert ns.tc_program("up1") is None
    finally:
        table.close()


def test_an_uplink_with_learn_false_is_passed_as_a_rule_would_pass_it(box: Sandbox) -> None:
    """`learn = false` on up0 is a pass rule for up0 ahead of [[scope]]: the
    reload keeps the entries, the flush removes up0's and only up0's."""
    ns = box.host(uplinks=2)
    cfg = box.logs / "lasthop.toml"
    _config(cfg, ns.name, BASE + UP1)
    box.agent("--config", str(cfg), netns=None)
    table = PinnedTable(ns.pins)
    on_up0 = conn_key("198.51.100.1", "192.0.2.11", 40001, 80, proto=6)
    on_up1 = conn_key("198.51.100.2", "192.0.2.11", 40002, 80, proto=6)
    try:
        table.add(on_up0, uplink=ns.ifindex("up0"))
        table.add(on_up1, uplink=ns.ifindex("up1"))
        _config(cfg, ns.name, BASE.replace('name = "up0"\n', 'name = "up0"\nlearn = false\n') + UP1)
        _reload(cfg)
        assert set(table.keys()) == {bytes(on_up0), bytes(on_up1)}
        result = lasthop("flush", "--out-of-scope", "--netns", ns.name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "flushed 1 entries now out of scope"
        assert set(table.keys()) == {bytes(on_up1)}
    finally:
        table.close()

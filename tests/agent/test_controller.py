"""The controller in-process, on the real kernel, in a private network
namespace (the test thread enters it and comes back afterwards)."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlib import (
    ROOT_MARKS,
    Netns,
    PinnedTable,
    Sandbox,
    back_to_own_netns,
    conn_key,
    sandbox,
    wait_for,
)
from lasthop import abi, libbpf
from lasthop.config import Config, Interface
from lasthop.controller import Controller, LinkError, NotAttachedError, TableSizeError
from lasthop.datapath import (
    TC_HANDLE,
    TC_PRIORITY,
    TC_PROGRAMS,
    Datapath,
    Pins,
    filter_prog_id,
)
from lasthop.errors import DatapathError
from lasthop.libbpf import EGRESS, INGRESS, TcHook
from lasthop.services import store

pytestmark = ROOT_MARKS


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox() as b, back_to_own_netns():
        yield b


def _config(uplinks: list[str], vm_ports: list[str] = (), **kw: object) -> Config:  # type: ignore[assignment]
    return Config(
        uplinks=[Interface(name=n) for n in uplinks],
        vm_ports=[Interface(name=n) for n in vm_ports],
        **kw,
    )


def _started(ns: Netns, config: Config) -> Controller:
    c = Controller(ns.name)
    c.start(config)
    return c


def _tc_filter(ifindex: int, point: int) -> int | None:
    """The prog id of our clsact filter on the hook, None without one."""
    return TcHook(ifindex, point).query(handle=TC_HANDLE, priority=TC_PRIORITY)


def _ours_on_tcx(ifindex: int, point: int) -> list[int]:
    """The prog ids of our programs among the tcx hook's."""
    return [i for i in libbpf.tcx_prog_ids(ifindex, point) if libbpf.prog_name(i) in TC_PROGRAMS]


@pytest.mark.parametrize("tc_hook", ["auto", "clsact"])
def test_start_attaches_each_role_at_tc_ingress(box: Sandbox, tc_hook: str) -> None:
    """start() puts lh_uplink on uplinks and lh_vmport on VM ports and configures each
    interface with its role, MAC and a slot of its own; a routed host's uplink also gets
    lh_uplink_out at its egress, loaded then, on the agent's own maps. With tc_hook auto
    (this kernel has tcx) each is a tcx link pinned beside the maps and no clsact filter;
    with clsact, a filter and no tcx link."""
    ns = box.host(uplinks=1, vm_ports=2)
    c = _started(ns, _config(["up0"], ["vm0", "vm1"], routed=True, tc_hook=tc_hook))
    try:
        ids = {name: filter_prog_id(ns.ifindex(name)) for name in ("up0", "vm0", "vm1", "up0p")}
        assert ids["up0"] and ids["vm0"] and ids["vm0"] == ids["vm1"] and ids["up0"] != ids["vm0"]
        assert ids["up0p"] is None
        tcx = tc_hook == "auto"
        for name in ("up0", "vm0", "vm1"):
            index = ns.ifindex(name)
            assert _ours_on_tcx(index, INGRESS) == ([ids[name]] if tcx else [])
            assert _tc_filter(index, INGRESS) == (None if tcx else ids[name])
        assert c.datapath is not None and c.datapath.tcx is tcx
        pinned = sorted(p.name for p in (ns.pins / "tcx").glob("*"))
        links = [f"{ns.ifindex(n)}-ingress" for n in ("up0", "vm0", "vm1")]
        assert pinned == (sorted([*links, f"{ns.ifindex('up0')}-egress"]) if tcx else [])
        info = {i.name: i for i in c.interfaces()}
        assert {n: i.role for n, i in info.items()} == {
            "up0": "uplink",
            "vm0": "vm_port",
            "vm1": "vm_port",
        }
        assert info["up0"].mac == ns.mac("up0")
        assert len({i.slot for i in info.values()}) == 3 and 0 not in {
            i.slot for i in info.values()
        }
        assert (info["up0"].routed, info["vm0"].routed) == (False, True)
        kind = "tcx" if tcx else "clsact"
        assert {n: i.hook for n, i in info.items()} == {"up0": kind, "vm0": kind, "vm1": kind}
        assert c.attached.uplinks == {ns.ifindex("up0"): "up0"}
        dp = c.datapath
        assert dp is not None and dp.loaded_later("lh_uplink_out")
        out = {name: filter_prog_id(ns.ifindex(name), EGRESS) for name in ("up0", "vm0")}
        assert out["up0"] is not None and out["vm0"] is None
        assert libbpf.prog_name(out["up0"]) == "lh_uplink_out"
        assert dp.maps.conns4.info.id in _prog_maps(out["up0"])
    finally:
        c.close()


def _hooks(ns: Netns, name: str) -> dict[str, object]:
    """What holds our programs on *name*'s tc hooks: tcx link ids (by prog name) and filters."""
    index = ns.ifindex(name)
    return {
        "tcx": [libbpf.prog_name(i) for i in _ours_on_tcx(index, INGRESS)]
        + [libbpf.prog_name(i) for i in _ours_on_tcx(index, EGRESS)],
        "clsact": [
            libbpf.prog_name(i)
            for i in (_tc_filter(index, INGRESS), _tc_filter(index, EGRESS))
            if i is not None
        ],
    }


def test_a_restart_replaces_the_program_on_the_same_link(box: Sandbox) -> None:
    """The tcx link outlives the agent (pinned): a new agent's attach puts its program on
    that link (one program per hook, the pin the same link), not a second link beside it."""
    ns = box.host(uplinks=1, vm_ports=1)
    config = _config(["up0"], ["vm0"], routed=True)
    first = _started(ns, config)
    before = {n: filter_prog_id(ns.ifindex(n)) for n in ("up0", "vm0")}
    pin = ns.pins / "tcx" / f"{ns.ifindex('up0')}-ingress"
    link_id = _link_id(pin)
    first.close()
    assert {n: filter_prog_id(ns.ifindex(n)) for n in ("up0", "vm0")} == before  # still on
    second = _started(ns, config)
    try:
        after = {n: filter_prog_id(ns.ifindex(n)) for n in ("up0", "vm0")}
        assert after["up0"] != before["up0"] and after["vm0"] != before["vm0"]  # new programs
        assert _link_id(pin) == link_id
        assert _hooks(ns, "up0") == {"tcx": ["lh_uplink", "lh_uplink_out"], "clsact": []}
        assert _hooks(ns, "vm0") == {"tcx": ["lh_vmport"], "clsact": []}
    finally:
        second.close()


def _link_id(pin: Path) -> int:
    fd = libbpf.obj_get(pin)
    try:
        info = ctypes.create_string_buffer(256)
        size = ctypes.c_uint32(256)
        assert libbpf._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) == 0
        return int.from_bytes(info.raw[4:8], "little")  # bpf_link_info.id
    finally:
        os.close(fd)


@pytest.mark.parametrize(("first", "then"), [("clsact", "auto"), ("auto", "clsact")])
def test_changing_tc_hook_leaves_one_kind(box: Sandbox, first: str, then: str) -> None:
    """A restart with another tc_hook (or after a release that attached clsact filters)
    puts the programs on the new kind of hook and takes them off the old one: one program
    per hook, never none (the new is on before the old goes), no pin of a link left."""
    ns = box.host(uplinks=1, vm_ports=1)
    _started(ns, _config(["up0"], ["vm0"], routed=True, tc_hook=first)).close()
    c = _started(ns, _config(["up0"], ["vm0"], routed=True, tc_hook=then))
    try:
        kind, other = ("tcx", "clsact") if then == "auto" else ("clsact", "tcx")
        assert _hooks(ns, "up0") == {kind: ["lh_uplink", "lh_uplink_out"], other: []}
        assert _hooks(ns, "vm0") == {kind: ["lh_vmport"], other: []}
        assert bool(list((ns.pins / "tcx").glob("*"))) == (then == "auto")
    finally:
        c.close()


def test_tc_hook_tcx_on_this_kernel(box: Sandbox) -> None:
    """tc_hook = "tcx" attaches links (this kernel has them), as auto does."""
    ns = box.host(uplinks=1, vm_ports=1)
    c = _started(ns, _config(["up0"], ["vm0"], tc_hook="tcx"))
    try:
        assert _hooks(ns, "vm0") == {"tcx": ["lh_vmport"], "clsact": []}
    finally:
        c.close()


def _no_tcx(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """bpf_link_create as a kernel older than 6.6 answers it (EINVAL: no such attach
    type); the list records each refused attach's ifindex."""
    refused: list[int] = []

    def refuse(self: libbpf.TcxHook, prog_fd: int) -> int:
        refused.append(self.ifindex)
        raise libbpf.BpfError(f"bpf_link_create(tcx, ifindex {self.ifindex})", errno.EINVAL)

    monkeypatch.setattr(libbpf.TcxHook, "attach", refuse)
    return refused


def test_auto_falls_back_to_clsact_without_tcx(
    box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a kernel without tcx, tc_hook auto attaches clsact filters, asking the kernel
    once (the first attach), not at every interface; tc_hook tcx is a DatapathError
    naming the interface and the kernel's answer."""
    refused = _no_tcx(monkeypatch)
    ns = box.host(uplinks=1, vm_ports=2)
    c = _started(ns, _config(["up0"], ["vm0", "vm1"], routed=True))
    try:
        assert c.datapath is not None and c.datapath.tcx is False
        assert len(refused) == 1
        assert _hooks(ns, "up0") == {"tcx": [], "clsact": ["lh_uplink", "lh_uplink_out"]}
        assert _hooks(ns, "vm1") == {"tcx": [], "clsact": ["lh_vmport"]}
    finally:
        c.close()
    c = Controller(ns.name)
    try:
        with pytest.raises(
            DatapathError, match=r"cannot attach to ifindex \d+: .*Invalid argument"
        ):
            c.start(_config(["up0"], ["vm0"], tc_hook="tcx"))
    finally:
        c.close()


def test_a_pin_of_a_link_whose_device_went_is_replaced(box: Sandbox) -> None:
    """A pinned link whose interface was deleted is defunct: forget() removes its pin, and a
    pin that names the ifindex of another hook is not taken for ours."""
    ns = box.host(uplinks=1, vm_ports=2)
    c = _started(ns, _config(["up0"], ["vm0", "vm1"]))
    try:
        vm1 = ns.ifindex("vm1")
        pin = ns.pins / "tcx" / f"{vm1}-ingress"
        assert pin.exists()
        ns.ip("link", "del", "vm1")
        c.forget(vm1)
        assert not pin.exists()
        # vm0's pin holding another hook's link (up0's, pinned there too): vm0's own
        # link, unpinned, went; the next attach makes vm0 a link and leaves up0's alone
        vm0 = ns.ifindex("vm0")
        vm0_pin = ns.pins / "tcx" / f"{vm0}-ingress"
        vm0_pin.unlink()  # its last reference: the kernel releases the link in a work item
        wait_for(lambda: filter_prog_id(vm0) is None)
        assert [i.hook for i in c.interfaces() if i.name == "vm0"] == ["none"]  # as it is
        fd = libbpf.obj_get(ns.pins / "tcx" / f"{ns.ifindex('up0')}-ingress")
        try:
            libbpf.obj_pin(fd, vm0_pin)
        finally:
            os.close(fd)
        c.attach(c.links.by_index(vm0), abi.Role.VM_PORT)  # type: ignore[arg-type]
        assert _hooks(ns, "vm0") == {"tcx": ["lh_vmport"], "clsact": []}
        assert _hooks(ns, "up0") == {"tcx": ["lh_uplink"], "clsact": []}
    finally:
        c.close()


@pytest.mark.parametrize(
    ("uplinks", "vm_ports", "message"),
    [
        (["nope0"], [], "uplink 'nope0' not found in this network namespace"),
        (["up0"], ["nope1"], "VM port 'nope1' not found in this network namespace"),
        ([], ["vm0"], "no uplink given"),
    ],
)
def test_start_names_a_missing_interface(
    box: Sandbox, uplinks: list[str], vm_ports: list[str], message: str
) -> None:
    """A missing interface (or no uplink at all) is a LinkError naming it; nothing is pinned."""
    ns = box.host()
    c = Controller(ns.name)
    try:
        with pytest.raises(LinkError, match=message):
            c.start(_config(uplinks, vm_ports))
        assert not ns.pins.exists() or not any(ns.pins.iterdir())
    finally:
        c.close()


def test_bridge_attaches_every_port_but_the_uplink(box: Sandbox) -> None:
    """With a bridge, its ports become VM ports, except those named as uplinks; a bridged
    host neither loads nor attaches lh_uplink_out (it sends no ICMP errors about VM traffic)."""
    ns = box.host(uplinks=1, vm_ports=2)
    ns.bridge("br0", "up0", "vm0", "vm1")
    c = _started(ns, _config(["up0"], bridge="br0", bridge_zone=7))
    try:
        assert sorted(c.attached.vm_ports.values()) == ["vm0", "vm1"]
        assert {i.name: (i.role, i.zone) for i in c.interfaces()} == {
            "up0": ("uplink", 0),
            "vm0": ("vm_port", 7),
            "vm1": ("vm_port", 7),
        }
        assert c.datapath is not None and not c.datapath.loaded_later("lh_uplink_out")
        assert filter_prog_id(ns.ifindex("up0"), EGRESS) is None
    finally:
        c.close()


def test_restart_adopts_the_table_and_keeps_slots(box: Sandbox) -> None:
    """A new controller on the same namespace reuses the pinned maps (same id, entries kept) and
    the interfaces keep their counter slots."""
    ns = box.host()
    config = _config(["up0"], ["vm0"])
    first = _started(ns, config)
    map_id = first.datapath.maps.conns.info.id  # type: ignore[union-attr]
    slots = {i.name: i.slot for i in first.interfaces()}
    first.close()
    table = PinnedTable(ns.pins)
    table.add(conn_key("192.0.2.1", "192.0.2.2", 1, 2), uplink=ns.ifindex("up0"))
    table.close()
    second = _started(ns, config)
    try:
        assert second.datapath.maps.conns.info.id == map_id  # type: ignore[union-attr]
        assert [c.src for c in second.connections()] == ["192.0.2.1"]
        assert {i.name: i.slot for i in second.interfaces()} == slots
    finally:
        second.close()


def test_restart_without_an_interface_detaches_it(box: Sandbox) -> None:
    """An interface the previous run attached but this config omits loses its filter and config."""
    ns = box.host(uplinks=1, vm_ports=2)
    _started(ns, _config(["up0"], ["vm0", "vm1"])).close()
    c = _started(ns, _config(["up0"], ["vm0"]))
    try:
        assert filter_prog_id(ns.ifindex("vm1")) is None
        assert [i.name for i in c.interfaces()] == ["up0", "vm0"]
    finally:
        c.close()


def test_table_size_change_is_a_table_size_error(box: Sandbox) -> None:
    """Asking for another table_size than the pinned table's raises TableSizeError saying both."""
    ns = box.host()
    _started(ns, _config(["up0"], table_size=2048, pending_in_place=0)).close()
    c = Controller(ns.name)
    try:
        with pytest.raises(TableSizeError, match="holds 2048 entries, the config asks for 4096"):
            c.start(_config(["up0"], table_size=4096, pending_in_place=0))
    finally:
        c.close()


def test_forget_detaches_a_port_that_still_exists(box: Sandbox) -> None:
    """forget() clears the port's config and takes our filter off it."""
    ns = box.host(uplinks=1, vm_ports=2)
    c = _started(ns, _config(["up0"], ["vm0", "vm1"]))
    try:
        vm0 = ns.ifindex("vm0")
        c.forget(vm0)
        assert filter_prog_id(vm0) is None
        assert filter_prog_id(ns.ifindex("vm1")) is not None
        assert vm0 not in c.attached.vm_ports
        assert [i.name for i in c.interfaces()] == ["up0", "vm1"]
    finally:
        c.close()


def test_expire_removes_only_idle_entries_by_state_and_counts_them(box: Sandbox) -> None:
    """expire() runs the kernel's pass: entries idle past their state's timeout go
    (established 7440 s, udp_new 30 s by default), in both tables; the pass
    returns how many and stats counts them per table, none as agent_removed."""
    ns = box.host()
    c = _started(ns, _config(["up0"], ["vm0"]))
    try:
        table = PinnedTable(ns.pins)
        up0 = ns.ifindex("up0")
        # idle far past the timeouts, and far inside them: no margin a slow machine could eat
        table.add(conn_key("192.0.2.1", "192.0.2.9", 1, 80), uplink=up0, idle_s=8000)
        table.add(conn_key("192.0.2.2", "192.0.2.9", 1, 80), uplink=up0, idle_s=600)
        udp = abi.State.UDP_NEW
        table.add(conn_key("192.0.2.3", "192.0.2.9", 1, 53), uplink=up0, idle_s=600, state=udp,
                  pending=True)  # fmt: skip
        table.add(conn_key("192.0.2.4", "192.0.2.9", 1, 53), uplink=up0, idle_s=0, state=udp,
                  pending=True)  # fmt: skip
        table.close()
        assert c.expire() == 2
        assert sorted(x.src for x in c.connections()) == ["192.0.2.2", "192.0.2.4"]
        assert c.expire() == 0
        st = c.stats()
        assert (st.confirmed.expired, st.pending.expired) == (1, 1)
        assert (st.confirmed.entries, st.pending.entries) == (1, 1)
        assert st.confirmed.states == {"tcp_established": 1} and st.pending.states == {"udp_new": 1}
        assert st.totals["agent_removed"] == 0
        # the second run had nothing to do: no change since the first, nothing due
        assert (st.expiry_passes, st.expiry_skipped) == (1, 1)
    finally:
        c.close()


def test_flush_removes_everything(box: Sandbox) -> None:
    """flush() empties the table and returns how many entries it removed."""
    ns = box.host()
    c = _started(ns, _config(["up0"]))
    try:
        table = PinnedTable(ns.pins)
        for port in range(5):
            table.add(conn_key("192.0.2.1", "192.0.2.9", port, 80))
        table.close()
        assert c.flush() == 5
        assert c.connections() == []
        assert c.flush() == 0
    finally:
        c.close()


def test_connections_sorted_by_age_and_limited(box: Sandbox) -> None:
    """connections() lists the most recently seen first; limit keeps that many."""
    ns = box.host()
    c = _started(ns, _config(["up0"]))
    try:
        table = PinnedTable(ns.pins)
        for i, idle in enumerate((5, 1, 9)):
            table.add(conn_key(f"192.0.2.{i + 1}", "192.0.2.9", 1, 80), idle_s=idle)
        table.close()
        assert [x.src for x in c.connections()] == ["192.0.2.2", "192.0.2.1", "192.0.2.3"]
        assert [x.src for x in c.connections(limit=2)] == ["192.0.2.2", "192.0.2.1"]
    finally:
        c.close()


def test_stats_names_interfaces_and_reads_the_kernel_counts(box: Sandbox) -> None:
    """stats() reports counters under interface names, each table's entries as the
    kernel counts them, and pending evictions from the kernel's exact terms."""
    ns = box.host()
    c = _started(ns, _config(["up0"], ["vm0"], table_size=512))
    try:
        maps = c.datapath.maps  # type: ignore[union-attr]
        slot = {i.name: i.slot for i in c.interfaces()}
        maps.add_counter(slot["up0"], abi.Counter.LEARNED, 10)
        maps.add_counter(slot["vm0"], abi.Counter.REDIRECTED, 4)
        maps.add_table_counter(abi.TableCounter.PENDING_INSERTED, 10)
        maps.add_table_counter(abi.TableCounter.PENDING_PROMOTED, 3)
        table = PinnedTable(ns.pins)
        table.add(conn_key("192.0.2.1", "192.0.2.9", 1, 80))
        table.add(conn_key("192.0.2.2", "192.0.2.9", 1, 80), pending=True)
        table.close()
        st = c.stats()
        assert st.interfaces["up0"] == {"learned": 10}
        assert st.interfaces["vm0"] == {"redirected": 4}
        # capacity: IPv4 and IPv6 (a quarter of IPv4's, at least 1024) together
        assert (st.confirmed.entries, st.confirmed.capacity) == (1, 512 + 1024)
        # pending: lh_pending4 (1024), the in-place room (a quarter of it), lh_pending (1024)
        assert (st.pending.entries, st.pending.capacity) == (1, 1024 + 256 + 1024)
        assert st.pending.evicted == 10 - 3 - 1  # inserted - promoted - entries
        assert st.totals["learned"] == 10 and st.totals["miss"] == 0
    finally:
        c.close()


def test_in_place_entries_are_pending_and_the_agents_removal_frees_their_quota(
    box: Sandbox,
) -> None:
    """pending_in_place sizes lh_conns4 table_size + quota and sets the quota;
    stats counts an unconfirmed entry waiting in lh_conns4 as pending (its
    room too); flush removes it through lh_conn_remove, which takes it off the
    kernel's count, and counts it inplace_removed."""
    ns = box.host()
    c = _started(ns, _config(["up0"], table_size=512, pending_in_place=16))
    try:
        maps = c.datapath.maps  # type: ignore[union-attr]
        assert maps.conns4.info.max_entries == 512 + 16
        settings = maps.get_settings()
        assert settings.inplace_quota == 16 and settings.flags & abi.F_SET_INPLACE
        table = PinnedTable(ns.pins)
        table.add(conn_key("192.0.2.1", "192.0.2.9", 1, 80))
        table.close()
        waiting = abi.ConnEntry(state=int(abi.State.TCP_SYN_SENT), flags2=abi.F_ENTRY2_INPLACE)
        key = conn_key("192.0.2.2", "192.0.2.9", 1, 80)
        maps.tables_for(key)[0].update(key, waiting)  # as the data path inserts it ...
        maps.inplace.update(bytes(4), bytes(abi.InplaceCount(count=1)))  # ... and counts it
        st = c.stats()
        assert (st.confirmed.entries, st.confirmed.capacity) == (1, 512 + 1024)
        assert (st.pending.entries, st.pending.capacity) == (1, 1024 + 16 + 1024)
        assert st.pending.evicted == 0
        before = maps.table_totals()
        assert c.flush() == 2
        after = maps.table_totals()
        count = abi.InplaceCount.from_buffer_copy(maps.inplace.lookup(bytes(4)) or bytes(8))
        assert count.count == 0
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        assert moved == {abi.TableCounter.CONFIRMED_REMOVED: 1, abi.TableCounter.INPLACE_REMOVED: 1}
    finally:
        c.close()


def test_pending_in_place_is_not_used_with_sync(box: Sandbox) -> None:
    """With sync on, new connections keep to the pending LRU: the quota written is 0."""
    ns = box.host()
    c = _started(ns, _config(["up0"], pending_in_place=16, sync="redis://127.0.0.1:1/0"))
    try:
        settings = c.datapath.maps.get_settings()  # type: ignore[union-attr]
        assert settings.inplace_quota == 0 and not settings.flags & abi.F_SET_INPLACE
    finally:
        c.close()


@pytest.mark.parametrize(
    ("kw", "size", "quota"),
    [
        ({}, 2048 + 256, 256),  # the default: a quarter of the pending table (1024)
        ({"sync": "redis://127.0.0.1:1/0"}, 2048, 0),  # sync on: no room, no quota
        ({"pending_in_place": 0}, 2048, 0),  # asked off
    ],
    ids=["default", "sync", "off"],
)
def test_the_in_place_quota_by_default(
    box: Sandbox, caplog: pytest.LogCaptureFixture, kw: dict[str, object], size: int, quota: int
) -> None:
    """With no pending_in_place, new connections wait in place up to a quarter
    of the pending table, lh_conns4 sized for it; with sync on, no room and no
    quota, and no warning (the config asked for nothing)."""
    ns = box.host()
    c = _started(ns, _config(["up0"], table_size=2048, pending_table_size=1024, **kw))
    try:
        maps = c.datapath.maps  # type: ignore[union-attr]
        assert maps.conns4.info.max_entries == size
        settings = maps.get_settings()
        assert settings.inplace_quota == quota
        assert bool(settings.flags & abi.F_SET_INPLACE) == bool(quota)
        assert "pending_in_place" not in caplog.text
    finally:
        c.close()


def test_a_pinned_table_without_room_keeps_its_size_when_the_quota_is_the_default(
    box: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent restarted over an older agent's lh_conns4 (no room beside
    table_size) starts with the default config, without the quota, and keeps
    every entry: no detach needed for a default (logged)."""
    ns = box.host()
    c = _started(ns, _config(["up0"], table_size=2048, pending_in_place=0))
    table = PinnedTable(ns.pins)
    table.add(conn_key("192.0.2.1", "192.0.2.9", 1, 80))
    table.close()
    c.close()
    caplog.set_level(logging.INFO, logger="lasthop")
    c = _started(ns, _config(["up0"], table_size=2048))
    try:
        maps = c.datapath.maps  # type: ignore[union-attr]
        assert maps.conns4.info.max_entries == 2048
        assert maps.get_settings().inplace_quota == 0
        assert c.stats().confirmed.entries == 1
        assert "room for 0 connections waiting in place" in caplog.text
    finally:
        c.close()


def test_detach_removes_filters_and_pins(box: Sandbox) -> None:
    """detach() takes our filter off every interface and removes the pins."""
    ns = box.host()
    _started(ns, _config(["up0"], ["vm0"])).close()
    c = Controller(ns.name)
    try:
        assert sorted(c.detach()) == ["up0", "vm0"]
        assert (
            filter_prog_id(ns.ifindex("up0")) is None and filter_prog_id(ns.ifindex("vm0")) is None
        )
        assert not ns.pins.exists()
        assert c.detach() == []
    finally:
        c.close()


def test_detach_forgets_the_services_state(
    box: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """detach also removes the namespace's services state (/run/lasthop/<netns>/):
    the next run starts from its config alone, not the services of before."""
    monkeypatch.setattr(store, "STATE_DIR", tmp_path)
    ns = box.host()
    _started(ns, _config(["up0"], ["vm0"])).close()
    c = Controller(ns.name)
    try:
        store.ServiceStore(store.state_path(ns.name)).save(store.StateFile(ids={"web": 1}))
        assert (tmp_path / ns.name / "services.json").exists()
        c.detach()
        assert not (tmp_path / ns.name).exists()
        assert not ns.pins.exists()
    finally:
        c.close()


def test_reading_where_nothing_is_attached_raises_not_attached(box: Sandbox) -> None:
    """Without pins, connections(), stats() and flush() raise NotAttachedError naming the folder."""
    ns = box.host()
    c = Controller(ns.name)
    try:
        for read in (c.connections, c.stats, c.flush, c.interfaces):
            with pytest.raises(NotAttachedError, match=f"no data path pinned at .*{ns.name}"):
                read()
    finally:
        c.close()


def test_writes_wait_for_the_lock(box: Sandbox) -> None:
    """flush() from another thread (the API) waits while the agent thread holds the lock."""
    ns = box.host()
    c = _started(ns, _config(["up0"]))
    try:
        done = threading.Event()
        with c._lock:
            worker = threading.Thread(target=lambda: (c.flush(), done.set()))
            worker.start()
            time.sleep(0.2)
            assert not done.is_set()
        worker.join(5)
        assert done.is_set()
    finally:
        c.close()


def test_without_sync_the_change_ring_is_one_page_and_sync_gets_the_whole_ring(
    box: Sandbox,
) -> None:
    """lh_changes costs a page when nothing reads it; an agent started again with
    sync replaces the pin with the full ring (its content need not outlive an agent)."""
    ns = box.host()
    pin = ns.pins / "lh_changes"
    for size in (os.sysconf("SC_PAGE_SIZE"), abi.CHANGES_RING_SIZE):
        dp = Datapath(Pins(ns.pins), table_size=1024, changes_size=size)
        try:
            m = libbpf.Map.pinned(pin)
            assert m.info.max_entries == size
            m.close()
        finally:
            dp.close()


def test_release_2_pins_are_moved_into_the_per_family_tables(box: Sandbox) -> None:
    """Pins of the previous layout -- lh_conns and lh_pending keyed by the
    40-byte conn_key for both families, no lh_conns4 -- are read and unpinned
    at load, and every entry goes into its family's map of the same kind."""
    ns = box.host()
    ns.pins.mkdir(parents=True, exist_ok=True)
    keys = {
        (abi.ChangeTable.CONFIRMED, abi.FAMILY_V4): conn_key("192.0.2.1", "192.0.2.2", 1, 2),
        (abi.ChangeTable.CONFIRMED, abi.FAMILY_V6): conn_key("2001:db8::1", "2001:db8::2", 1, 2),
        (abi.ChangeTable.PENDING, abi.FAMILY_V4): conn_key("192.0.2.3", "192.0.2.2", 3, 2),
        (abi.ChangeTable.PENDING, abi.FAMILY_V6): conn_key("2001:db8::3", "2001:db8::2", 3, 2),
    }
    size = ctypes.sizeof(abi.ConnKey)
    for which, name, map_type in (
        (abi.ChangeTable.CONFIRMED, "lh_conns", 1),  # BPF_MAP_TYPE_HASH
        (abi.ChangeTable.PENDING, "lh_pending", 9),  # BPF_MAP_TYPE_LRU_HASH
    ):
        m = libbpf.Map(libbpf.map_create(map_type, name, size, size, 1024), owned=True)
        try:
            for (w, fam), key in keys.items():
                if w == which:
                    m.update(bytes(key), bytes(abi.ConnEntry(ifindex=fam, state=4)))
            libbpf.obj_pin(m.fd, ns.pins / name)
        finally:
            m.close()
    dp = Datapath(Pins(ns.pins), table_size=1024)
    try:
        found = {
            (t.which, t.family): [(k.family, e.ifindex) for k, e in t.items()]
            for t in dp.maps.tables()
        }
        assert found == {where: [(where[1], where[1])] for where in keys}
        assert (ns.pins / "lh_conns4").exists()
    finally:
        dp.close()


def test_a_48_slot_lh_counters_is_carried_into_64_slots(box: Sandbox) -> None:
    """lh_counters pinned by a release with CNT_MAX 48 (key = slot * 48 +
    reason): at load every per-CPU count moves to slot * CNT_MAX + reason,
    and `stats` reads the same totals per interface and reason as before."""
    ns = box.host()
    ns.pins.mkdir(parents=True, exist_ok=True)
    old_max, cpus = 48, libbpf.num_possible_cpus()
    counts = {  # (slot, reason) -> count on each CPU
        (1, abi.Counter.REDIRECTED): [7] + [1] * (cpus - 1),
        (3, abi.Counter.HOP_UNTRUSTED): [0] * (cpus - 1) + [5],
        (255, 47): [2] * cpus,  # the last key of the old map: another branch's reason
    }
    m = libbpf.Map(
        libbpf.map_create(6, "lh_counters", 4, 8, abi.MAX_IFACES * old_max),  # PERCPU_ARRAY
        owned=True,
    )
    try:
        for (slot, reason), per_cpu in counts.items():
            value = b"".join(n.to_bytes(8, "little") for n in per_cpu)
            m.update((slot * old_max + reason).to_bytes(4, "little"), value)
        libbpf.obj_pin(m.fd, ns.pins / "lh_counters")
    finally:
        m.close()
    dp = Datapath(Pins(ns.pins), table_size=1024)
    try:
        assert dp.maps.counters.info.max_entries == abi.MAX_IFACES * abi.CNT_MAX
        totals = dp.maps.counter_totals()
        assert {
            (slot, reason): n for slot, row in totals.items() for reason, n in enumerate(row) if n
        } == {key: sum(per_cpu) for key, per_cpu in counts.items()}
    finally:
        dp.close()


def test_a_hashed_lh_hop_descs_is_carried_into_slots_keeping_ids(box: Sandbox) -> None:
    """lh_hop_descs pinned by release 4 (a hash: id -> 76-byte hop_desc): at
    load each descriptor goes into the slot its id names with the generation
    that keeps the id, so entries naming it keep their hop; of two ids of one
    slot the higher is stored under a new id (its entries: hop_desc_gone until
    their next request), and the old id names nothing."""
    ns = box.host()
    ns.pins.mkdir(parents=True, exist_ok=True)

    def tunnel(endpoint: int) -> abi.HopDesc:
        d = abi.HopDesc(kind=int(abi.HopKind.TUNNEL4), vni=100, mark=9)
        d.remote[0] = endpoint
        return d

    content = abi.HopDesc.mark.offset
    first, clash, other = 0x12340123, 0x9ABC0123, 0x00051234  # slot 0x123 twice: the lower keeps it
    hops = {first: tunnel(0xC0000201), clash: tunnel(0xC0000202), other: tunnel(0xC0000203)}
    m = libbpf.Map(libbpf.map_create(1, "lh_hop_descs", 4, 76, abi.MAX_HOP_DESCS), owned=True)
    try:
        for hop_id, desc in hops.items():
            m.update(hop_id.to_bytes(4, "little"), bytes(desc)[:76])
        libbpf.obj_pin(m.fd, ns.pins / "lh_hop_descs")
    finally:
        m.close()
    dp = Datapath(Pins(ns.pins), table_size=1024)
    try:
        assert dp.maps.hop_descs.info.type == 2  # BPF_MAP_TYPE_ARRAY
        for hop_id in (first, other):
            got = dp.maps.hop_desc(hop_id)
            assert got is not None and bytes(got)[:content] == bytes(hops[hop_id])[:content]
        assert dp.maps.hop_desc(clash) is None
        stored = {
            bytes(d)[:content]: abi.hop_id_of(int.from_bytes(k, "little"), d.gen)
            for k, raw in dp.maps.hop_descs.items()
            if (d := abi.HopDesc.from_buffer_copy(raw)).kind
        }
        new_id = stored[bytes(hops[clash])[:content]]
        assert len(stored) == 3 and new_id != clash and dp.maps.hop_desc(new_id) is not None
    finally:
        dp.close()


def test_tunnel_endpoints_reads_only_settled_slots(box: Sandbox) -> None:
    """tunnel_endpoints names the endpoint of a settled tunnel slot (kind set,
    generation even), never one of a slot being written (generation odd: its
    endpoint may be half written) nor of a free or an MPLS one."""
    ns = box.host(uplinks=1)
    c = _started(ns, _config(["up0"]))
    try:

        def slot(n: int, kind: abi.HopKind | int, endpoint: int, gen: int) -> None:
            d = abi.HopDesc(kind=int(kind), vni=100, gen=gen)
            d.remote[0] = endpoint
            assert c.datapath is not None
            c.datapath.maps.hop_descs.update(n.to_bytes(4, "little"), bytes(d))

        slot(1, abi.HopKind.TUNNEL4, 0xC0000201, 2)  # settled: 192.0.2.1
        slot(2, abi.HopKind.TUNNEL4, 0xC0000202, 3)  # being written
        slot(3, 0, 0xC0000203, 4)  # free (a swept slot keeps no content; here: kind 0)
        slot(4, abi.HopKind.MPLS, 0xC0000204, 2)  # not a tunnel
        assert c.tunnel_endpoints() == {ipaddress.ip_address("192.0.2.1")}
    finally:
        c.close()


def _prog_maps(prog_id: int) -> set[int]:
    """The ids of the maps a loaded program uses (bpftool)."""
    import json
    import subprocess

    out = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out).get("map_ids", []))


def test_lh_uplink_l3_is_loaded_only_when_an_l3_uplink_is_attached(box: Sandbox) -> None:
    """An agent whose uplinks are Ethernet does not load lh_uplink_l3 (~2 s of verification);
    a reload adding an L3 uplink (a tun device) loads it, attaches it there, and it works on
    the agent's own maps (lh_frags and lh_hop_scratch too: shared, not copies)."""
    ns = box.host()
    ns.ip("tuntap", "add", "dev", "tun0", "mode", "tun")
    ns.ip("link", "set", "tun0", "up")
    c = _started(ns, _config(["up0"], ["vm0"], routed=True))
    try:
        dp = c.datapath
        assert dp is not None and not dp.loaded_later("lh_uplink_l3")
        with pytest.raises(libbpf.BpfError, match=r"program lh_uplink_l3 \(not loaded"):
            dp._obj.program("lh_uplink_l3")
        c.reload(_config(["up0", "tun0"], ["vm0"], routed=True))
        assert dp.loaded_later("lh_uplink_l3")
        ids = {n: filter_prog_id(ns.ifindex(n)) for n in ("up0", "vm0", "tun0")}
        assert ids["tun0"] is not None and ids["tun0"] not in (ids["up0"], ids["vm0"])
        assert [i.link_kind for i in c.interfaces() if i.name == "tun0"] == ["l3"]
        l3_maps = _prog_maps(ids["tun0"])
        uplink_maps = _prog_maps(ids["up0"])  # type: ignore[arg-type]
        assert dp.maps.conns4.info.id in l3_maps
        assert l3_maps <= uplink_maps | _prog_maps(ids["vm0"])  # type: ignore[arg-type]
        loaded = dp._later["lh_uplink_l3"]
        dp.attach(ns.ifindex("tun0"), abi.Role.UPLINK, kind=abi.LinkKind.L3)
        assert dp._later["lh_uplink_l3"] is loaded  # loaded once, not again per attach
        assert filter_prog_id(ns.ifindex("tun0")) == ids["tun0"]
    finally:
        c.close()
    assert not dp.loaded_later("lh_uplink_l3")  # closed with the first object


def test_a_program_not_loaded_is_a_clear_error(box: Sandbox) -> None:
    """BpfObject(programs=...) loads only those; program() of another names it, and an
    unknown name is refused before anything is loaded."""
    from lasthop.datapath import _object

    with libbpf.BpfObject(_object(), programs=["lh_clock"]) as obj:
        assert obj.loaded == {"lh_clock"}
        assert obj.program("lh_clock").fd >= 0
        loaded_only = r"program lh_vmport \(not loaded; this object loaded lh_clock\)"
        with pytest.raises(libbpf.BpfError, match=loaded_only):
            obj.program("lh_vmport")
    with pytest.raises(libbpf.BpfError, match="no program lh_nope in it"):
        libbpf.BpfObject(_object(), skip=["lh_nope"])

"""`lasthop run` as operators start it, in private network namespaces on the
real kernel: attaching, stopping and restarting without losing the table,
following a bridge, aging, and replies of real traffic sent to their last hop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from agentlib import (
    PIN_ROOT,
    ROOT_MARKS,
    BridgedSite,
    Netns,
    PinnedTable,
    Sandbox,
    conn_key,
    lasthop,
    wait_for,
)

pytestmark = ROOT_MARKS

UDP, TCP = 17, 6


def _json(*args: str) -> object:
    result = lasthop(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_run_attaches_uplinks_and_vm_ports_and_says_so(box: Sandbox) -> None:
    """run attaches lh_uplink to uplinks and lh_vmport to VM ports, then prints its ready line."""
    ns = box.host(uplinks=2, vm_ports=2)
    agent = box.agent(
        "--uplink",
        "up0",
        "--uplink",
        "up1",
        "--vm-port",
        "vm0",
        "--vm-port",
        "vm1",
        "--api-socket",
        "",
        netns=ns,
    )
    assert agent.ready_line == (
        f"lasthop: attached in netns {ns.name}: uplinks ['up0', 'up1'], VM ports ['vm0', 'vm1']"
    )
    assert [ns.tc_program(d) for d in ("up0", "up1", "vm0", "vm1")] == [
        "lh_uplink",
        "lh_uplink",
        "lh_vmport",
        "lh_vmport",
    ]
    assert ns.tc_program("up0p") is None  # the peers are not ours


def test_sigterm_leaves_filters_and_pins(box: Sandbox) -> None:
    """SIGTERM stops the agent with exit 0; the programs stay attached and the maps pinned."""
    ns = box.host()
    agent = box.agent("--uplink", "up0", "--vm-port", "vm0", netns=ns)
    assert agent.stop() == 0
    assert ns.tc_program("up0") == "lh_uplink" and ns.tc_program("vm0") == "lh_vmport"
    assert {"lh_conns", "lh_ifaces", "lh_counters", "lh_settings"} <= {
        p.name for p in ns.pins.iterdir()
    }
    assert not ns.socket.exists(), "the API socket is removed on exit"


def test_sigint_stops_like_sigterm(box: Sandbox) -> None:
    """SIGINT (Ctrl-C) stops the agent the same way: exit 0, filters stay."""
    ns = box.host()
    agent = box.agent("--uplink", "up0", "--vm-port", "vm0", netns=ns)
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(10) == 0
    assert ns.tc_program("up0") == "lh_uplink"


def test_restart_adopts_the_pinned_table(box: Sandbox) -> None:
    """A second run reuses the pinned table: same map id, every entry still there."""
    ns = box.host()
    args = ("--uplink", "up0", "--vm-port", "vm0")
    box.agent(*args, netns=ns).stop()
    table = PinnedTable(ns.pins)
    try:
        map_id = table.map_id
        table.add(conn_key("192.0.2.1", "198.51.100.7", 40000, 53), uplink=ns.ifindex("up0"))
        box.agent(*args, netns=ns).stop()
        assert PinnedTable(ns.pins).map_id == map_id
        conns = _json("show", "--netns", ns.name, "--json")
        assert [(c["src"], c["dst"], c["dport"], c["uplink"]) for c in conns] == [
            ("192.0.2.1", "198.51.100.7", 53, "up0")
        ]
    finally:
        table.close()


def test_detach_removes_filters_and_pins(box: Sandbox) -> None:
    """detach takes our filters off every interface and removes the pinned maps."""
    ns = box.host()
    box.agent("--uplink", "up0", "--vm-port", "vm0", netns=ns).stop()
    result = lasthop("detach", "--netns", ns.name)
    assert result.returncode == 0, result.stderr
    assert "up0" in result.stdout and "vm0" in result.stdout
    assert ns.tc_program("up0") is None and ns.tc_program("vm0") is None
    assert not ns.pins.exists()


def test_table_size_change_with_pinned_maps_is_a_clear_error(box: Sandbox) -> None:
    """A table_size other than the pinned table's stops run with exit 2 and says what to do."""
    ns = box.host()
    box.agent("--uplink", "up0", "--table-size", "4096", netns=ns).stop()
    agent = box.agent("--uplink", "up0", "--table-size", "8192", netns=ns, wait=False)
    assert agent.proc.wait(20) == 2
    err = " ".join(agent.stderr.split())
    # each lh_conns4 with its default in-place room: a quarter of the pending table
    assert "holds 4352 entries, the config asks for 8704" in err
    assert "keep table_size + pending_in_place = 4352, or `lasthop detach` first" in err


def test_bridge_ports_are_followed(box: Sandbox) -> None:
    """--bridge attaches to the bridge's existing ports but the uplink, then follows ports added
    and removed while it runs."""
    ns = box.host(uplinks=1, vm_ports=1)
    ns.bridge("br0", "up0", "vm0")
    box.agent("--uplink", "up0", "--bridge", "br0", netns=ns)
    assert ns.tc_program("up0") == "lh_uplink" and ns.tc_program("vm0") == "lh_vmport"

    ns.veth("vm1", "vm1p")
    ns.ip("link", "set", "vm1", "master", "br0")
    wait_for(lambda: ns.tc_program("vm1") == "lh_vmport")

    ns.ip("link", "set", "vm0", "nomaster")
    wait_for(lambda: ns.tc_program("vm0") is None)
    names = {i["name"]: i["role"] for i in _api_interfaces(ns.socket)}
    assert names == {"up0": "uplink", "vm1": "vm_port"}

    ns.ip("link", "del", "vm1")
    wait_for(lambda: "vm1" not in {i["name"] for i in _api_interfaces(ns.socket)})


def _api_interfaces(sock: Path) -> list[dict[str, object]]:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://lasthop") as c:
        result: list[dict[str, object]] = c.get("/v1/interfaces").raise_for_status().json()
        return result


def test_run_under_ip_netns_exec_pins_on_the_host_bpffs(box: Sandbox) -> None:
    """Started with `ip netns exec NS lasthop run` (no --netns) it finds its namespace's name and
    pins where the root mount namespace sees them, though its /sys has no bpffs."""
    ns = box.host()
    agent = box.agent("--uplink", "up0", "--vm-port", "vm0", netns=ns, via_exec=True)
    assert f"in netns {ns.name}:" in agent.ready_line
    assert (PIN_ROOT / ns.name / "lh_conns").exists()
    assert ns.socket.exists()
    agent.stop()
    assert lasthop("stats", "--netns", ns.name).returncode == 0


CONNECTION_FIELDS = {
    "proto": str,
    "family": int,
    "src": str,
    "dst": str,
    "sport": int,
    "dport": int,
    "zone": int,
    "mac": str,
    "uplink": str,
    "uplink_ifindex": int,
    "vlan": list,
    "age_s": float,
    "packets": int,
    "replies": int,
    "vm_port": str,
    "state": str,
    "flags": list,
    "endpoint": str,
    "vni": type(None),  # an int for a tunnel hop
    "geneve_options": str,
    "mpls": list,  # an MPLS hop's labels, outer first
}


@pytest.fixture(scope="module")
def attached(module_box: Sandbox) -> Netns:
    """A host with `lasthop run --uplink up0 --vm-port vm0` for the module's tests
    that add entries of their own, read them and take them away again (show,
    flush): each finds the table empty, whichever ran before."""
    ns = module_box.host()
    module_box.agent("--uplink", "up0", "--vm-port", "vm0", netns=ns)
    return ns


def test_show_json_shape(attached: Netns) -> None:
    """show --json is a list of objects with exactly the fields (and types) docs/cli.md lists."""
    ns = attached
    table = PinnedTable(ns.pins)
    keys = [
        conn_key("2001:db8::1", "2001:db8::2", 1234, 443, proto=TCP, zone=0),
        conn_key("192.0.2.1", "192.0.2.2", 5000, 53),
    ]
    try:
        table.add(keys[0], mac="02:aa:bb:cc:dd:ee", uplink=ns.ifindex("up0"), idle_s=3)
        table.add(keys[1], uplink=ns.ifindex("up0"))
        conns = _json("show", "--netns", ns.name, "--json")
        [limited] = _json("show", "--netns", ns.name, "--json", "--limit", "1")
    finally:
        for key in keys:  # the agent is the module's
            table.remove(key)
        table.close()
    assert isinstance(conns, list) and len(conns) == 2
    for c in conns:
        assert {k: type(v) for k, v in c.items()} == CONNECTION_FIELDS
    newest, oldest = sorted(conns, key=lambda c: c["age_s"])  # without --limit: table order
    assert (newest["src"], newest["proto"], newest["family"]) == ("192.0.2.1", "udp", 4)
    assert oldest == oldest | {
        "proto": "tcp",
        "family": 6,
        "src": "2001:db8::1",
        "dst": "2001:db8::2",
        "sport": 1234,
        "dport": 443,
        "mac": "02:aa:bb:cc:dd:ee",
        "uplink": "up0",
        "vlan": [],
        "state": "tcp_established",
        "flags": ["hop_known"],
    }
    assert 2.5 < oldest["age_s"] < 60  # seconds, however long the CLI took to start
    assert limited["src"] == "192.0.2.1"


def test_stats_json_shape(box: Sandbox) -> None:
    """stats --json has totals (every counter), interfaces (name -> non-zero counters), table,
    untrusted_hops (uplink -> MAC -> frames refused; none here) and untrusted_endpoints
    (uplink -> tunnel endpoint -> requests refused; none here)."""
    ns = box.host()
    box.agent("--uplink", "up0", "--vm-port", "vm0", "--table-size", "1024", netns=ns)
    st = _json("stats", "--netns", ns.name, "--json")
    assert isinstance(st, dict) and set(st) == {
        "totals",
        "interfaces",
        "table",
        "untrusted_hops",
        "untrusted_endpoints",
    }
    assert st["untrusted_hops"] == {} and st["untrusted_endpoints"] == {}
    assert set(st["totals"]) >= {
        "learned",
        "relearned",
        "refreshed",
        "redirected",
        "miss",
        "not_ip",
        "malformed",
        "no_iface",
        "agent_removed",
    }
    assert all(isinstance(v, int) for v in st["totals"].values())
    assert isinstance(st["interfaces"], dict)
    table = st["table"]
    # table_size 1024: each table, IPv4 and IPv6 (a quarter, at least 1024), 1024;
    # and lh_conns4's room for connections waiting in place, a quarter of lh_pending4
    assert (table["entries"], table["capacity"], table["evicted"]) == (0, 4 * 1024 + 256, 0)
    for name, capacity in (("confirmed", 2048), ("pending", 2048 + 256)):
        assert table[name] == {
            "entries": 0,
            "capacity": capacity,
            "inserted": 0,
            "expired": 0,
            "removed": 0,
            "evicted": 0,
            "states": {},
        }
    assert (table["promoted"], table["confirm_refused"]) == (0, 0)


def test_the_kernel_expires_idle_entries_and_counts_them(box: Sandbox) -> None:
    """With tcp_established 2 s (set through the old --idle-timeout) the kernel's
    pass removes an entry idle for longer, keeps one that sees traffic, and
    stats counts the expiry; the agent itself removes nothing."""
    ns = box.host()
    box.agent("--uplink", "up0", "--vm-port", "vm0", "--idle-timeout", "2", netns=ns)
    table = PinnedTable(ns.pins)
    try:
        up0 = ns.ifindex("up0")
        live = conn_key("192.0.2.2", "192.0.2.9", 1000, 80)
        # the live entry is refreshed throughout, so no pass finds it idle however slow
        # the machine (or the CLI's first start) is; the idle one is far past the timeout
        with table.kept_fresh(live, uplink=up0):
            table.add(conn_key("192.0.2.1", "192.0.2.9", 1000, 80), uplink=up0, idle_s=60)
            wait_for(lambda: len(table.keys()) == 1)
            [remaining] = _json("show", "--netns", ns.name, "--json")
            assert remaining["src"] == "192.0.2.2"
            st = _json("stats", "--netns", ns.name, "--json")
    finally:
        table.close()
    assert st["table"]["confirmed"]["expired"] == 1
    assert st["totals"]["agent_removed"] == 0
    assert st["table"]["entries"] == 1 and st["table"]["expiry_passes"] >= 1


def test_flush_empties_the_table(attached: Netns) -> None:
    """flush removes every entry, says how many, and counts them as agent_removed."""
    ns = attached
    table = PinnedTable(ns.pins)
    try:
        for port in range(3):
            table.add(conn_key("192.0.2.1", "192.0.2.9", 1000 + port, 80), uplink=ns.ifindex("up0"))
    finally:
        table.close()
    result = lasthop("flush", "--netns", ns.name)
    assert result.returncode == 0 and "flushed 3 entries" in result.stdout
    assert _json("show", "--netns", ns.name, "--json") == []
    assert _json("stats", "--netns", ns.name, "--json")["totals"]["agent_removed"] == 3


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_real_traffic_learns_the_firewall_and_redirects_replies(
    served_site: BridgedSite, proto: str
) -> None:
    """Firewall -> host bridge -> VM: the exchange creates an entry holding the firewall's MAC and
    uplink, and the VM's replies are redirected to it (counter redirected rises)."""
    site = served_site
    before = _counts(site.host.name)  # the site is shared: what this exchange adds
    port = site.exchange(proto, n=3)
    conns = [
        c
        for c in _json("show", "--netns", site.host.name, "--json")
        if c["proto"] == proto and c["sport"] == port
    ]
    assert len(conns) == 1, conns
    [c] = conns
    assert (c["src"], c["dst"], c["dport"]) == (site.FW_IP, site.VM_IP, site.PORT)
    assert (c["mac"], c["uplink"]) == (site.fw_mac, "fw0")
    assert c["packets"] >= 3 and c["replies"] >= 3
    after = _counts(site.host.name)
    assert after["learned"] - before["learned"] >= 1
    assert after["vm0.redirected"] - before["vm0.redirected"] >= 3
    assert after["fw0.learned"] - before["fw0.learned"] >= 1


def _counts(netns: str) -> dict[str, int]:
    """stats --json's learned total and the counters of vm0 and fw0 (0 when not yet counted)."""
    st = _json("stats", "--netns", netns, "--json")
    assert isinstance(st, dict)
    return {
        "learned": st["totals"]["learned"],
        "vm0.redirected": st["interfaces"].get("vm0", {}).get("redirected", 0),
        "fw0.learned": st["interfaces"].get("fw0", {}).get("learned", 0),
    }


def test_a_vm_opened_connection_is_not_counted_as_evicted(box: Sandbox) -> None:
    """A connection the VM opens, answered through the uplink, leaves evicted at 0."""
    site = BridgedSite(box)
    config = box.logs / "vm-address.toml"
    config.write_text(f'[[vm_port]]\nname = "vm0"\naddresses = ["{site.VM_IP}"]\n')
    try:
        site.serve_on_firewall()
        box.agent("--config", str(config), "--uplink", "fw0", "--bridge", "br0", netns=site.host)
        site.exchange_from_vm("udp", n=2)
        st = _json("stats", "--netns", site.host.name, "--json")
        assert st["totals"]["vm_origin_learned"] == 1 and st["table"]["entries"] == 1
        assert st["table"]["evicted"] == 0
    finally:
        site.close()

"""Services in the lab (routed host, stateful firewalls), end to end:

1. A virtual address served by three VMs: the clients behind fw1..fw3 reach
   it only with lasthop; every connection lands on the VM the data path's
   Maglev table names (predicted here with lasthop.services.maglev) and all three VMs
   serve; a drained VM keeps its established connection and takes no new
   ones, across an agent restart; a VM whose checks fail takes no new ones.
2. Full-proxy VMs: the three VMs open their own connections, all from the
   one virtual address, to a server behind another firewall (fw9); each gets
   its server's replies, and only with lasthop.

The VMs hold the virtual address on their loopback (arp_ignore/arp_announce
as docs/services.md says); the firewalls route it to the host's uplink.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lasthop.lab import Lab, firewall, runner
from lasthop.lab import plan as P
from lasthop.lab.namespaces import eventually, ip_batch, ns_exec, stop_pids
from lasthop.lab.services import (
    TIMEOUT,
    VIP,
    Prediction,
    http_get,
    serve_vip,
    vm_states,
    write_config,
)
from lasthop.lab.traffic import EchoSession

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

SERVER_SITE = 9  # cl9 plays the server network, fw9 its firewall

# fw9 guards a server network: new connections come from the transit side only
# (this replaces the lab's client-side table).
SERVER_FIREWALL = f"""\
delete table inet {firewall.TABLE}
table inet svc_fw
delete table inet svc_fw
table inet svc_fw {{
\tcounter drop_invalid {{ }}
\tcounter drop_from_servers {{ }}
\tcounter accepted_new {{ }}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tct state invalid counter name "drop_invalid" drop
\t\tiifname "{P.FW_LAN}" counter name "drop_from_servers" drop
\t\tmeta l4proto tcp tcp flags & (fin|syn|rst|ack) != syn drop
\t\tcounter name "accepted_new" accept
\t}}
}}
"""


def _drops(lab: Lab) -> dict[str, int]:
    return {
        fw: c.get("drop_invalid", 0) + c.get("drop_outside", 0) for fw, c in lab.counters().items()
    }


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LASTHOP_STATE_DIR", str(tmp_path / "run"))  # the agent inherits it
    return tmp_path / "run"


@pytest.fixture
def vip_lab(routed_lab: Lab) -> Lab:
    serve_vip(routed_lab)
    return routed_lab


@pytest.fixture
def running(vip_lab: Lab, state_dir: Path, tmp_path: Path) -> Iterator[runner.AgentRunner]:
    cfg = write_config(tmp_path / "lasthop.toml", vip_lab.plan)
    with runner.AgentRunner(vip_lab.plan, extra=("--config", str(cfg))) as a:
        assert eventually(lambda: all(s for _, s in vm_states(vip_lab.plan).values())), vm_states(
            vip_lab.plan
        )
        yield a


# ---------------------------------------------------------------- the virtual address


def test_no_service_without_lasthop(vip_lab: Lab) -> None:
    """Without lasthop the address is served by no one: the request dies at the host."""
    assert http_get(vip_lab.plan.client(2).ns, 4, VIP.v4, timeout=1.0)[0] is None


def test_a_bridged_host_serves_the_address_too(
    bridged_lab: Lab, state_dir: Path, tmp_path: Path
) -> None:
    """Bridged host, the address routed to vm1's own address: the frame reaches
    the uplink, and every connection still lands where the table says."""
    lab, plan = bridged_lab, bridged_lab.plan
    serve_vip(lab)
    cfg = write_config(tmp_path / "lasthop.toml", plan)
    with runner.AgentRunner(plan, extra=("--config", str(cfg))):
        for n in plan.vms:  # the guests' MACs: learned from their first packet
            ns_exec(plan.vm(n).ns, ["ping", "-c1", "-W1", plan.firewall(1).transit.v4], check=False)
        predict = Prediction(lab)
        served = set()
        for i in range(18):
            client, family = plan.client(1 + i % 3), 4 if i % 2 else 6
            body, sport = http_get(client.ns, family, VIP.of(family))
            assert body == predict.vm(family, client.addr.of(family), sport), (client.name, i)
            served.add(body)
        assert served == {plan.vm(n).name for n in plan.vms}
    assert _drops(lab) == {plan.firewall(n).name: 0 for n in plan.sites}


def test_three_vms_serve_the_address_each_connection_where_maglev_says(
    vip_lab: Lab, running: runner.AgentRunner, state_dir: Path
) -> None:
    """60 connections from the three sites, IPv4 and IPv6: all answered, each by
    the VM the table names, every VM used, no firewall drops a reply; then a
    drained VM keeps its established connection (also across an agent
    restart) and gets no new one."""
    plan = vip_lab.plan
    predict = Prediction(vip_lab)
    served: dict[str, int] = {}
    for site in plan.sites:
        client = plan.client(site)
        for i in range(10):
            family = 4 if i % 2 else 6
            body, sport = http_get(client.ns, family, VIP.of(family))
            assert body is not None, f"{client.name} -> {VIP.of(family)} (#{i}) failed"
            assert body == predict.vm(family, client.addr.of(family), sport)
            served[body] = served.get(body, 0) + 1
    assert set(served) == {plan.vm(n).name for n in plan.vms}, served
    assert _drops(vip_lab) == {plan.firewall(n).name: 0 for n in plan.sites}

    # a long-lived echo connection from cl2, then its VM is drained
    with EchoSession(plan, 2, address=VIP, timeout=TIMEOUT) as session:
        rows = [r for r in runner.show(plan) if r["sport"] == session.local_port]
        assert len(rows) == 1 and rows[0]["vm_port"], rows
        busy = rows[0]["vm_port"]
        runner.command(plan, "service", "drain", "web", busy)  # a LabError if it fails
        assert session.exchange(TIMEOUT)
        running.stop()
        running.start()  # the drain and the service outlive the agent
        assert json.loads((state_dir / plan.host.ns / "services.json").read_text())["services"]
        assert vm_states(plan)[busy] == ("up", False)
        assert session.exchange(TIMEOUT)
        for i in range(20):
            body, _ = http_get(plan.client(1 + i % 3).ns, 4, VIP.v4)
            assert body is not None and body != busy


def test_a_vm_failing_its_checks_gets_no_new_connections(
    vip_lab: Lab, running: runner.AgentRunner
) -> None:
    """vm3's servers stop: after two failed checks it is unhealthy and out of the table."""
    plan = vip_lab.plan
    vm3 = plan.vm(3)
    stop_pids([vip_lab.state.servers[vm3.name]])
    assert eventually(lambda: vm_states(plan)["vm3"] == ("unhealthy", False)), vm_states(plan)
    assert "vm3" in runner.command(plan, "service", "list").stdout
    for i in range(20):
        body, _ = http_get(plan.client(1 + i % 3).ns, 4, VIP.v4)
        assert body in ("vm1", "vm2"), body
    changes = {v["port"]: v["changes"] for v in runner.services(plan)["web"]["vms"]}
    assert changes["vm3"] >= 2  # unknown -> up -> unhealthy, each counted

    # `lasthop explain` of a connection not opened yet: the VM the table names, and why not vm3
    predict = Prediction(vip_lab)
    client = plan.client(1).addr.v4
    for sport in (40001, 40002, 40003):
        got = json.loads(
            runner.command(
                plan, "explain", "tcp", f"{client}:{sport}", f"{VIP.v4}:80", "--json"
            ).stdout
        )
        assert got["table"] == "" and got["service"]["name"] == "web", got
        assert got["service"]["vm"] == predict.vm(4, client, sport), got
        assert got["service"]["not_serving"] == {"vm3": "health unhealthy"}, got
        assert "gets no new connection: health unhealthy" in "\n".join(got["words"])


# ---------------------------------------------------------------- full-proxy VMs


@pytest.fixture
def proxy_lab(vip_lab: Lab) -> Iterator[Lab]:
    """Adds a server network (cl9 behind fw9, new connections allowed inbound
    only) and routes: the host reaches it via fw9, fw9 reaches the address via
    the host."""
    lab = vip_lab
    plan = lab.plan
    lab.add_site(SERVER_SITE)
    fw, srv = plan.firewall(SERVER_SITE), plan.client(SERVER_SITE)
    ns_exec(fw.ns, ["nft", "-f", "-"], input=SERVER_FIREWALL)
    serve_vip(lab, [SERVER_SITE], vms=False)
    net4, net6 = P.client_net(SERVER_SITE)
    ip_batch(
        plan.host.ns,
        [f"route replace {net4} via {fw.transit.v4}", f"route replace {net6} via {fw.transit.v6}"],
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", srv.ns, sys.executable, "-m", "lasthop.lab.servers", "srv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield lab
    finally:
        proc.terminate()
        proc.wait(5)


def _proxied(lab: Lab, n: int, family: int, sport: int, timeout: float = TIMEOUT) -> str | None:
    """VM n opens a connection from the shared address to the server."""
    srv = lab.plan.client(SERVER_SITE)
    return http_get(
        lab.plan.vm(n).ns,
        family,
        srv.addr.of(family),
        source=(VIP.of(family), sport),
        timeout=timeout,
    )[0]


def test_full_proxy_vms_sharing_one_address_get_their_servers_replies(
    proxy_lab: Lab, state_dir: Path, tmp_path: Path
) -> None:
    """Without lasthop the server's reply to the shared address never reaches
    the VM; with it, each of 3 VMs x 4 connections (IPv4 and IPv6, at once)
    gets its own replies, and the entries name fw9 as the last hop."""
    lab, plan = proxy_lab, proxy_lab.plan
    assert _proxied(lab, 1, 4, 41000, timeout=1.0) is None
    cfg = write_config(tmp_path / "lasthop.toml", plan)
    with runner.AgentRunner(plan, extra=("--config", str(cfg))):
        jobs = [(n, 4 if i % 2 else 6, 42000 + 10 * n + i) for n in plan.vms for i in range(4)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            bodies = list(pool.map(lambda j: _proxied(lab, *j), jobs))
        assert bodies == ["srv"] * len(jobs), list(zip(jobs, bodies, strict=True))
        rows = {(r["dst"], r["dport"]): r for r in runner.show(plan) if "vm_origin" in r["flags"]}
        fw9 = plan.firewall(SERVER_SITE)
        for n, family, sport in jobs:
            row = rows[(VIP.of(family), sport)]
            assert (row["vm_port"], row["mac"], row["uplink"]) == (
                plan.vm(n).port,
                fw9.transit_mac,
                plan.host.uplink,
            ), row
        stats = runner.stats(plan)["totals"]
        assert stats["vm_origin_learned"] >= len(jobs)
        assert stats["vm_origin_returned"] >= len(jobs)
    counters = json.loads(
        ns_exec(fw9.ns, ["nft", "-j", "list", "counters", "table", "inet", "svc_fw"]).stdout
    )["nftables"]
    drops = {c["counter"]["name"]: c["counter"]["packets"] for c in counters if "counter" in c}
    assert drops["drop_invalid"] == 0 and drops["accepted_new"] >= len(jobs)

"""Services in the lab (routed host, stateful firewalls), end to end:

1. A virtual address served by three VMs: the clients behind fw1..fw3 reach
   it only with lasthop; every connection lands on the VM the data path's
   Maglev table names (predicted here with lasthop.maglev) and all three VMs
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
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lasthop import abi, libbpf
from lasthop.lab import Lab, agent, firewall
from lasthop.lab import plan as P
from lasthop.lab.namespaces import ip_batch, ns_exec, open_socket, stop_pids, sysctl
from lasthop.maglev import slot_of
from lasthop.services import read_table

needs_agent = pytest.mark.skipif(not agent.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

VIP = P.Addr("10.3.0.1", "fd00:3::1", 32, 128)
SERVER_SITE = 9  # cl9 plays the server network, fw9 its firewall
TIMEOUT = 2.0

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


def _config(path: Path, plan: P.Plan, **health: object) -> Path:
    """The agent's config: one service per address family over vm1..vm3, HTTP-checked
    (a bridged host has no address to check from: no checks there)."""
    kind = "http" if plan.routed else "none"
    lines = ["[health]", f'type = "{kind}"', "interval = 0.3", "timeout = 0.5", "fall = 2",
             "rise = 1"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in health.items()]
    for family, name in ((4, "web"), (6, "web6")):
        vms = ", ".join(f'{{port = "{plan.vm(n).port}", address = "{plan.vm(n).addr.of(family)}"}}'
                        for n in plan.vms)
        lines += ["[[service]]", f'name = "{name}"', f'address = "{VIP.of(family)}"',
                  f"ports = [{P.HTTP_PORT}, {P.ECHO_PORT}]", f"vms = [{vms}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _serve_vip(lab: Lab, firewalls: list[int], *, vms: bool = True) -> None:
    """Every VM holds the address on lo (and does not answer ARP/ND for it);
    the firewalls route it to the host's uplink (routed host) or, on a
    bridged host, to vm1's own address: either way it reaches the uplink."""
    plan = lab.plan
    for n in plan.vms if vms else []:
        vm = plan.vm(n)
        sysctl(vm.ns, {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
        ip_batch(vm.ns, [f"addr add {VIP.cidr4} dev lo", f"addr add {VIP.cidr6} dev lo nodad"])
    uplink = plan.host.uplink_addr or plan.vm(plan.vms[0]).addr
    for n in firewalls:
        ip_batch(plan.firewall(n).ns, [f"route replace {VIP.cidr4} via {uplink.v4}",
                                       f"route replace {VIP.cidr6} via {uplink.v6}"])


def _lasthop(plan: P.Plan, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lasthop", *args, "--netns", plan.host.ns],
                          capture_output=True, text=True, timeout=30, check=False)


def _services(plan: P.Plan) -> dict[str, dict[str, object]]:
    r = _lasthop(plan, "service", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {s["name"]: s for s in json.loads(r.stdout)}


def _vm_states(plan: P.Plan, service: str = "web") -> dict[str, tuple[str, bool]]:
    vms = _services(plan)[service]["vms"]
    return {v["port"]: (v["health"], v["serving"]) for v in vms}  # type: ignore[attr-defined]


def _eventually(check: Callable[[], bool], timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def _get(ns: str, family: int, dst: str, *, source: tuple[str, int] | None = None,
         timeout: float = TIMEOUT) -> tuple[str | None, int]:
    """HTTP GET / from namespace ns: (body or None on failure, local port)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s = open_socket(ns, af, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source:
            s.bind(source)
        s.connect((dst, P.HTTP_PORT))
        port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return (body.decode() if head.startswith(b"HTTP/1.0 200") else None), port
    except OSError:
        return None, 0
    finally:
        s.close()


class Prediction:
    """The VM the data path's table gives a new connection (with lasthop.maglev),
    read once from the pinned lh_maglev."""

    def __init__(self, lab: Lab) -> None:
        services = _services(lab.plan)
        pins = lab.lasthop_pins
        assert pins is not None
        maglev = libbpf.Map.pinned(pins / "lh_maglev")
        self.tables: dict[int, tuple[list[int], dict[int, str]]] = {}
        try:
            for family, name in ((4, "web"), (6, "web6")):
                svc = services[name]
                table = read_table(maglev, int(svc["id"]))  # type: ignore[call-overload]
                assert table is not None
                by_ifindex = {v["ifindex"]: v["port"] for v in svc["vms"]}  # type: ignore[attr-defined]
                self.tables[family] = table, by_ifindex
        finally:
            maglev.close()

    def vm(self, family: int, client: str, sport: int) -> str:
        table, by_ifindex = self.tables[family]
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        key = abi.ConnKey(sport=socket.htons(sport), dport=socket.htons(P.HTTP_PORT), proto=6,
                          family=family)
        key.saddr[:] = list(_words(socket.inet_pton(af, client)))
        key.daddr[:] = list(_words(socket.inet_pton(af, VIP.of(family))))
        return by_ifindex.get(table[slot_of(key)], "?")


def _words(raw: bytes) -> tuple[int, ...]:
    return struct.unpack("=4I", raw.ljust(16, b"\0"))


def _drops(lab: Lab) -> dict[str, int]:
    return {fw: c.get("drop_invalid", 0) + c.get("drop_outside", 0)
            for fw, c in lab.counters().items()}


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LASTHOP_STATE_DIR", str(tmp_path / "run"))  # the agent inherits it
    return tmp_path / "run"


@pytest.fixture
def vip_lab(routed_lab: Lab) -> Lab:
    _serve_vip(routed_lab, routed_lab.plan.sites)
    return routed_lab


@pytest.fixture
def running(vip_lab: Lab, state_dir: Path, tmp_path: Path) -> Iterator[agent.LasthopAgent]:
    cfg = _config(tmp_path / "lasthop.toml", vip_lab.plan)
    with agent.LasthopAgent(vip_lab.plan, extra=("--config", str(cfg))) as a:
        assert _eventually(lambda: all(s for _, s in _vm_states(vip_lab.plan).values())), \
            _vm_states(vip_lab.plan)
        yield a


# ---------------------------------------------------------------- the virtual address


def test_no_service_without_lasthop(vip_lab: Lab) -> None:
    """Without lasthop the address is served by no one: the request dies at the host."""
    assert _get(vip_lab.plan.client(2).ns, 4, VIP.v4, timeout=1.0)[0] is None


def test_a_bridged_host_serves_the_address_too(bridged_lab: Lab, state_dir: Path,
                                               tmp_path: Path) -> None:
    """Bridged host, the address routed to vm1's own address: the frame reaches
    the uplink, and every connection still lands where the table says."""
    lab, plan = bridged_lab, bridged_lab.plan
    _serve_vip(lab, plan.sites)
    cfg = _config(tmp_path / "lasthop.toml", plan)
    with agent.LasthopAgent(plan, extra=("--config", str(cfg))):
        for n in plan.vms:  # the guests' MACs: learned from their first packet
            ns_exec(plan.vm(n).ns, ["ping", "-c1", "-W1", plan.firewall(1).transit.v4],
                    check=False)
        predict = Prediction(lab)
        served = set()
        for i in range(18):
            client, family = plan.client(1 + i % 3), 4 if i % 2 else 6
            body, sport = _get(client.ns, family, VIP.of(family))
            assert body == predict.vm(family, client.addr.of(family), sport), (client.name, i)
            served.add(body)
        assert served == {plan.vm(n).name for n in plan.vms}
    assert _drops(lab) == {plan.firewall(n).name: 0 for n in plan.sites}


def test_three_vms_serve_the_address_each_connection_where_maglev_says(
    vip_lab: Lab, running: agent.LasthopAgent, state_dir: Path
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
            body, sport = _get(client.ns, family, VIP.of(family))
            assert body is not None, f"{client.name} -> {VIP.of(family)} (#{i}) failed"
            assert body == predict.vm(family, client.addr.of(family), sport)
            served[body] = served.get(body, 0) + 1
    assert set(served) == {plan.vm(n).name for n in plan.vms}, served
    assert _drops(vip_lab) == {plan.firewall(n).name: 0 for n in plan.sites}

    # a long-lived echo connection from cl2, then its VM is drained
    s = open_socket(plan.client(2).ns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect((VIP.v4, P.ECHO_PORT))
    rows = [r for r in agent.show(plan) if r["sport"] == s.getsockname()[1]]
    assert len(rows) == 1 and rows[0]["vm_port"], rows
    busy = rows[0]["vm_port"]
    r = _lasthop(plan, "service", "drain", "web", busy)
    assert r.returncode == 0, r.stderr

    def echo(text: bytes) -> bool:
        s.sendall(text)
        return s.recv(100) == text

    assert echo(b"still there\n")
    running.stop()
    running.start()  # the drain and the service outlive the agent
    assert json.loads((state_dir / plan.host.ns / "services.json").read_text())["services"]
    assert _vm_states(plan)[busy] == ("up", False)
    assert echo(b"after a restart\n")
    for i in range(20):
        body, _ = _get(plan.client(1 + i % 3).ns, 4, VIP.v4)
        assert body is not None and body != busy
    s.close()


def test_a_vm_failing_its_checks_gets_no_new_connections(vip_lab: Lab,
                                                          running: agent.LasthopAgent) -> None:
    """vm3's servers stop: after two failed checks it is unhealthy and out of the table."""
    plan = vip_lab.plan
    vm3 = plan.vm(3)
    stop_pids([vip_lab.state.servers[vm3.name]])
    assert _eventually(lambda: _vm_states(plan)["vm3"] == ("unhealthy", False)), _vm_states(plan)
    assert "vm3" in _lasthop(plan, "service", "list").stdout
    for i in range(20):
        body, _ = _get(plan.client(1 + i % 3).ns, 4, VIP.v4)
        assert body in ("vm1", "vm2"), body
    changes = {v["port"]: v["changes"] for v in _services(plan)["web"]["vms"]}  # type: ignore[attr-defined]
    assert changes["vm3"] >= 2  # unknown -> up -> unhealthy, each counted


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
    _serve_vip(lab, [SERVER_SITE], vms=False)
    net4, net6 = P.client_net(SERVER_SITE)
    ip_batch(plan.host.ns, [f"route replace {net4} via {fw.transit.v4}",
                            f"route replace {net6} via {fw.transit.v6}"])
    proc = subprocess.Popen(["ip", "netns", "exec", srv.ns, sys.executable, "-m",
                             "lasthop.lab.servers", "srv"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield lab
    finally:
        proc.terminate()
        proc.wait(5)


def _proxied(lab: Lab, n: int, family: int, sport: int, timeout: float = TIMEOUT) -> str | None:
    """VM n opens a connection from the shared address to the server."""
    srv = lab.plan.client(SERVER_SITE)
    return _get(lab.plan.vm(n).ns, family, srv.addr.of(family), source=(VIP.of(family), sport),
                timeout=timeout)[0]


def test_full_proxy_vms_sharing_one_address_get_their_servers_replies(
    proxy_lab: Lab, state_dir: Path, tmp_path: Path
) -> None:
    """Without lasthop the server's reply to the shared address never reaches
    the VM; with it, each of 3 VMs x 4 connections (IPv4 and IPv6, at once)
    gets its own replies, and the entries name fw9 as the last hop."""
    lab, plan = proxy_lab, proxy_lab.plan
    assert _proxied(lab, 1, 4, 41000, timeout=1.0) is None
    cfg = _config(tmp_path / "lasthop.toml", plan)
    with agent.LasthopAgent(plan, extra=("--config", str(cfg))):
        jobs = [(n, 4 if i % 2 else 6, 42000 + 10 * n + i) for n in plan.vms for i in range(4)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            bodies = list(pool.map(lambda j: _proxied(lab, *j), jobs))
        assert bodies == ["srv"] * len(jobs), list(zip(jobs, bodies, strict=True))
        rows = {(r["dst"], r["dport"]): r for r in agent.show(plan) if "vm_origin" in r["flags"]}
        fw9 = plan.firewall(SERVER_SITE)
        for n, family, sport in jobs:
            row = rows[(VIP.of(family), sport)]
            assert (row["vm_port"], row["mac"], row["uplink"]) == (
                plan.vm(n).port, fw9.transit_mac, plan.host.uplink), row
        stats = json.loads(_lasthop(plan, "stats", "--json").stdout)["totals"]
        assert stats["vm_origin_learned"] >= len(jobs)
        assert stats["vm_origin_returned"] >= len(jobs)
    counters = json.loads(ns_exec(fw9.ns, ["nft", "-j", "list", "counters", "table", "inet",
                                           "svc_fw"]).stdout)["nftables"]
    drops = {c["counter"]["name"]: c["counter"]["packets"] for c in counters if "counter" in c}
    assert drops["drop_invalid"] == 0 and drops["accepted_new"] >= len(jobs)

"""The REST API: the app against a fake controller over httpx's ASGI
transport (no kernel), then the real unix socket and TCP listener of a
running agent."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentlib import PinnedTable, Sandbox, conn_key, lasthop
from lasthop.api import create_app
from lasthop.connections import Connection, ConnFilter
from lasthop.controller import Attached, InterfaceInfo, NotAttachedError, Stats, TableStats
from lasthop.libbpf import BpfError

CONN = Connection(
    proto="udp",
    family=4,
    src="192.0.2.1",
    dst="192.0.2.2",
    sport=5000,
    dport=53,
    zone=0,
    mac="02:00:00:00:00:0a",
    uplink="up0",
    uplink_ifindex=2,
    vlan=[100],
    age_s=1.5,
    packets=3,
    replies=2,
    vm_port="",
    flags=["hop_known"],
)
STATS = Stats(
    totals={"learned": 7, "redirected": 5, "miss": 1, "agent_removed": 2},
    interfaces={
        "up0": {"learned": 7},
        "vm0": {"redirected": 5, "miss": 1},
        "unattached": {"agent_removed": 2},
    },
    confirmed=TableStats(
        entries=3,
        capacity=1024,
        inserted=3,
        expired=0,
        removed=2,
        evicted=0,
        states={"tcp_established": 3},
    ),
    pending=TableStats(
        entries=1,
        capacity=256,
        inserted=9,
        expired=2,
        removed=0,
        evicted=1,
        states={"tcp_syn_sent": 1},
    ),
    promoted=5,
    confirm_refused=0,
    expiry_passes=7,
    expiry_skipped=40,
    last_pass_age_s=1.0,
    next_due_s=25.0,
)
IFACE = InterfaceInfo(
    name="up0",
    ifindex=2,
    role="uplink",
    zone=0,
    slot=1,
    mac="02:00:00:00:00:01",
    routed=False,
    hook="tcx",
)


class FakeController:
    """The controller's surface the API uses; records calls."""

    netns = "fake-ns"

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if self.fail is not None:
            raise self.fail

    def attached_now(self) -> Attached:
        return Attached(uplinks={2: "up0"}, vm_ports={3: "vm0", 4: "vm1"})

    def iter_connections(
        self, where: ConnFilter | None = None, *, limit: int = 0
    ) -> Iterator[Connection]:
        self._call("connections", limit)
        self.where = where
        return iter([CONN, CONN][: limit or None])

    def stats(self) -> Stats:
        self._call("stats")
        return STATS

    def flush(self) -> int:
        self._call("flush")
        return 4

    def flush_out_of_scope(self) -> int:
        self._call("flush_out_of_scope")
        return 1

    def interfaces(self) -> list[InterfaceInfo]:
        self._call("interfaces")
        return [IFACE]


def request(controller: FakeController, method: str, url: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(controller))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://lasthop") as client:
            return await client.request(method, url)

    return asyncio.run(go())


def test_healthz_reports_the_namespace_and_attached_interfaces() -> None:
    r = request(FakeController(), "GET", "/healthz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "netns": "fake-ns",
        "uplinks": ["up0"],
        "vm_ports": ["vm0", "vm1"],
    }


def test_connections_are_show_json_and_pass_the_limit() -> None:
    """GET /v1/connections returns what show --json prints; ?limit= reaches the controller."""
    fake = FakeController()
    assert request(fake, "GET", "/v1/connections").json() == [CONN.to_json(), CONN.to_json()]
    assert request(fake, "GET", "/v1/connections?limit=1").json() == [CONN.to_json()]
    assert fake.calls == [("connections", 0), ("connections", 1)]


@pytest.mark.parametrize("query", ["limit=-1", "limit=lots"])
def test_a_bad_limit_is_422(query: str) -> None:
    fake = FakeController()
    assert request(fake, "GET", f"/v1/connections?{query}").status_code == 422
    assert fake.calls == []


def test_stats_are_stats_json() -> None:
    r = request(FakeController(), "GET", "/v1/stats")
    assert r.json() == STATS.to_json()
    assert {"entries", "capacity", "evicted", "confirmed", "pending"} <= set(r.json()["table"])


def test_flush_is_a_post() -> None:
    """POST /v1/flush flushes and says how many; GET is not allowed and flushes nothing."""
    fake = FakeController()
    assert request(fake, "GET", "/v1/flush").status_code == 405
    assert fake.calls == []
    r = request(fake, "POST", "/v1/flush")
    assert (r.status_code, r.json(), fake.calls) == (200, {"flushed": 4}, [("flush", None)])


def test_flush_out_of_scope_flushes_only_those() -> None:
    """POST /v1/flush?out_of_scope=true asks the controller for the scope's flush alone."""
    fake = FakeController()
    r = request(fake, "POST", "/v1/flush?out_of_scope=true")
    assert (r.status_code, r.json()) == (200, {"flushed": 1})
    assert fake.calls == [("flush_out_of_scope", None)]


def test_interfaces() -> None:
    assert request(FakeController(), "GET", "/v1/interfaces").json() == [
        {
            "name": "up0",
            "ifindex": 2,
            "role": "uplink",
            "zone": 0,
            "slot": 1,
            "mac": "02:00:00:00:00:01",
            "routed": False,
            "link_down": False,
            "link_kind": "ethernet",
            "hook": "tcx",
        }
    ]


def test_metrics_are_prometheus_text_read_on_each_scrape() -> None:
    """/metrics has packets per reason and interface, the table's size and evictions; the maps
    are read once per scrape and never when the app is built."""
    fake = FakeController()
    app = create_app(fake)  # type: ignore[arg-type]
    assert fake.calls == []

    async def scrape() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://x"
        ) as c:
            return await c.get("/metrics")

    r = asyncio.run(scrape())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples == {
        ("lasthop_packets_total", (("interface", "up0"), ("reason", "learned"))): 7,
        ("lasthop_packets_total", (("interface", "vm0"), ("reason", "miss"))): 1,
        ("lasthop_packets_total", (("interface", "vm0"), ("reason", "redirected"))): 5,
        ("lasthop_table_entries", ()): 4,
        ("lasthop_table_capacity", ()): 1280,
        ("lasthop_table_evicted_total", ()): 1,
        ("lasthop_table_removed_total", ()): 2,
        ("lasthop_expiry_runs_total", (("outcome", "walked"),)): 7,
        ("lasthop_expiry_runs_total", (("outcome", "skipped"),)): 40,
        ("lasthop_table_state_entries", (("state", "tcp_established"), ("table", "confirmed"))): 3,
        ("lasthop_table_state_entries", (("state", "tcp_syn_sent"), ("table", "pending"))): 1,
        **{
            ("lasthop_table_events_total", (("event", e), ("table", t))): n
            for t, e, n in (
                ("confirmed", "inserted", 3),
                ("confirmed", "expired", 0),
                ("confirmed", "removed", 2),
                ("pending", "inserted", 9),
                ("pending", "expired", 2),
                ("pending", "removed", 0),
                ("pending", "promoted", 5),
                ("confirmed", "refused", 0),
            )
        },
    }
    asyncio.run(scrape())
    assert fake.calls == [("stats", None), ("stats", None)]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotAttachedError("no data path pinned at /sys/fs/bpf/lasthop/x"), 503),
        (BpfError("bpf_map_lookup_elem", 1), 500),
    ],
)
def test_controller_errors_become_http_errors(error: Exception, status: int) -> None:
    """Nothing attached is 503, a kernel error 500; both carry the message as detail."""
    for method, url in (("GET", "/v1/stats"), ("GET", "/v1/connections"), ("POST", "/v1/flush")):
        r = request(FakeController(fail=error), method, url)
        assert r.status_code == status
        assert r.json() == {"detail": str(error)}


# -- a running agent ---------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_the_agent_serves_the_api_on_its_unix_socket(box: Sandbox) -> None:
    """lasthop run listens on /run/lasthop/<netns>.sock; its answers match show/stats --json and
    flush works through it."""
    ns = box.host()
    agent = box.agent("--uplink", "up0", "--vm-port", "vm0", "--table-size", "2048", netns=ns)
    assert agent.ready_line.endswith(f"; API on unix:{ns.socket}")
    assert oct(ns.socket.stat().st_mode & 0o777) == "0o660"
    table = PinnedTable(ns.pins)
    try:
        for port in (1, 2):
            table.add(conn_key("192.0.2.1", "192.0.2.9", port, 80), uplink=ns.ifindex("up0"))
    finally:
        table.close()
    transport = httpx.HTTPTransport(uds=str(ns.socket))
    with httpx.Client(transport=transport, base_url="http://lasthop", timeout=10) as api:
        assert api.get("/healthz").json()["netns"] == ns.name

        def no_age(conns: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return sorted(
                ({k: v for k, v in c.items() if k != "age_s"} for c in conns),
                key=lambda c: c["sport"],
            )

        shown = json.loads(lasthop("show", "--netns", ns.name, "--json").stdout)
        assert no_age(api.get("/v1/connections").json()) == no_age(shown)
        assert len(api.get("/v1/connections", params={"limit": 1}).json()) == 1

        by_api = api.get("/v1/stats").json()
        by_cli = json.loads(lasthop("stats", "--netns", ns.name, "--json").stdout)
        for moving in ("last_pass_age_s", "next_due_s"):  # both move between the two reads
            values = [by_api["table"].pop(moving), by_cli["table"].pop(moving)]
            if None in values:  # None until the first expiry pass, then seconds
                assert values == [None, None], moving
            else:
                assert abs(values[0] - values[1]) < 10.0, (moving, values)
        assert by_api == by_cli
        assert [i["name"] for i in api.get("/v1/interfaces").json()] == ["up0", "vm0"]

        assert api.post("/v1/flush").json() == {"flushed": 2}
        assert api.get("/v1/connections").json() == []
        metrics = api.get("/metrics").text
        # lh_conns4 2048 + 256 (in place: a quarter of lh_pending4) + lh_pending4 1024
        # + lh_conns 1024 + lh_pending 1024 (IPv6: at least 1024)
        assert "lasthop_table_capacity 5376.0" in metrics
        assert "lasthop_table_removed_total 2.0" in metrics
    agent.stop()
    assert not ns.socket.exists()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_the_agent_serves_tcp_in_its_namespace(box: Sandbox) -> None:
    """--api HOST:PORT adds a TCP listener inside the agent's namespace; --api-socket "" drops the
    unix socket."""
    ns = box.host()
    agent = box.agent("--uplink", "up0", "--api", "127.0.0.1:9180", "--api-socket", "", netns=ns)
    assert agent.ready_line.endswith("; API on http://127.0.0.1:9180")
    assert not ns.socket.exists()
    probe = "import httpx; print(httpx.get('http://127.0.0.1:9180/healthz').text)"
    result = ns.exec(sys.executable, "-c", probe)
    assert json.loads(result.stdout)["netns"] == ns.name

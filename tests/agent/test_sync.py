"""Sync between two hosts through a real Redis (a redis-server this module
starts on a unix socket in a temp dir, reachable from every namespace):

    fw (10.0.0.1) ── fw0 ┐                                   ┌ fw0   host B: same names,
                          br0  host A ── agent A ─┐   ┌─ agent B   other ifindexes
    vm (10.0.0.2) ── vm0 ┘                         Redis          └ vm0
                                               (lasthop:<cluster>:changes)

A connection the firewall opens to the VM through host A appears on host B
with the same last-hop MAC, its uplink by name, and the same time left; with
Redis down A keeps forwarding and counts what it could not publish, and
once Redis is back its resync brings B what it missed. Entries A's agent
removes (a flush) go from B too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_client

from agentlib import ROOT_MARKS, BridgedSite, Netns, Sandbox, lasthop, sandbox, wait_for
from lasthop import abi, libbpf
from lasthop.datapath import FamilyMap, hops_in_use
from lasthop.sync import store

pytestmark = [*ROOT_MARKS, pytest.mark.slow]


class RedisServer(store.RedisServer):
    """The store of these tests, in a temp dir of its own; close() removes it."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip(
                "needs redis-server (Debian package redis-server: scripts/setup installs it)"
            )
        super().__init__(Path(tempfile.mkdtemp(prefix="lasthop-redis-")))

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Cluster:
    """Host A (a bridged site with traffic) and host B (the same interface
    names, shifted ifindexes), each with an agent syncing through *redis*."""

    def __init__(self, box: Sandbox, redis: RedisServer) -> None:
        self.redis = redis
        self.box = box
        self.site = BridgedSite(box)
        self.a = self.site.host
        self.b = box.netns("b")
        self.b.veth("pad0", "pad0p")  # B's fw0 gets another ifindex than A's
        self.b.veth("fw0", "fw0p")
        self.b.veth("vm0", "vm0p")
        assert self.a.ifindex("fw0") != self.b.ifindex("fw0")
        self.site.serve()
        sync = ("--sync", redis.url)
        box.agent("--uplink", "fw0", "--bridge", "br0", *sync, netns=self.a)
        box.agent("--uplink", "fw0", "--vm-port", "vm0", *sync, netns=self.b)

    def show(self, ns: Netns) -> list[dict[str, Any]]:
        return _show(ns)

    def conn(self, ns: Netns, proto: str, port: int) -> dict[str, Any] | None:
        found = [c for c in self.show(ns) if c["proto"] == proto and c["sport"] == port]
        return found[0] if found else None

    def last_seen(self, ns: Netns, sport: int) -> int:
        """last_seen of the entry whose client port is *sport*, from the pins."""
        for which in (abi.ChangeTable.CONFIRMED, abi.ChangeTable.PENDING):
            table = FamilyMap.of(lambda name: libbpf.Map.pinned(ns.pins / name), which)
            try:
                for key, value in table.items():
                    if abi.ConnKey.from_buffer_copy(key).sport == socket.htons(sport):
                        return int(abi.ConnEntry.from_buffer_copy(value).last_seen)
            finally:
                table.close()
        raise AssertionError(f"no entry of port {sport} in {ns.name}")

    def hz(self) -> int:
        settings = libbpf.Map.pinned(self.a.pins / "lh_settings")
        try:
            raw = settings.lookup(bytes(4))
            assert raw is not None
            return int(abi.Settings.from_buffer_copy(raw).hz)
        finally:
            settings.close()

    @staticmethod
    def api(ns: Netns, path: str, method: str = "GET") -> Any:
        transport = httpx.HTTPTransport(uds=str(ns.socket))
        with httpx.Client(transport=transport, base_url="http://lasthop", timeout=10) as client:
            return client.request(method, path).json()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    redis = RedisServer()
    try:
        with sandbox() as box:
            redis.start()
            c = Cluster(box, redis)
            try:
                yield c
            finally:
                c.site.close()
    finally:
        redis.close()


def test_a_connection_learned_on_a_appears_on_b(cluster: Cluster) -> None:
    """B holds A's entry: same last-hop MAC, the uplink by name (another
    ifindex), the same state, and a time left within a second of A's."""
    port = cluster.site.exchange("tcp", n=3)

    def on_b() -> dict[str, Any] | None:
        a, b = cluster.conn(cluster.a, "tcp", port), cluster.conn(cluster.b, "tcp", port)
        return b if a and b and b["state"] == a["state"] else None  # the close too

    b = wait_for(on_b, timeout=10)
    a = cluster.conn(cluster.a, "tcp", port)
    assert a is not None
    assert b["mac"] == a["mac"] == cluster.site.fw_mac
    assert b["uplink"] == a["uplink"] == "fw0"
    assert (b["src"], b["dst"], b["dport"]) == (a["src"], a["dst"], a["dport"])
    # one kernel, one jiffies clock, the same timeouts: the same time left is
    # the same last_seen, read from both hosts' pins in the same instant
    seen_a, seen_b = cluster.last_seen(cluster.a, port), cluster.last_seen(cluster.b, port)
    assert abs((seen_a - seen_b + 2**31) % 2**32 - 2**31) < cluster.hz()

    off = lasthop("sync", "status", "--netns", cluster.a.name)  # no --sync, no config key
    assert off.returncode == 1 and "sync is off" in off.stderr

    def a_status() -> dict[str, Any] | None:
        # the CLI reads A's figures from its heartbeat (every HEARTBEAT_S), which
        # may not yet count what B already applied
        out = lasthop(
            "sync", "status", "--netns", cluster.a.name, "--sync", cluster.redis.url, "--json"
        )
        assert out.returncode == 0, out.stderr
        status: dict[str, Any] = json.loads(out.stdout)
        return status if status["published"] >= 3 else None

    a_st = wait_for(a_status, timeout=10, every=0.25)
    b_status = cluster.api(cluster.b, "/v1/sync")
    assert a_st["published"] >= 3 and a_st["lost"] == 0
    assert b_status["applied"] >= 1  # A's records of one key in one batch travel as one
    [peer] = b_status["peers"].values()
    assert peer["last_seen_s"] < 5 and peer["lag_ms"] is not None
    metrics = httpx.Client(transport=httpx.HTTPTransport(uds=str(cluster.b.socket)))
    with metrics:
        text = metrics.get("http://lasthop/metrics").text
    assert 'lasthop_sync_records_total{event="applied"}' in text


def test_a_malformed_batch_is_ignored_and_counted_in_the_api_metrics_and_status(
    cluster: Cluster,
) -> None:
    """A batch of another wire version changes nothing and is counted once:
    /v1/sync, /metrics (lasthop_sync_malformed_batches_total) and `sync
    status` (from B's next heartbeat) all say so."""
    before = cluster.api(cluster.b, "/v1/sync")["malformed"]
    client = redis_client.Redis.from_url(cluster.redis.url)
    with client:
        client.xadd(
            "lasthop:default:changes",
            {"host": "intruder", "type": "changes", "ts": "0", "v": "1", "names": "[]",
             "records": b"\x01" * 84},
        )  # fmt: skip
    wait_for(lambda: cluster.api(cluster.b, "/v1/sync")["malformed"] == before + 1, timeout=10)
    metrics = httpx.Client(transport=httpx.HTTPTransport(uds=str(cluster.b.socket)))
    with metrics:
        text = metrics.get("http://lasthop/metrics").text
    assert f"lasthop_sync_malformed_batches_total {float(before + 1)}" in text

    def status() -> dict[str, Any]:
        out = lasthop(
            "sync", "status", "--netns", cluster.b.name, "--sync", cluster.redis.url, "--json"
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    wait_for(lambda: status()["malformed"] == before + 1, timeout=10)
    text = lasthop("sync", "status", "--netns", cluster.b.name, "--sync", cluster.redis.url)
    assert f"malformed batches {before + 1}" in text.stdout
    assert "intruder" not in cluster.api(cluster.b, "/v1/sync")["peers"]


def test_store_down_a_keeps_forwarding_counts_and_resyncs(cluster: Cluster) -> None:
    """Redis stopped: A still learns and forwards, and counts the records it
    could not publish; Redis back: A's resync brings B the connection."""
    cluster.redis.stop()
    time.sleep(0.5)
    port = cluster.site.exchange("udp", n=3)  # works: the data path does not wait for anyone
    assert cluster.conn(cluster.a, "udp", port) is not None
    unpublished = wait_for(lambda: cluster.api(cluster.a, "/v1/sync")["unpublished"], timeout=10)
    assert unpublished >= 1
    assert cluster.api(cluster.a, "/v1/sync")["connected"] is False
    assert cluster.conn(cluster.b, "udp", port) is None

    resyncs = cluster.api(cluster.a, "/v1/sync")["resyncs"]
    cluster.redis.start()
    wait_for(lambda: cluster.conn(cluster.b, "udp", port), timeout=15)
    assert cluster.api(cluster.a, "/v1/sync")["resyncs"] > resyncs


def test_entries_the_agent_removes_go_from_b(cluster: Cluster) -> None:
    """A flush through A's agent publishes a REMOVED record per entry: the
    connection B holds from A goes from B's table too."""
    port = cluster.site.exchange("tcp", n=3)
    wait_for(lambda: cluster.conn(cluster.b, "tcp", port), timeout=10)
    assert cluster.api(cluster.a, "/v1/flush", "POST")["flushed"] >= 1
    wait_for(lambda: cluster.conn(cluster.b, "tcp", port) is None, timeout=10)


class OtherSite(BridgedSite):
    """A second site on its own host, with addresses of its own (so its
    connections never share a key with the first site's)."""

    FW_IP, VM_IP = "10.0.0.3", "10.0.0.4"


OUTAGE_S = float(os.environ.get("LASTHOP_STORE_DOWN_S", "3"))  # the target's is 30 s
_SAME = ("mac", "uplink", "vm_port", "state", "flags")


def _table(ns: Netns) -> dict[tuple[object, ...], dict[str, Any]]:
    result = lasthop("show", "--netns", ns.name, "--json")
    assert result.returncode == 0, result.stderr
    return {
        (r["proto"], r["src"], r["dst"], r["sport"], r["dport"], r["zone"]): r
        for r in json.loads(result.stdout)
    }


def _differences(a: Netns, b: Netns) -> list[str]:
    """How hosts A's and B's tables differ, entry by entry: the same keys,
    each with the same last hop, VM port, state and flags, and an age within
    a second and a half."""
    ta, tb = _table(a), _table(b)
    out = [f"only on A: {k}" for k in ta.keys() - tb.keys()]
    out += [f"only on B: {k}" for k in tb.keys() - ta.keys()]
    for k in ta.keys() & tb.keys():
        ea, eb = ta[k], tb[k]
        diff = [f for f in _SAME if ea[f] != eb[f]]
        if abs(ea["age_s"] - eb["age_s"]) > 1.5:
            diff.append(f"age {ea['age_s']} / {eb['age_s']}")
        if diff:
            out.append(f"{k}: {', '.join(str(d) for d in diff)}")
    return out


def test_store_down_both_hosts_forward_count_and_resync_to_equal_tables() -> None:
    """Two hosts, each with its own firewall and VM and traffic. Redis stops
    for OUTAGE_S (LASTHOP_STORE_DOWN_S=30 for the target's 30 s): both keep
    forwarding new connections with their own tables and count what they
    could not publish; Redis back (empty): both resync, and then their
    tables are equal entry by entry."""
    redis = RedisServer()
    try:
        with sandbox() as box:
            redis.start()
            site_a, site_b = BridgedSite(box), OtherSite(box)
            try:
                for site in (site_a, site_b):
                    site.serve()
                    box.agent("--uplink", "fw0", "--bridge", "br0", "--sync", redis.url,
                              netns=site.host)  # fmt: skip
                a, b = site_a.host, site_b.host
                site_a.exchange("udp"), site_b.exchange("udp")
                wait_for(lambda: not _differences(a, b), timeout=15)

                redis.stop()
                api = {ns.name: Cluster.api(ns, "/v1/sync") for ns in (a, b)}
                wait_for(
                    lambda: not any(Cluster.api(ns, "/v1/sync")["connected"] for ns in (a, b)),
                    timeout=15,
                )
                # the outage: new connections on both, all the while (an exchange
                # that fails raises); the UDP ones' entries outlive it (udp_stream)
                during: dict[str, list[int]] = {"a": [], "b": []}
                end = time.monotonic() + OUTAGE_S
                while time.monotonic() < end:
                    for name, site in (("a", site_a), ("b", site_b)):
                        during[name].append(site.exchange("udp"))
                        site.exchange("tcp")
                for name, ns in (("a", a), ("b", b)):
                    mine = _table(ns)
                    assert all(any(k[3] == p for k in mine) for p in during[name]), name
                    status = Cluster.api(ns, "/v1/sync")
                    assert status["unpublished"] > api[ns.name]["unpublished"], name
                assert _differences(a, b)  # neither has the other's new connections

                redis.start()
                wait_for(lambda: not _differences(a, b), timeout=30)
                tb = _table(b)
                assert all(any(k[3] == p and k[1] == site_a.FW_IP for k in tb) for p in during["a"])
            finally:
                site_a.close()
                site_b.close()
    finally:
        redis.close()


class OverlaySite(BridgedSite):
    """The firewall reaches host A's bridge through VXLAN (VNI 100, from its
    endpoint 192.0.2.1 to the host's 192.0.2.2), as in an EVPN overlay: host
    A's uplink vx0 is an external (collect-metadata) VXLAN device, so a reply
    reaches the firewall only with the tunnel key lasthop learned.

    fw (vxf 10.0.0.1) ─ eth0 192.0.2.1 ══ und0 192.0.2.2 ─ vx0 ┐
                                                               br0  host A
    vm (eth0 10.0.0.2) ─────────────────────────────────── vm0 ┘
    """

    ENDPOINT, HOST_ENDPOINT, VNI = "192.0.2.1", "192.0.2.2", 100

    def __init__(self, box: Sandbox) -> None:  # noqa: D107 (no super(): other links)
        self.box = box
        self.host, self.fw, self.vm = box.netns("h"), box.netns("f"), box.netns("v")
        self.host.veth("und0", "eth0", self.fw)
        self.host.ip("addr", "add", f"{self.HOST_ENDPOINT}/24", "dev", "und0")
        self.fw.ip("addr", "add", f"{self.ENDPOINT}/24", "dev", "eth0")
        self.host.ip("link", "add", "vx0", "type", "vxlan", "external", "dstport", "4789")
        self.host.veth("vm0", "eth0", self.vm)
        self.host.bridge("br0", "vx0", "vm0")
        self.host.ip("link", "set", "vx0", "up")
        self.fw.ip("link", "add", "vxf", "type", "vxlan", "id", str(self.VNI), "local",
                   self.ENDPOINT, "remote", self.HOST_ENDPOINT, "dstport", "4789",
                   "nolearning")  # fmt: skip
        self.fw.ip("link", "set", "vxf", "up")
        self.fw.ip("addr", "add", f"{self.FW_IP}/24", "dev", "vxf")
        self.vm.ip("addr", "add", f"{self.VM_IP}/24", "dev", "eth0")
        self.fw_mac = self.fw.mac("vxf")
        # neither side's ARP crosses the external device without a tunnel key
        self.fw.ip("neigh", "replace", self.VM_IP, "lladdr", self.vm.mac("eth0"), "dev", "vxf",
                   "nud", "permanent")  # fmt: skip
        self.vm.ip("neigh", "replace", self.FW_IP, "lladdr", self.fw_mac, "dev", "eth0",
                   "nud", "permanent")  # fmt: skip
        self._server = None


def _show(ns: Netns) -> list[dict[str, Any]]:
    result = lasthop("show", "--netns", ns.name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _hops(ns: Netns) -> dict[int, bytes]:
    """Host *ns*'s lh_hop_descs from its pins: id (slot and generation) -> the
    descriptor's content (its bytes before mark, which only says which expiry
    pass last kept it), the slots in use."""
    descs = libbpf.Map.pinned(ns.pins / "lh_hop_descs")
    try:
        return {hop_id: bytes(d)[: abi.HopDesc.mark.offset] for hop_id, d in hops_in_use(descs)}
    finally:
        descs.close()


def _hop_of(ns: Netns, port: int) -> tuple[dict[str, Any], bytes]:
    """The entry of client port *port* as `show` gives it, and the content of
    the descriptor it names in *ns*'s lh_hop_descs."""
    for which in (abi.ChangeTable.CONFIRMED, abi.ChangeTable.PENDING):
        table = FamilyMap.of(lambda name: libbpf.Map.pinned(ns.pins / name), which)
        try:
            for key, value in table.items():
                if abi.ConnKey.from_buffer_copy(key).sport == socket.htons(port):
                    hop_id = abi.hop_desc_id(abi.ConnEntry.from_buffer_copy(value))
                    assert hop_id is not None, "the entry names no hop descriptor"
                    shown = [c for c in _show(ns) if c["sport"] == port]
                    return shown[0], _hops(ns)[hop_id]
        finally:
            table.close()
    raise AssertionError(f"no entry of port {port} in {ns.name}")


def test_a_vxlan_last_hop_learned_on_a_appears_on_b_with_an_equal_descriptor() -> None:
    """A connection through a VXLAN uplink: A's entry names a descriptor
    (endpoint, VNI) in its lh_hop_descs. B (its own vx0 and vm0, other
    ifindexes) gets the entry naming a descriptor of its own, equal in
    content; and again from A's resync after B lost both."""
    redis = RedisServer()
    try:
        with sandbox() as box:
            redis.start()
            site = OverlaySite(box)
            b = box.netns("b")
            b.veth("pad0", "pad0p")
            b.ip("link", "add", "vx0", "type", "vxlan", "external", "dstport", "4789")
            b.ip("link", "set", "vx0", "up")
            b.veth("vm0", "vm0p")
            try:
                site.serve()
                sync = ("--sync", redis.url)
                box.agent("--uplink", "vx0", "--bridge", "br0", *sync, netns=site.host)
                box.agent("--uplink", "vx0", "--vm-port", "vm0", *sync, netns=b)
                port = site.exchange("tcp", n=3)  # answered only through lasthop's tunnel key
                shown_a, desc_a = _hop_of(site.host, port)
                assert (shown_a["endpoint"], shown_a["vni"]) == (site.ENDPOINT, site.VNI)

                def on_b() -> tuple[dict[str, Any], bytes] | None:
                    shown = [c for c in _show(b) if c["sport"] == port]
                    ok = shown and shown[0]["state"] == shown_a["state"]
                    return _hop_of(b, port) if ok else None

                shown_b, desc_b = wait_for(on_b, timeout=10)
                assert desc_b == desc_a
                for f in ("endpoint", "vni", "mac", "uplink", "state", "flags"):
                    assert shown_b[f] == shown_a[f], f
                assert Cluster.api(b, "/v1/sync")["hop_refused"] == 0

                # B loses the entry and the descriptor; A's resync brings both back
                for name in ("lh_conns4", "lh_pending4"):
                    m = libbpf.Map.pinned(b.pins / name)
                    try:
                        for key in list(m.keys()):
                            m.delete(key)
                    finally:
                        m.close()
                m = libbpf.Map.pinned(b.pins / "lh_hop_descs")
                try:  # an array: each slot freed as the sweep frees it (generation 2 on)
                    for key, value in m.items():
                        d = abi.HopDesc.from_buffer_copy(value)
                        if d.kind:
                            m.update(key, bytes(abi.HopDesc(gen=d.gen + 2)))
                finally:
                    m.close()
                assert not [c for c in _show(b) if c["sport"] == port]
                Cluster.api(site.host, "/v1/sync/resync", "POST")
                shown_b, desc_b = wait_for(on_b, timeout=10)
                assert desc_b == desc_a and shown_b["endpoint"] == site.ENDPOINT
            finally:
                site.close()
    finally:
        redis.close()

"""The connection table under attack and under load, in the lab, with real
traffic (issue 8): a flood of spoofed connections does not evict idle
established ones; a VM that borrows another VM's address cannot take a
client's connections; entries learned and refreshed all the time survive the
kernel's expiry passes, and the ones left idle go within their timeout + 5 s.

    cl2 ── fw2 ──┐                          ┌── vm1
    cl3 ── fw3 ──┼── sw ── up0 [lasthop] ───┼── vm2
           fw1 ──┘                          └── vm3   (the VMs' default route: fw1)

Every reply of a cl2/cl3 connection that took the VM's default route would
reach fw1, which never saw the connection start, and be dropped: a byte that
arrives proves lasthop still had the connection's entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lasthop.lab import Lab, runner, traffic
from lasthop.lab import plan as P
from lasthop.lab.demo import expect_all_ok
from lasthop.lab.flood import RawSender, spoofed_connections, spoofed_syns
from lasthop.lab.namespaces import NetnsExecutor, eventually, open_socket

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
SPEAK_PORT = 7070  # a server in the test process that speaks first


def _agent(lab: Lab, tmp_path: Path, toml: str) -> runner.AgentRunner:
    """The lab's agent with *toml* as its config file (the lab's command line on top)."""
    path = tmp_path / "lasthop.toml"
    path.write_text(toml)
    return runner.AgentRunner(lab.plan, extra=("--config", str(path)))


def _table(plan: P.Plan) -> dict[str, Any]:
    table: dict[str, Any] = runner.stats(plan)["table"]
    return table


def _key(row: dict[str, Any]) -> tuple[str, int, str, int]:
    return (row["src"], row["sport"], row["dst"], row["dport"])


# -- 1. flood -------------------------------------------------------------------

FLOOD_TABLE = 256  # confirmed and pending entries
FLOOD_CONNECTIONS = 5000  # x 3 packets, ~20x the pending table
IDLE_CONNECTIONS = 20
SPEAK_BYTES = 32 * 1024


@dataclass
class _Idle:
    """A real connection cl2 -> vmN:SPEAK_PORT through fw2: its client and server sockets."""

    vm: P.Vm
    family: int
    client: socket.socket
    server: socket.socket
    key: tuple[str, int, str, int]


@contextlib.contextmanager
def _idle_connections(plan: P.Plan, n: int) -> Iterator[list[_Idle]]:
    """*n* established TCP connections from cl2 to servers in vm1..vm3 (both
    families), accepted by listeners this process holds inside the VMs."""
    cl = plan.client(2)
    with contextlib.ExitStack() as stack:
        listeners: dict[tuple[int, int], socket.socket] = {}
        for v in plan.vms:
            for fam in (4, 6):
                s = stack.enter_context(open_socket(plan.vm(v).ns, _AF[fam], socket.SOCK_STREAM))
                s.bind((plan.vm(v).addr.of(fam), SPEAK_PORT))
                s.listen(64)
                s.settimeout(3.0)
                listeners[(v, fam)] = s
        out = []
        for i in range(n):
            vm, fam = plan.vm(plan.vms[i % len(plan.vms)]), 4 if i % 2 == 0 else 6
            c = stack.enter_context(open_socket(cl.ns, _AF[fam], socket.SOCK_STREAM))
            c.settimeout(3.0)
            c.connect((vm.addr.of(fam), SPEAK_PORT))
            srv, _ = listeners[(vm.n, fam)].accept()
            stack.enter_context(srv)
            srv.settimeout(3.0)
            key = (cl.addr.of(fam), c.getsockname()[1], vm.addr.of(fam), SPEAK_PORT)
            out.append(_Idle(vm, fam, c, srv, key))
        yield out


def _receive_all(conn: _Idle, size: int, deadline: float) -> int:
    got = 0
    while got < size and time.monotonic() < deadline:
        conn.client.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = conn.client.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        got += len(chunk)
    return got


@pytest.mark.parametrize("in_place", [0, FLOOD_TABLE // 4], ids=["lru", "in-place"])
def test_a_flood_of_spoofed_connections_leaves_idle_established_ones_working(
    bridged_lab: Lab, tmp_path: Path, in_place: int
) -> None:
    """20 idle established connections through fw2; 5,000 spoofed connections
    x 3 packets (SYN, ACK with data, SYN retransmit or more data) flood the
    uplink from fw3's transit leg, ~20x the pending table; then every server
    speaks first, and every byte reaches its client: no confirmed entry was
    evicted. (Once the table is flushed, a server's first words are lost.)
    With pending_in_place, the idle connections confirmed in place and the
    flood takes the quota first, then evicts in the LRU as without it."""
    plan = bridged_lab.plan
    fw3 = plan.firewall(3)
    toml = (
        f"table_size = {FLOOD_TABLE}\npending_table_size = {FLOOD_TABLE}\n"
        f"pending_in_place = {in_place}\n"
    )
    with _agent(bridged_lab, tmp_path, toml), _idle_connections(plan, IDLE_CONNECTIONS) as idle:
        keys = {c.key for c in idle}

        def all_confirmed() -> bool:
            rows = runner.show(plan, "--state", "tcp_established")
            return keys <= {_key(r) for r in rows}

        assert eventually(all_confirmed, timeout=5.0), runner.show(plan)
        before = _table(plan)
        assert before["confirmed"]["entries"] == IDLE_CONNECTIONS, before

        targets = [
            (plan.vm(v).mac, plan.vm(v).addr.v4, port) for v in plan.vms for port in (7, 80, 9)
        ]
        frames = spoofed_connections(
            src_mac=fw3.transit_mac, targets=targets, count=FLOOD_CONNECTIONS
        )
        with RawSender(fw3.ns, P.FW_TRANSIT) as sender:
            sent = sender.send(frames)
        assert sent == 3 * FLOOD_CONNECTIONS

        def flood_counted() -> int:  # flood packets that learned or refreshed an entry
            up: dict[str, int] = runner.stats(plan)["interfaces"].get(plan.host.uplink, {})
            return sum(up.get(c, 0) for c in ("learned", "relearned", "refreshed"))

        if not eventually(lambda: flood_counted() >= sent, timeout=10.0):
            # a loaded machine may drop some of the burst in a veth backlog: what
            # matters is that the flood arrived (and overflowed the pending table)
            previous = [-1]

            def settled() -> bool:  # unchanged for half a second, and most of it seen
                now = flood_counted()
                stable, previous[0] = now == previous[0], now
                return stable and now >= 0.9 * sent

            assert eventually(settled, timeout=10.0, every=0.5), runner.stats(plan)
        # the states are what the last expiry pass found: wait for a pass after the flood
        # (`lasthop stats` starts fast enough now to read before any pass saw the connections)
        flooded = _table(plan)["expiry_passes"]
        assert eventually(lambda: _table(plan)["expiry_passes"] > flooded, timeout=10.0, every=0.5)
        after = _table(plan)
        assert after["pending"]["evicted"] > 0, after
        assert after["confirmed"]["entries"] == IDLE_CONNECTIONS, after
        assert after["confirmed"]["states"] == {"tcp_established": IDLE_CONNECTIONS}, after
        assert after["confirmed"]["expired"] == after["confirmed"]["removed"] == 0, after
        assert after["promoted"] == IDLE_CONNECTIONS, after
        rows = {_key(r): r for r in runner.show(plan, "--state", "tcp_established")}
        assert keys <= set(rows), sorted(keys - set(rows))
        assert {rows[k]["mac"] for k in keys} == {plan.firewall(2).transit_mac}

        fw1_before = bridged_lab.counters()["fw1"]
        for i, conn in enumerate(idle):
            conn.server.sendall(bytes([i]) * SPEAK_BYTES)
        deadline = time.monotonic() + 5.0
        got = {conn.key: _receive_all(conn, SPEAK_BYTES, deadline) for conn in idle}
        lost = {k: n for k, n in got.items() if n != SPEAK_BYTES}
        fw1_after = bridged_lab.counters()["fw1"]
        assert not lost, (
            f"bytes received of {SPEAK_BYTES}: {lost}; fw1 {fw1_before} -> {fw1_after}; "
            f"table {_table(plan)}"
        )

        # The check sees a lost entry: with the table flushed, a server's
        # first words take its default route, and fw1 drops them.
        runner.command(plan, "flush")
        drops = sum(fw1_after[c] for c in ("drop_invalid", "drop_outside"))
        idle[0].server.sendall(b"lost")

        def fw1_dropped() -> bool:
            now = bridged_lab.counters()["fw1"]
            return sum(now[c] for c in ("drop_invalid", "drop_outside")) > drops

        assert eventually(fw1_dropped, timeout=5.0), bridged_lab.counters()
        idle[0].client.setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[0].client.recv(64)


# -- 2. hijack ------------------------------------------------------------------

HIJACK_PORTS = range(20000, 20300)  # the client's source ports, below the ephemeral range


async def _get_from(ns_sockets: list[socket.socket], dst: str, timeout: float) -> list[str]:
    """An HTTP GET on each (bound, non-blocking) socket; the body, or the error."""
    loop = asyncio.get_running_loop()

    async def one(s: socket.socket) -> str:
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(s, (dst, P.HTTP_PORT))
                await loop.sock_sendall(s, f"GET / HTTP/1.0\r\nHost: {dst}\r\n\r\n".encode())
                reply = b""
                while chunk := await loop.sock_recv(s, 4096):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            return body.decode() if head.startswith(b"HTTP/1.0 200") else f"bad reply {head!r}"
        except (OSError, TimeoutError) as err:
            return f"error {type(err).__name__} {err}"
        finally:
            s.close()

    return list(await asyncio.gather(*(one(s) for s in ns_sockets)))


@pytest.mark.parametrize(
    ("addresses", "family"), [("learned", 4), ("learned", 6), ("configured", 4)]
)
def test_a_vm_cannot_take_another_vms_connections(
    bridged_lab: Lab, tmp_path: Path, addresses: str, family: int
) -> None:
    """vm2 sends SYNs from vm1's address (HTTP port) to 300 of cl2's source
    ports; cl2 then connects to vm1 from exactly those ports, and vm1 answers
    every one (vm_origin on). vm2's packets are counted as spoofed and nothing
    is remembered; a SYN from vm2's own address still is."""
    toml = ""
    if addresses == "configured":
        toml = _vm_addresses(bridged_lab.plan, {})
    _hijack(bridged_lab, tmp_path, toml, family, borrowed=False)


def test_a_client_syn_supersedes_what_a_vm_opened_with_a_shared_address(
    bridged_lab: Lab, tmp_path: Path
) -> None:
    """Even where vm2 may use vm1's address (configured so: full-proxy VMs
    sharing one), the entries its SYNs open only wait for the server's reply:
    the client's own SYNs to vm1 from those ports are new connections that
    supersede them, and vm1 answers every one."""
    plan = bridged_lab.plan
    toml = _vm_addresses(plan, {2: [plan.vm(1).addr.v4]})
    _hijack(bridged_lab, tmp_path, toml, 4, borrowed=True)


def _vm_addresses(plan: P.Plan, more: dict[int, list[str]]) -> str:
    """[[vm_port]] tables: each VM its own addresses, plus *more* by VM."""
    return "".join(
        f'[[vm_port]]\nname = "{plan.vm(v).port}"\naddresses = '
        + str([plan.vm(v).addr.v4, plan.vm(v).addr.v6, *more.get(v, [])]).replace("'", '"')
        + "\n"
        for v in plan.vms
    )


def _hijack(lab: Lab, tmp_path: Path, toml: str, family: int, *, borrowed: bool) -> None:
    """vm2 SYNs from vm1's address to HIJACK_PORTS of cl2 (and one from its
    own); then cl2 GETs vm1's HTTP page from each of those ports. *borrowed*:
    vm2 may use vm1's address (its SYNs are remembered, then superseded)."""
    plan = lab.plan
    vm1, vm2, cl2, fw1 = plan.vm(1), plan.vm(2), plan.client(2), plan.firewall(1)
    n = len(HIJACK_PORTS)
    with _agent(lab, tmp_path, toml):
        # Clients reach every VM first: in "learned" mode each VM's port learns its own address.
        warm = traffic.check(plan, n=1, clients=[2], protos=["tcp"])
        assert expect_all_ok(warm, "before the attack") == []
        spoofed = spoofed_syns(
            src_mac=vm2.mac,
            dst_mac=fw1.transit_mac,  # vm2's default gateway
            src=vm1.addr.of(family),
            sport=P.HTTP_PORT,
            dst=cl2.addr.of(family),
            dports=HIJACK_PORTS,
        )
        own_port = HIJACK_PORTS.stop + 1
        own = spoofed_syns(
            src_mac=vm2.mac,
            dst_mac=fw1.transit_mac,
            src=vm2.addr.of(family),
            sport=P.HTTP_PORT,
            dst=cl2.addr.of(family),
            dports=[own_port],
        )
        with RawSender(vm2.ns, P.ETH) as sender:
            sender.send(spoofed + own)

        def counted(port: str = vm2.port) -> dict[str, int]:
            c: dict[str, int] = runner.stats(plan)["interfaces"].get(port, {})
            return c

        learned, spoofed_count = (n + 1, 0) if borrowed else (1, n)
        assert eventually(
            lambda: (
                counted().get("vm_origin_learned", 0) + counted().get("vm_origin_spoofed", 0)
                >= n + 1
            ),
            timeout=5.0,
        ), counted()
        assert counted().get("vm_origin_spoofed", 0) == spoofed_count, counted()
        assert counted().get("vm_origin_learned", 0) == learned, counted()
        # An entry a VM opened is keyed as the server's replies will come: client -> VM.
        opened = sorted(
            (r["src"], r["sport"], r["dst"], r["dport"], r["vm_port"])
            for r in runner.show(plan, "--client", cl2.addr.of(family))
            if "vm_origin" in r["flags"]
        )
        client = cl2.addr.of(family)
        expected = [(client, own_port, vm2.addr.of(family), P.HTTP_PORT, vm2.port)]
        if borrowed:
            expected += [
                (client, p, vm1.addr.of(family), P.HTTP_PORT, vm2.port) for p in HIJACK_PORTS
            ]
        assert opened == sorted(expected), opened[:5]

        with NetnsExecutor(cl2.ns) as ex:
            socks = ex.sockets([(_AF[family], socket.SOCK_STREAM)] * n)
        for s, port in zip(socks, HIJACK_PORTS, strict=True):
            s.bind((client, port))
        bodies = asyncio.run(_get_from(socks, vm1.addr.of(family), timeout=5.0))
        wrong = {p: b for p, b in zip(HIJACK_PORTS, bodies, strict=True) if b != vm1.name}
        assert not wrong, (
            f"{len(wrong)} of {n} did not reach vm1: {dict(list(wrong.items())[:5])}; "
            f"vm2 {counted()}; uplink {counted(plan.host.uplink)}"
        )
        assert counted().get("vm_origin_spoofed", 0) == spoofed_count, counted()
        superseded = counted(plan.host.uplink).get("vm_origin_superseded", 0)
        assert superseded == (n if borrowed else 0), counted(plan.host.uplink)


# -- 3. continuous learning while expiry runs ----------------------------------------

TIMEOUTS = {  # seconds, every state short: the expiry passes have work to do
    "tcp_syn": 3,
    "tcp_established": 5,
    "tcp_midstream": 3,
    "tcp_closing": 3,
    "tcp_closed": 2,
    "udp_new": 3,
    "udp_answered": 3,
    "udp_stream": 5,
    "icmp": 3,
}
EVERY = 0.5  # each live flow sends this often: 10x its timeout
RUN_FOR = 11.0  # seconds of traffic: three expiry passes or more
ADD_UNTIL = 8.0  # new flows join until then (each needs two exchanges to be confirmed)
STOP_AT = 1.6  # the "stopped" flows go quiet after this
GRACE = 5.0  # the target: expired within timeout + 5 s


@dataclass
class _Flow:
    sock: socket.socket
    key: tuple[str, int, str, int]
    proto: str  # "udp" | "tcp"
    next_send: float
    stop_at: float | None = None  # None: live until the end
    sent: int = 0  # datagrams (udp) or bytes (tcp)
    received: int = 0
    last_sent: float = 0.0
    gone_at: float | None = None  # when `show` first lacked it


@dataclass
class _Traffic:
    """Flows from cl2 and cl3 to vm1..vm3's echo servers, driven by one thread:
    new flows keep joining; each sends every EVERY seconds."""

    plan: P.Plan
    flows: list[_Flow] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    start: float = 0.0
    error: BaseException | None = None

    def _open(self, ex: NetnsExecutor, client: P.Client, n: int, proto: str, now: float,
              stop_at: float | None) -> None:  # fmt: skip
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        fams = [4 if (len(self.flows) + i) % 2 == 0 else 6 for i in range(n)]
        socks = ex.sockets([(_AF[f], kind) for f in fams])
        for i, (s, fam) in enumerate(zip(socks, fams, strict=True)):
            vm = self.plan.vm(self.plan.vms[(len(self.flows) + i) % len(self.plan.vms)])
            dst = vm.addr.of(fam)
            if proto == "tcp":
                s.setblocking(True)
                s.settimeout(3.0)
            s.connect((dst, P.ECHO_PORT))
            s.setblocking(False)
            key = (client.addr.of(fam), s.getsockname()[1], dst, P.ECHO_PORT)
            flow = _Flow(s, key, proto, now + (i % 10) * EVERY / 10, stop_at)
            with self.lock:
                self.flows.append(flow)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # handed to the test
            self.error = err

    def _run(self) -> None:
        clients = [self.plan.client(2), self.plan.client(3)]
        with NetnsExecutor(clients[0].ns) as ex2, NetnsExecutor(clients[1].ns) as ex3:
            exs = [ex2, ex3]
            self.start = t0 = time.monotonic()
            for ex, cl in zip(exs, clients, strict=True):
                self._open(ex, cl, 30, "udp", t0, t0 + STOP_AT)  # go quiet early
                self._open(ex, cl, 2, "tcp", t0, t0 + STOP_AT)
                self._open(ex, cl, 30, "udp", t0, None)
                self._open(ex, cl, 4, "tcp", t0, None)
            next_add = t0 + 1.0
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_add and now - t0 < ADD_UNTIL:
                    for ex, cl in zip(exs, clients, strict=True):
                        self._open(ex, cl, 15, "udp", now, None)
                    next_add += 1.0
                for f in self.flows:
                    if f.next_send <= now and (f.stop_at is None or now < f.stop_at):
                        self._send(f, now)
                        f.next_send += EVERY
                self._drain(0.02)

    def _send(self, f: _Flow, now: float) -> None:
        payload = f"{f.key} #{f.sent}\n".encode()
        f.sock.send(payload)
        f.sent += 1 if f.proto == "udp" else len(payload)
        f.last_sent = now

    def _drain(self, wait: float) -> None:
        by_fd = {f.sock.fileno(): f for f in self.flows}
        ready, _, _ = select.select(list(by_fd), [], [], wait)
        for fd in ready:
            f = by_fd[fd]
            with contextlib.suppress(BlockingIOError):
                while data := f.sock.recv(65536):
                    f.received += 1 if f.proto == "udp" else len(data)

    def finish(self) -> None:
        """Collects the echoes still on their way, for at most two seconds."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(f.received < f.sent for f in self.flows):
            self._drain(0.05)

    def close(self) -> None:
        for f in self.flows:
            f.sock.close()


def test_connections_learned_while_expiry_runs_all_stay_and_idle_ones_go(
    bridged_lab: Lab, tmp_path: Path
) -> None:
    """For ~11 s, flows keep joining (UDP and TCP, cl2 and cl3 to every VM) and
    each live one sends every 0.5 s, while the agent runs the kernel's expiry
    pass every 3 s with timeouts of 2-5 s: no live entry is ever removed (its
    packet count in the table equals what its client sent), and the flows that
    went quiet are gone within their timeout + 5 s."""
    plan = bridged_lab.plan
    timeouts = "".join(f"{k} = {v}\n" for k, v in TIMEOUTS.items())
    with _agent(bridged_lab, tmp_path, f"[timeouts]\n{timeouts}"):
        base = runner.stats(plan)
        gen = _Traffic(plan)
        thread = threading.Thread(target=gen.run, daemon=True)
        thread.start()
        try:
            assert eventually(lambda: gen.start > 0, timeout=5.0)
            # Watch the quiet flows go, while the live ones keep running.
            while True:
                asked = time.monotonic()
                present = {_key(r) for r in runner.show(plan)}
                with gen.lock:
                    quiet = [f for f in gen.flows if f.stop_at is not None]
                for f in quiet:
                    if f.gone_at is None and f.last_sent and f.key not in present:
                        f.gone_at = asked
                waiting = [f for f in quiet if f.gone_at is None]
                elapsed = asked - gen.start
                if not waiting and elapsed >= RUN_FOR:
                    break
                timeout = max(TIMEOUTS["udp_stream"], TIMEOUTS["tcp_established"])
                assert elapsed < STOP_AT + timeout + GRACE + 3.0 or not waiting, (
                    f"{len(waiting)} quiet flows never expired: {[f.key for f in waiting][:5]}"
                )
                assert gen.error is None and thread.is_alive(), gen.error
                time.sleep(0.3)
        finally:
            gen.stop.set()
            thread.join(5.0)
        try:
            assert gen.error is None, gen.error
            gen.finish()
            rows = {_key(r): r for r in runner.show(plan)}
            after = runner.stats(plan)
        finally:
            gen.close()

    quiet = [f for f in gen.flows if f.stop_at is not None]
    live = [f for f in gen.flows if f.stop_at is None]
    late: dict[tuple[str, int, str, int], float | None] = {}
    for f in quiet:
        limit = TIMEOUTS["udp_stream" if f.proto == "udp" else "tcp_established"] + GRACE
        if f.gone_at is None or f.gone_at - f.last_sent > limit:
            late[f.key] = None if f.gone_at is None else round(f.gone_at - f.last_sent, 2)
    assert not late, f"quiet flows expired later than timeout + {GRACE} s: {late}"

    missing = [f.key for f in live if f.key not in rows]
    assert not missing, f"{len(missing)} of {len(live)} live entries removed: {missing[:5]}"
    unanswered = {f.key: (f.sent, f.received) for f in live if f.received != f.sent}
    assert not unanswered, f"echoes lost (sent, received): {dict(list(unanswered.items())[:5])}"
    states = {"udp": "udp_stream", "tcp": "tcp_established"}
    wrong_state = {
        f.key: rows[f.key]["state"] for f in live if rows[f.key]["state"] != states[f.proto]
    }
    assert not wrong_state, wrong_state
    # A UDP entry removed and learned again would have lost the packets counted before.
    counts = {f.key: (rows[f.key]["packets"], f.sent) for f in live if f.proto == "udp"}
    recounted = {k: v for k, v in counts.items() if v[0] != v[1]}
    assert not recounted, f"(table packets, sent): {dict(list(recounted.items())[:5])}"

    t0, t1 = base["table"], after["table"]
    assert t1["expiry_passes"] - t0["expiry_passes"] >= 3, (t0, t1)
    assert t1["confirmed"]["inserted"] - t0["confirmed"]["inserted"] == len(gen.flows), (t0, t1)
    assert t1["confirmed"]["expired"] - t0["confirmed"]["expired"] == len(quiet), (t0, t1)
    assert t1["confirmed"]["removed"] == t0["confirmed"]["removed"], (t0, t1)
    assert after["totals"]["agent_removed"] == base["totals"]["agent_removed"]

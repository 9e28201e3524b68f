"""The traffic check: from every client to every VM, N connections per
(client, VM, protocol, family) — TCP echo, HTTP GET, UDP echo — each with a
short timeout, all at once. Sockets are opened inside each client's
namespace by a thread that entered it; one asyncio loop in this process then
drives them all, so a whole check takes about one timeout.

Also a long-lived TCP echo session (EchoSession) for tests that change
something in the middle of a connection.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lasthop.lab import plan as P
from lasthop.lab.namespaces import NetnsExecutor, open_socket

__all__ = [
    "PROTOS",
    "FAMILIES",
    "PathResult",
    "CheckResult",
    "Attempt",
    "check",
    "connect",
    "EchoSession",
]

PROTOS = ("tcp", "http", "udp")
FAMILIES = (4, 6)
DEFAULT_TIMEOUT = 1.0
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_KIND = {"tcp": socket.SOCK_STREAM, "http": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
_PORT = {"tcp": P.ECHO_PORT, "http": P.HTTP_PORT, "udp": P.ECHO_PORT}


@dataclass(frozen=True)
class PathResult:
    """N connections of one protocol and family from a client (through its
    firewall) to a VM."""

    client: str
    firewall: str
    vm: str
    proto: str
    family: int
    tried: int
    succeeded: int
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count, e.g. {"timeout": 5}

    @property
    def ok(self) -> bool:
        return self.succeeded == self.tried

    @property
    def dead(self) -> bool:
        return self.succeeded == 0


@dataclass(frozen=True)
class CheckResult:
    paths: list[PathResult]
    elapsed_s: float

    @property
    def tried(self) -> int:
        return sum(p.tried for p in self.paths)

    @property
    def succeeded(self) -> int:
        return sum(p.succeeded for p in self.paths)

    @property
    def all_ok(self) -> bool:
        return all(p.ok for p in self.paths)

    def select(
        self,
        *,
        client: str | None = None,
        proto: str | None = None,
        family: int | None = None,
        vm: str | None = None,
    ) -> list[PathResult]:
        return [
            p
            for p in self.paths
            if (client is None or p.client == client)
            and (proto is None or p.proto == proto)
            and (family is None or p.family == family)
            and (vm is None or p.vm == vm)
        ]

    def grouped(self) -> dict[tuple[str, str, str, int], tuple[int, int]]:
        """(client, firewall, proto, family) -> (tried, succeeded), summed over VMs."""
        out: dict[tuple[str, str, str, int], tuple[int, int]] = {}
        for p in self.paths:
            key = (p.client, p.firewall, p.proto, p.family)
            tried, ok = out.get(key, (0, 0))
            out[key] = (tried + p.tried, ok + p.succeeded)
        return out


@dataclass(frozen=True)
class Attempt:
    """One connection from a client (through its firewall) to an address: the
    client's port, and what happened (error None: it worked; body: what an
    HTTP server answered)."""

    client: str
    firewall: str
    src: str  # the client's address
    dst: str
    dport: int
    proto: str
    family: int
    sport: int
    error: str | None
    body: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class _Job:
    client: P.Client
    firewall: str  # the client's firewall
    dst: str
    proto: str
    family: int
    index: int
    vm: P.Vm | None = None  # the VM whose name the HTTP body must be; None: any body


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, ConnectionResetError):
        return "reset"
    if isinstance(err, OSError) and err.errno:
        return errno.errorcode.get(err.errno, str(err.errno)).lower()
    return type(err).__name__


async def _attempt(job: _Job, sock: socket.socket, timeout: float) -> Attempt:
    """One connection; its Attempt says whether it worked, and if not why not."""
    loop = asyncio.get_running_loop()
    sport, body, error = 0, None, None
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (job.dst, _PORT[job.proto]))
            sport = sock.getsockname()[1]
            if job.proto == "http":
                await loop.sock_sendall(sock, f"GET / HTTP/1.0\r\nHost: {job.dst}\r\n\r\n".encode())
                reply = b""
                while chunk := await loop.sock_recv(sock, 4096):
                    reply += chunk
                head, _, raw = reply.partition(b"\r\n\r\n")
                body = raw.decode(errors="replace")
                if not head.startswith(b"HTTP/1.0 200") or (job.vm and body != job.vm.name):
                    error = "bad reply"
            else:
                error = await _echo(loop, sock, job)
    except (OSError, TimeoutError) as err:
        error = _reason(err)
    finally:
        sock.close()
    return Attempt(
        job.client.name,
        job.firewall,
        job.client.addr.of(job.family),
        job.dst,
        _PORT[job.proto],
        job.proto,
        job.family,
        sport,
        error,
        body,
    )


async def _echo(loop: asyncio.AbstractEventLoop, sock: socket.socket, job: _Job) -> str | None:
    what = f"{job.client.name}>{job.dst} {job.proto}{job.family} #{job.index}"
    payload = f"lasthop {what}\n".encode()
    await loop.sock_sendall(sock, payload)
    got = b""
    while len(got) < len(payload):
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            return "closed"
        got += chunk
        if job.proto == "udp":
            break
    return None if got == payload else "bad reply"


async def _run(jobs: list[_Job], timeout: float) -> list[Attempt]:
    by_ns: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_ns.setdefault(job.client.ns, []).append(i)
    socks: list[socket.socket | None] = [None] * len(jobs)
    for ns, idx in by_ns.items():
        with NetnsExecutor(ns) as ex:
            made = ex.sockets([(_AF[jobs[i].family], _KIND[jobs[i].proto]) for i in idx])
        for i, s in zip(idx, made, strict=True):
            socks[i] = s
    return await asyncio.gather(
        *(_attempt(job, s, timeout) for job, s in zip(jobs, socks, strict=True) if s)
    )


def connect(
    plan: P.Plan,
    address: P.Addr,
    *,
    n: int = 3,
    timeout: float = DEFAULT_TIMEOUT,
    clients: Iterable[int] | None = None,
    protos: Sequence[str] = ("http",),
    families: Sequence[int] = FAMILIES,
) -> list[Attempt]:
    """*n* connections per (client, protocol, family) to *address* (e.g. a
    service's virtual address), all at once; one Attempt each, in order."""
    jobs = [
        _Job(plan.client(c), plan.firewall(c).name, address.of(fam), proto, fam, i)
        for c in (plan.sites if clients is None else clients)
        for proto in protos
        for fam in families
        for i in range(n)
    ]
    return asyncio.run(_run(jobs, timeout))


def check(
    plan: P.Plan,
    *,
    n: int = 3,
    timeout: float = DEFAULT_TIMEOUT,
    clients: Iterable[int] | None = None,
    vms: Iterable[int] | None = None,
    protos: Sequence[str] = PROTOS,
    families: Sequence[int] = FAMILIES,
) -> CheckResult:
    """Runs the check on the lab of *plan*; returns one PathResult per
    (client, VM, protocol, family)."""
    start = time.monotonic()
    jobs = [
        _Job(
            plan.client(c),
            plan.firewall(c).name,
            plan.vm(v).addr.of(fam),
            proto,
            fam,
            i,
            plan.vm(v),
        )
        for c in (plan.sites if clients is None else clients)
        for v in (plan.vms if vms is None else vms)
        for proto in protos
        for fam in families
        for i in range(n)
    ]
    outcomes = asyncio.run(_run(jobs, timeout))
    tally: dict[tuple[int, int, str, int], Counter[str | None]] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert job.vm is not None
        key = (job.client.n, job.vm.n, job.proto, job.family)
        tally.setdefault(key, Counter())[outcome.error] += 1
    paths = [
        PathResult(
            client=plan.client(c).name,
            firewall=plan.firewall(c).name,
            vm=plan.vm(v).name,
            proto=proto,
            family=fam,
            tried=sum(counts.values()),
            succeeded=counts[None],
            errors={k: v for k, v in counts.items() if k is not None},
        )
        for (c, v, proto, fam), counts in tally.items()
    ]
    return CheckResult(paths, time.monotonic() - start)


class EchoSession:
    """One long-lived TCP connection from a client to a VM's echo server (or
    to *address*, e.g. a service's virtual address, instead of the VM's own)."""

    def __init__(
        self,
        plan: P.Plan,
        client: int,
        vm: int | None = None,
        family: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        address: P.Addr | None = None,
    ) -> None:
        if vm is not None:
            if address is not None:
                raise ValueError("EchoSession: a VM or an address, not both")
            address = plan.vm(vm).addr
        elif address is None:
            raise ValueError("EchoSession: a VM or an address")
        self.client = plan.client(client)
        self.dst = address.of(family)
        self.sock = open_socket(self.client.ns, _AF[family], socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((self.dst, P.ECHO_PORT))
        self.local_port: int = self.sock.getsockname()[1]
        self._count = 0
        self._pending = b""

    def exchange(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Sends a numbered line and waits for its echo; False when it does not
        come within timeout (a late echo of an earlier line is skipped)."""
        self._count += 1
        payload = f"still here #{self._count}\n".encode()
        deadline = time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(payload)
            while payload not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                chunk = self.sock.recv(4096)
                if not chunk:
                    return False
                self._pending += chunk
        except OSError:
            return False
        self._pending = self._pending.split(payload, 1)[1]
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EchoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

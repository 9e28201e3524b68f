"""Helpers for the agent's tests on a real kernel: private network namespaces
with veth pairs and bridges, `lasthop run` as a subprocess (through the lab's
runner, lasthop.lab.runner), table entries written
straight into the pinned maps, and the cleanup of all of it even on failure.

Used by test_agent, test_api, test_cli and test_controller. Everything a test
creates is registered on a :class:`Sandbox`, whose close() removes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lasthop import abi, libbpf, netns
from lasthop.clock import Clock
from lasthop.datapath import FamilyMap, Pins, filter_prog_id, request_expiry
from lasthop.lab.namespaces import made_in
from lasthop.lab.runner import AgentProcess, lasthop_argv

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "lasthop"
SOCKET_DIR = Path("/run/lasthop")
START_TIMEOUT = 20.0
_names = itertools.count()

# every test here loads BPF programs into namespaces it creates
ROOT_MARKS = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]


def need_root() -> None:
    """Skips the test, naming what is missing, unless it can create namespaces and load BPF."""
    if os.geteuid() != 0:
        pytest.skip(
            "needs root: CAP_SYS_ADMIN (ip netns add), CAP_NET_ADMIN (tc), CAP_BPF (load programs)"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool!r} command (iproute2)")
    if not BPFFS.is_dir() or not os.path.ismount(BPFFS):
        pytest.skip(f"needs a bpffs mounted at {BPFFS}")


def sh(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def lasthop(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`lasthop ARGS` as a subprocess (any exit code)."""
    return sh(*lasthop_argv(*args), check=False, timeout=timeout)


def tc_program(ns: str, dev: str, point: int = libbpf.INGRESS) -> str | None:
    """The name of our program on *dev*'s tc hook *point* in namespace *ns* (a tcx
    link's or a clsact filter's; neither `tc filter show` nor this bpftool lists
    tcx links), None without one or without *dev*. Asked from a thread that
    enters *ns*: this one stays where it is."""

    def ask() -> str | None:
        try:
            index = socket.if_nametoindex(dev)
        except OSError:
            return None
        prog_id = filter_prog_id(index, point)
        return libbpf.prog_name(prog_id) if prog_id is not None else None

    return made_in(ns, ask)


class Netns:
    """A named network namespace with helpers to build links in it."""

    def __init__(self, tag: str) -> None:
        self.name = f"lht{os.getpid()}-{tag}{next(_names)}"
        sh("ip", "netns", "add", self.name)
        try:
            # no IPv6 autoconfiguration chatter (MLD, router solicitations) moving the counters
            self.exec(
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            )
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    @property
    def pins(self) -> Path:
        return PIN_ROOT / self.name

    @property
    def socket(self) -> Path:
        return SOCKET_DIR / f"{self.name}.sock"

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args).stdout

    def exec(
        self, *argv: str, check: bool = True, timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *argv, check=check, timeout=timeout)

    def veth(self, name: str, peer: str, peer_ns: Netns | None = None, *, up: bool = True) -> None:
        """A veth pair name <-> peer; the peer may live in another namespace."""
        self.ip(
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            *(("netns", peer_ns.name) if peer_ns else ()),
        )
        if up:
            self.ip("link", "set", name, "up")
            (peer_ns or self).ip("link", "set", peer, "up")

    def bridge(self, name: str, *ports: str) -> None:
        self.ip("link", "add", name, "type", "bridge")
        self.ip("link", "set", name, "up")
        for port in ports:
            self.ip("link", "set", port, "master", name)

    def ifindex(self, name: str) -> int:
        found = re.match(r"(\d+):", self.ip("-o", "link", "show", "dev", name))
        assert found, name
        return int(found.group(1))

    def mac(self, name: str) -> str:
        found = re.search(r"link/ether ([0-9a-f:]{17})", self.ip("link", "show", "dev", name))
        assert found, name
        return found.group(1)

    def tc_program(self, dev: str) -> str | None:
        """The name of our program on dev's tc ingress (tcx link or clsact filter), or None."""
        return tc_program(self.name, dev)

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)
        Pins(self.pins).remove()  # and the pin root, once no namespace's pins are left
        self.socket.unlink(missing_ok=True)
        shutil.rmtree(SOCKET_DIR / self.name, ignore_errors=True)  # the services' state file


class Sandbox:
    """Everything one test creates; close() removes it all (agents first)."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []
        self.agents: list[AgentProcess] = []
        self.logs = Path(tempfile.mkdtemp(prefix="lasthop-test-"))

    def netns(self, tag: str = "") -> Netns:
        ns = Netns(tag)
        self.namespaces.append(ns)
        return ns

    def host(self, *, uplinks: int = 1, vm_ports: int = 1) -> Netns:
        """A namespace with veth pairs up0.. (uplinks) and vm0.. (VM ports), peers alongside."""
        ns = self.netns("h")
        for i in range(uplinks):
            ns.veth(f"up{i}", f"up{i}p")
        for i in range(vm_ports):
            ns.veth(f"vm{i}", f"vm{i}p")
        return ns

    def agent(
        self,
        *args: str,
        netns: Netns | None = None,
        wait: bool = True,
        via_exec: bool = False,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        """`lasthop run --netns NS ARGS` (or `ip netns exec NS lasthop run ARGS`),
        through the lab's runner; with wait, once it has attached."""
        if netns is None:
            argv = lasthop_argv("run", *args)
        elif via_exec:
            argv = ["ip", "netns", "exec", netns.name, *lasthop_argv("run", *args)]
        else:
            argv = lasthop_argv("run", "--netns", netns.name, *args)
        agent = AgentProcess(argv, self.logs / f"agent{len(self.agents)}.log", env=env)
        self.agents.append(agent)
        agent.spawn()
        if wait:
            agent.wait_ready(START_TIMEOUT)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop(timeout=5.0)
            agent.kill()
        for ns in self.namespaces:
            ns.delete()
        shutil.rmtree(self.logs, ignore_errors=True)


@contextlib.contextmanager
def sandbox() -> Iterator[Sandbox]:
    need_root()
    box = Sandbox()
    try:
        yield box
    finally:
        box.close()


# -- in-process: the controller enters namespaces; tests must come back --------------------


@contextlib.contextmanager
def back_to_own_netns() -> Iterator[None]:
    """Returns this thread to its network namespace afterwards (Controller enters one)."""
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        yield
    finally:
        try:
            netns.setns(fd, "the test's own network namespace")
        finally:
            os.close(fd)


# -- the table, straight through the pins ---------------------------------------------------


def conn_key(
    src: str, dst: str, sport: int, dport: int, proto: int = 17, zone: int = 0
) -> abi.ConnKey:
    """A connection key as the data path builds it (addresses and ports in network order)."""
    key = abi.ConnKey()
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    raw_a, raw_b = a.packed.ljust(16, b"\0"), b.packed.ljust(16, b"\0")
    ctypes.memmove(key.saddr, raw_a, 16)
    ctypes.memmove(key.daddr, raw_b, 16)
    key.sport, key.dport = socket.htons(sport), socket.htons(dport)
    key.proto = proto
    key.family = abi.FAMILY_V4 if a.version == 4 else abi.FAMILY_V6
    key.zone = zone
    return key


class PinnedTable:
    """The pinned tables of a namespace (confirmed: lh_conns4 and lh_conns,
    pending: lh_pending4 and lh_pending), opened from the test process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

        def pinned(name: str) -> libbpf.Map:
            return libbpf.Map.pinned(folder / name)

        self.conns = FamilyMap.of(pinned, abi.ChangeTable.CONFIRMED)
        self.pending = FamilyMap.of(pinned, abi.ChangeTable.PENDING)
        self.clock = Clock.pinned(folder / "lh_clock")
        settings = libbpf.Map.pinned(folder / "lh_settings")
        try:
            raw = settings.lookup(bytes(4))
            self.hz = abi.Settings.from_buffer_copy(raw).hz if raw else 0
        finally:
            settings.close()

    @property
    def map_id(self) -> int:
        return self.conns.map4.info.id

    def add(
        self,
        key: abi.ConnKey,
        *,
        mac: str = "02:00:00:00:00:01",
        uplink: int = 1,
        idle_s: float = 0.0,
        state: abi.State = abi.State.TCP_ESTABLISHED,
        pending: bool = False,
    ) -> None:
        """An entry learned on ifindex *uplink*, last seen *idle_s* seconds ago,
        confirmed (lh_conns) or *pending* (lh_pending)."""
        assert self.hz, "lh_settings.hz is 0: the agent has not measured HZ yet"
        entry = abi.ConnEntry()
        entry.last_seen = (self.clock.jiffies() - int(idle_s * self.hz)) & 0xFFFFFFFF
        entry.ifindex = uplink
        entry.mac[:] = list(bytes.fromhex(mac.replace(":", "")))
        entry.flags = abi.F_ENTRY_HOP_KNOWN
        entry.packets = 1
        entry.state = state
        (self.pending if pending else self.conns).update(bytes(key), bytes(entry))
        request = libbpf.Map.pinned(self.folder / "lh_expiry_request")
        try:
            request_expiry(request)  # as every writer from user space must
        finally:
            request.close()

    def keys(self) -> list[bytes]:
        return list(self.conns.keys()) + list(self.pending.keys())

    def remove(self, key: abi.ConnKey) -> None:
        """Takes *key*'s entry out of both tables, unseen by any counter: a test
        on a shared agent undoing what it added."""
        self.conns.delete(bytes(key))
        self.pending.delete(bytes(key))

    @contextlib.contextmanager
    def kept_fresh(
        self, key: abi.ConnKey, *, uplink: int = 1, every: float = 0.1
    ) -> Iterator[None]:
        """Keeps *key*'s entry seen as traffic would (rewritten every *every*
        seconds) while the block runs: no aging pass finds it idle, however
        slow the machine is, so a test need not race the idle timeout."""
        stop = threading.Event()

        def refresh() -> None:
            while not stop.is_set():
                self.add(key, uplink=uplink)
                stop.wait(every)

        self.add(key, uplink=uplink)
        worker = threading.Thread(target=refresh, daemon=True)
        worker.start()
        try:
            yield
        finally:
            stop.set()
            worker.join()

    def close(self) -> None:
        self.conns.close()
        self.pending.close()
        self.clock.close()


def wait_for(check: Any, timeout: float = 15.0, every: float = 0.05) -> Any:
    """Polls *check* until it returns something truthy; returns that, or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {getattr(check, '__name__', check)}"
            )
        time.sleep(every)


# -- real traffic ------------------------------------------------------------------------------

ECHO_SERVER = r"""
import select, socket, sys
port = int(sys.argv[1])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen()
print("ready", flush=True)
conns = []
while True:
    for s in select.select([udp, tcp, *conns], [], [])[0]:
        if s is udp:
            data, peer = udp.recvfrom(2048)
            udp.sendto(data, peer)
        elif s is tcp:
            conns.append(tcp.accept()[0])
        else:
            data = s.recv(2048)
            if data:
                s.sendall(data)
            else:
                conns.remove(s)
                s.close()
"""

ECHO_CLIENT = r"""
import socket, sys
proto, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    for i in range(n):
        s.sendto(b"ping %d" % i, (host, port))
        assert s.recvfrom(2048)[0] == b"ping %d" % i
else:
    s = socket.create_connection((host, port), timeout=3)
    for i in range(n):
        s.sendall(b"ping %d" % i)
        assert s.recv(2048) == b"ping %d" % i
print(s.getsockname()[1])
s.close()
"""


class BridgedSite:
    """A firewall namespace and a VM namespace on one bridge of a host namespace:

    fw (eth0 10.0.0.1) ── fw0 ┐
                               br0  (host)
    vm (eth0 10.0.0.2) ── vm0 ┘
    """

    FW_IP, VM_IP, PORT = "10.0.0.1", "10.0.0.2", 7007

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.host, self.fw, self.vm = box.netns("h"), box.netns("f"), box.netns("v")
        self.host.veth("fw0", "eth0", self.fw)
        self.host.veth("vm0", "eth0", self.vm)
        self.host.bridge("br0", "fw0", "vm0")
        self.fw.ip("addr", "add", f"{self.FW_IP}/24", "dev", "eth0")
        self.vm.ip("addr", "add", f"{self.VM_IP}/24", "dev", "eth0")
        self.fw_mac = self.fw.mac("eth0")
        self._server: subprocess.Popen[str] | None = None

    def serve(self, ns: Netns | None = None) -> None:
        """Starts the UDP+TCP echo server in the VM (or in *ns*)."""
        self._server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                (ns or self.vm).name,
                sys.executable,
                "-c",
                ECHO_SERVER,
                str(self.PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._server.stdout is not None and self._server.stdout.readline().strip() == "ready"

    def serve_on_firewall(self) -> None:
        self.serve(self.fw)

    def exchange(self, proto: str, n: int = 3) -> int:
        """n request/reply round trips from the firewall to the VM; returns the client's port."""
        result = self.fw.exec(
            sys.executable, "-c", ECHO_CLIENT, proto, self.VM_IP, str(self.PORT), str(n)
        )
        return int(result.stdout)

    def exchange_from_vm(self, proto: str, n: int = 3) -> int:
        """n round trips from the VM to the firewall (a connection the VM opens)."""
        result = self.vm.exec(
            sys.executable, "-c", ECHO_CLIENT, proto, self.FW_IP, str(self.PORT), str(n)
        )
        return int(result.stdout)

    def answer_late(self, port: int) -> None:
        """The VM answers the firewall's UDP connection from *port* once more,
        from the server's port (the echo server closed: this answer is ours)."""
        self.vm.exec(
            sys.executable, "-c", LATE_ANSWER, self.VM_IP, str(self.PORT), self.FW_IP, str(port)
        )

    def keep_firewall_mac(self) -> None:
        """The VM keeps the firewall's MAC whatever ARP says (none may get through)."""
        self.vm.ip(
            "neigh", "replace", self.FW_IP, "lladdr", self.fw_mac, "dev", "eth0", "nud", "permanent"
        )

    def vm_counters(self) -> dict[str, int]:
        """The host's counters of VM port vm0 (`lasthop stats --json`)."""
        result = lasthop("stats", "--netns", self.host.name, "--json")
        assert result.returncode == 0, result.stderr
        counters: dict[str, int] = json.loads(result.stdout)["interfaces"].get("vm0", {})
        return counters

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait()


LATE_ANSWER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "s.sendto(b'late answer', (sys.argv[3], int(sys.argv[4])))\n"
)


# -- systemd, as the unit runs the agent ------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET: the
    messages the agent sends (READY=1, STATUS=..., WATCHDOG=1, ...), in order."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.seen: list[dict[str, str]] = []

    def _read(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            raw = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in raw.splitlines())
        self.seen.append(message)
        return message

    def wait_for(self, key: str, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """The next message that carries *key* (those before it are kept in seen)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self._read(left)
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key}= message within {timeout} s; saw {self.seen}")

    def close(self) -> None:
        self.sock.close()


def unit_command(key: str, config: Path) -> list[str]:
    """The unit's ExecStart or ExecReload (lasthop.systemd.unit_text) for
    *config*, with this interpreter's `python -m lasthop` as the executable."""
    from lasthop.systemd import unit_text

    exe = f"{sys.executable} -m lasthop"
    for line in unit_text(config, exe).splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].split()
    raise AssertionError(f"no {key} in the unit")

"""Runs fuzz cases through lh_uplink and lh_vmport with BPF_PROG_TEST_RUN
and compares each with the oracle: verdict, redirect target (lh_trace, in
the test build), output bytes, counters (every one of the interfaces' and
slot 0's, and the table-wide ones) and the whole connection table.

One object is loaded once, unpinned, in a private network namespace of its
own (test run resolves ctx.ifindex in the caller's namespace) with one veth
pair: one end the uplink, the other the VM port. Between frames only what a
frame changed is undone: the entries it left are deleted; counters are
compared as deltas, so they are never reset.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from lasthop import abi, build, datapath, libbpf

from . import frames, oracle

UPLINK = "lh_uplink"
VMPORT = "lh_vmport"
PROGRAMS = (UPLINK, VMPORT)
ZONE = 7  # both interfaces' zone: the key carries it
SLOT_UP, SLOT_VM = 1, 2
PROGRESS_EVERY = 50_000
TABLE_SIZE = 64  # each table: a frame leaves at most one entry
SEEN_SETUP = 1_000_000_007  # the VM port's entry's last_seen: "not touched"
LAST_HOP = bytes.fromhex("02fa0000000b")  # firewall B, the entry's last hop
_SKB_CTX_SIZE, _SKB_IFINDEX_OFF, _SKB_GSO_SIZE_OFF = 192, 40, 176
BROKEN_DEFINE = "LH_BROKEN_DATAGRAM_CHECK"  # parse.h: in_datagram() always true
Sums = npt.NDArray[np.int64]  # counters summed over the CPUs, by index


@dataclass
class Discrepancy:
    program: str
    seed: int
    case: int
    sample: frames.Sample
    diffs: list[str]

    def report(self) -> str:
        """The case, its frame as hex and as a scapy expression, and how to run it again."""
        from scapy.layers.l2 import Ether

        try:
            dissected = Ether(self.sample.data).command()
        except Exception as err:  # noqa: BLE001 -- scapy may not re-express any bytes
            dissected = f"(scapy cannot express it: {err})"
        lines = [
            f"DISCREPANCY {self.program} seed={self.seed} case={self.case} "
            f"class={self.sample.cls} mutation={self.sample.mutation} "
            f"gso_size={self.sample.gso_size}",
            *(f"  {d}" for d in self.diffs),
            f"  frame ({len(self.sample.data)} bytes): {self.sample.data.hex()}",
            f'  scapy: Ether(bytes.fromhex("{self.sample.data.hex()}"))',
            f"  dissected: {dissected}",
            f"  again: PYTHONPATH=tests .venv/bin/python -m fuzz --program {self.program} "
            f"--seed {self.seed} --case {self.case}",
        ]
        return "\n".join(lines)


@dataclass
class Result:
    program: str
    seed: int
    cases: int = 0
    seconds: float = 0.0
    classes: Counter[str] = field(default_factory=Counter)  # generator class
    outcomes: Counter[str] = field(default_factory=Counter)  # the counted reason
    mutated: int = 0
    refused: int = 0  # test run refused the frame (EINVAL: an IP ethertype, no IP header)
    discrepancies: list[Discrepancy] = field(default_factory=list)
    found: int = 0  # discrepancies, all of them (only the first few are kept)
    found_by: Counter[str] = field(default_factory=Counter)  # ... by mutation, values left out

    def summary(self) -> str:
        rate = self.cases / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.program}: {self.cases} cases, seed {self.seed}, {self.seconds:.1f} s "
            f"({rate:.0f}/s), {self.mutated} mutated, {self.refused} refused by test run, "
            f"{self.found} discrepancies",
            "  classes:  " + ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items())),
            "  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
        ]
        if self.found:
            lines.append(
                "  discrepancies by mutation: "
                + ", ".join(f"{k} {v}" for k, v in self.found_by.most_common())
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- the sandbox


@contextmanager
def sandbox() -> Iterator[tuple[int, int]]:
    """A private network namespace with one veth pair, entered for the
    duration; yields (uplink ifindex, VM port ifindex). Removed after."""
    from pyroute2 import NetNS, netns

    name = f"lh-fuzz-{os.getpid()}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="fzup", kind="veth", peer={"ifname": "fzvm"})
            up, vm = ns.link_lookup(ifname="fzup")[0], ns.link_lookup(ifname="fzvm")[0]
            for idx in (up, vm):
                ns.link("set", index=idx, state="up")
        netns.pushns(name)
        try:
            yield up, vm
        finally:
            netns.popns()
    finally:
        netns.remove(name)  # the veths go with it


def build_object(out: Path, broken: bool = False) -> Path:
    """The test build (lh_trace records redirects); *broken*: with one bounds
    check flipped (BROKEN_DEFINE), to prove the fuzzer catches it."""
    defines = {"LH_TRACE_REDIRECT": "1"} | ({BROKEN_DEFINE: "1"} if broken else {})
    return build.build(out, defines=defines)


def fuzz_object(folder: Path) -> Path:
    """The test build in *folder* (started with the session: conftest.BACKGROUND)."""
    return build_object(folder / "fuzz.bpf.o")


def broken_object(folder: Path) -> Path:
    """The build with the bounds check flipped, in *folder* (conftest.BACKGROUND)."""
    return build_object(folder / "broken.bpf.o", broken=True)


# ---------------------------------------------------------------- the runner


class Fuzzer:
    """The object loaded once in the sandbox; run() feeds it cases."""

    def __init__(self, obj_path: Path, up: int, vm: int) -> None:
        self.obj = libbpf.BpfObject(
            obj_path,
            pin_root=None,
            max_entries={
                m: TABLE_SIZE for m in ("lh_conns4", "lh_pending4", "lh_conns", "lh_pending")
            },
            # only the programs it runs: verifying the rest (lh_uplink_l3: ~2 s) bought nothing
            programs=[*PROGRAMS, "lh_clock"],
        )
        self.maps = datapath.Maps({n: self.obj.map(n) for n in datapath.MAP_NAMES})
        self.trace = self.obj.map("lh_trace")
        self.frags = self.obj.map("lh_frags")  # emptied after each case: cases stand alone
        self.progs = {p: self.obj.program(p) for p in PROGRAMS}
        self.clock_prog = self.obj.program("lh_clock")
        self.up = oracle.Port(up, SLOT_UP, ZONE)
        self.vm = oracle.Port(vm, SLOT_VM, ZONE)
        self._configure(self.up, abi.Role.UPLINK, "020000000101")
        self._configure(self.vm, abi.Role.VM_PORT, "020000000201")
        self.maps.set_settings(abi.Settings())
        self._table_counters_n = self.maps.table_counters.info.max_entries
        self._counters = self._read_counters()
        self._tables = self._read_table_counters()
        self._last_clock: int | None = None  # the clock after the last case: the next one's start

    def close(self) -> None:
        self.obj.close()

    def _configure(self, port: oracle.Port, role: abi.Role, mac: str) -> None:
        cfg = abi.IfaceCfg(role=int(role), zone=port.zone, slot=port.slot)
        ctypes.memmove(cfg.mac, bytes.fromhex(mac), abi.ETH_ALEN)
        self.maps.set_iface(port.ifindex, cfg)

    # reading
    def _read_counters(self) -> Sums:
        """Slots 0 (unconfigured), uplink and VM port: one batch lookup."""
        return self._sums(self.maps.counters, (max(SLOT_UP, SLOT_VM) + 1) * abi.CNT_MAX)

    def _read_table_counters(self) -> Sums:
        return self._sums(self.maps.table_counters, self._table_counters_n)

    def _sums(self, m: libbpf.Map, n: int) -> Sums:
        """The first n u64 per-CPU counters of m, summed over CPUs (as one
        array: read after every frame, summed in Python it cost a tenth of
        the run)."""
        per_cpu = np.frombuffer(m.array_values(n), dtype="<u8").reshape(n, -1)
        return per_cpu.sum(axis=1, dtype=np.uint64).astype(np.int64)

    def _read_table(self) -> dict[oracle.Key, tuple[str, abi.ConnEntry, bytes]]:
        """The whole connection table, through Maps.tables() (each family's maps):
        key -> (table, entry, full conn_key)."""
        out = {}
        for t in self.maps.tables():
            name = "confirmed" if t.which == abi.ChangeTable.CONFIRMED else "pending"
            for map_key, raw in t.map.items(batch=TABLE_SIZE):
                k = t.conn_key(map_key)
                raw_key = bytes(k)
                key = oracle.Key(
                    k.family,
                    bytes(k.saddr),
                    bytes(k.daddr),
                    _ntohs(k.sport),
                    _ntohs(k.dport),
                    k.proto,
                    k.zone,
                )
                out[key] = (name, abi.ConnEntry.from_buffer_copy(raw), raw_key)
        return out

    def _clock(self) -> int:
        return self.clock_prog.test_run(bytes(14)).retval % 2**32

    def _put(self, key: oracle.Key, row: oracle.Row) -> None:
        e = abi.ConnEntry(
            last_seen=SEEN_SETUP,
            ifindex=row.ifindex,
            vm_ifindex=row.vm_ifindex,
            flags=row.flags,
            packets=row.packets,
            replies=row.replies,
            state=row.state,
            seq=row.seq,
            vlan_count=len(row.tags),
        )
        ctypes.memmove(e.mac, row.mac, abi.ETH_ALEN)
        for i, t in enumerate(row.tags):
            e.vlan_tci[i] = t
        full = abi.ConnKey.from_buffer_copy(key.pack())
        confirmed, _ = self.maps.tables_for(full)
        confirmed.update(full, e)

    # one case
    def run_case(self, program: str, seed: int, case: int, result: Result) -> None:
        s = frames.sample(seed, program, case)
        try:
            self._run_case(program, seed, case, s, result)
        except libbpf.BpfError:
            raise
        except Exception as err:  # noqa: BLE001 -- the oracle failing on a frame is a finding
            result.cases += 1
            result.found += 1
            result.found_by["oracle-error"] += 1
            if len(result.discrepancies) < 20:
                diff = f"the oracle raised {err!r}"
                result.discrepancies.append(Discrepancy(program, seed, case, s, [diff]))
            self._cleanup()

    def _run_case(
        self, program: str, seed: int, case: int, s: frames.Sample, result: Result
    ) -> None:
        gso = s.gso_size > 0
        reading = oracle.read(s.data, gso)
        setup: tuple[oracle.Key, oracle.Row] | None = None
        if program == UPLINK:
            want = oracle.uplink(s.data, reading, self.up)
        else:
            key = oracle.vmport_setup(_base_reading(s.base), self.vm)
            if key is not None:
                row = oracle.Row(
                    "confirmed",
                    LAST_HOP,
                    self.up.ifindex,
                    0,
                    abi.F_ENTRY_HOP_KNOWN,
                    3,
                    0,
                    (),
                    abi.State.NONE,
                    0,
                    "setup",
                )
                setup = (key, row)
                self._put(key, row)
            want = oracle.vmport(s.data, reading, self.vm, self.up, setup, LAST_HOP)

        ctx = bytearray(_SKB_CTX_SIZE)
        port = self.up if program == UPLINK else self.vm
        struct.pack_into("<I", ctx, _SKB_IFINDEX_OFF, port.ifindex)
        struct.pack_into("<I", ctx, _SKB_GSO_SIZE_OFF, s.gso_size)
        t0 = self._last_clock if self._last_clock is not None else self._clock()
        try:
            run = self.progs[program].test_run(s.data, ctx=bytes(ctx))
        except libbpf.BpfError as err:
            if err.errno != 22:  # EINVAL: test run refuses an IP ethertype without an IP header
                raise
            result.refused += 1
            self._cleanup()
            return
        t1 = self._last_clock = self._clock()

        counters, tables = self._read_counters(), self._read_table_counters()
        trace = self.trace.lookup(struct.pack("<I", 0))
        redirect = struct.unpack_from("<I", trace)[0] if trace else 0
        table = self._read_table()

        diffs = []
        if run.retval != want.verdict:
            diffs.append(f"verdict: got {run.retval}, expected {want.verdict}")
        if redirect != want.redirect:
            diffs.append(f"redirect: got ifindex {redirect}, expected {want.redirect}")
        if run.data != want.output:
            diffs.append(f"output: got {run.data.hex()}\n          expected {want.output.hex()}")
        moved = _moved(counters, self._counters)
        got_c = {(i // abi.CNT_MAX, i % abi.CNT_MAX): n for i, n in moved}
        want_c = {(slot, int(c)): n for (slot, c), n in want.counters.items()}
        if got_c != want_c:
            diffs.append(f"counters: got {_names(got_c)}, expected {_names(want_c)}")
        got_t = dict(_moved(tables, self._tables))
        want_t = {int(c): n for c, n in want.table_counters.items()}
        if got_t != want_t:
            diffs.append(f"table counters: got {got_t}, expected {want_t}")
        diffs += _table_diffs(table, want.table, t0, t1)
        self._counters, self._tables = counters, tables

        result.cases += 1
        result.classes[s.cls] += 1
        result.outcomes[want.outcome] += 1
        result.mutated += s.mutation != "valid"
        if diffs:
            result.found += 1
            result.found_by[_kind(s.mutation)] += 1
            if len(result.discrepancies) < 20:
                result.discrepancies.append(Discrepancy(program, seed, case, s, diffs))
        # undo what the frame did: its entries, a redirect's trace
        for _, _, raw_key in table.values():
            full = abi.ConnKey.from_buffer_copy(raw_key)
            for t in self.maps.tables_for(full):
                t.delete(full)
        if redirect:
            self.trace.update(struct.pack("<I", 0), struct.pack("<I", 0))
        for frag_key in list(self.frags.keys()):  # a first fragment's decision
            self.frags.delete(frag_key)

    def _cleanup(self) -> None:
        for t in self.maps.tables():
            for map_key, _ in list(t.map.items()):
                t.map.delete(map_key)

    def run(
        self,
        program: str,
        seed: int,
        count: int,
        first: int = 0,
        stop_at_first: bool = False,
        progress: Callable[[Result], None] | None = None,
    ) -> Result:
        """Runs cases first, first + 1, ... until *count* frames ran (frames
        test run refuses are counted apart and not run); *progress* is called
        every PROGRESS_EVERY frames."""
        result = Result(program, seed)
        start = time.monotonic()
        case = first
        while result.cases < count:
            self.run_case(program, seed, case, result)
            case += 1
            if stop_at_first and result.found:
                break
            if progress and result.cases % PROGRESS_EVERY == 0:
                result.seconds = time.monotonic() - start
                progress(result)
        result.seconds = time.monotonic() - start
        return result


@functools.lru_cache(maxsize=2)
def _base_reading(frame: bytes) -> oracle.Reading:
    """The oracle's reading of a generated frame (shared by its PER_BASE cases)."""
    return oracle.read(frame, False)


def _moved(now: Sums, before: Sums) -> list[tuple[int, int]]:
    """(index, how much it moved) of each counter that moved."""
    delta = now - before
    return [(int(i), int(delta[i])) for i in np.flatnonzero(delta)]


def _kind(mutation: str) -> str:
    """A mutation's name without its values: "ipv4.len=39+flip@3" -> "ipv4.len+flip"."""
    return "+".join(part.split("=")[0].split("@")[0] for part in mutation.split("+"))


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def _names(counters: dict[tuple[int, int], int]) -> dict[str, int]:
    out = {}
    for (slot, c), n in sorted(counters.items()):
        try:
            name = abi.Counter(c).name.lower()
        except ValueError:
            name = str(c)
        out[f"slot{slot}.{name}"] = n
    return out


def _table_diffs(
    got: dict[oracle.Key, tuple[str, abi.ConnEntry, bytes]],
    want: dict[bytes, oracle.Row],
    t0: int,
    t1: int,
) -> list[str]:
    got_rows = {}
    for key, (table, e, _) in got.items():
        if e.last_seen == SEEN_SETUP:
            seen = "setup"
        elif (e.last_seen - t0) % 2**32 <= (t1 - t0) % 2**32:
            seen = "now"
        else:
            seen = f"last_seen={e.last_seen} outside [{t0}, {t1}]"
        got_rows[key.pack()] = oracle.Row(
            table,
            bytes(e.mac),
            e.ifindex,
            e.vm_ifindex,
            e.flags,
            e.packets,
            e.replies,
            tuple(e.vlan_tci[i] for i in range(min(e.vlan_count, abi.MAX_VLAN_TAGS))),
            e.state,
            e.seq,
            seen,
        )
    if got_rows == want:
        return []
    return [f"table: got {_show(got_rows)}\n          expected {_show(want)}"]


def _show(rows: dict[bytes, oracle.Row]) -> str:
    return "{" + ", ".join(f"{k.hex()}: {r}" for k, r in rows.items()) + "}"


__all__ = [
    "Discrepancy",
    "Fuzzer",
    "PROGRAMS",
    "Result",
    "UPLINK",
    "VMPORT",
    "broken_object",
    "build_object",
    "fuzz_object",
    "sandbox",
]

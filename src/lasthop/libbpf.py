"""A thin ctypes binding to the system's libbpf (libbpf.so.1, 1.1 or later).

Only what lasthop uses: open/load an object with pinned maps (all its
programs or only some, its maps its own or another object's), create maps
(the inner maps of a map-in-map), map element I/O (single and batched),
program test runs, and tc attach/detach. Every failing call raises
:class:`BpfError` naming the call and the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from lasthop.errors import BpfError

__all__ = [
    "BpfError",
    "BpfObject",
    "Map",
    "Program",
    "TestRun",
    "RingBuffer",
    "TcHook",
    "TcxHook",
    "tcx_prog_ids",
    "obj_get",
    "obj_pin",
    "map_create",
    "map_get_fd_by_id",
    "INGRESS",
    "EGRESS",
    "BPF_ANY",
    "BPF_NOEXIST",
    "BPF_EXIST",
]

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
INGRESS, EGRESS = 1, 2
_TC_F_REPLACE = 1
_OBJ_NAME_LEN = 16  # BPF_OBJ_NAME_LEN: a map's name in the kernel, NUL included
_CTX_OUT_SIZE = 512  # >= sizeof(struct __sk_buff) (192 on 6.x)
_MAP_TYPE_PERCPU = {
    5,
    6,
    10,
    21,
}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        pass
    from ctypes.util import find_library  # only now: it runs ldconfig, ~15 ms a start

    name = find_library("bpf")
    if name:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            pass
    raise BpfError("dlopen libbpf", errno.ENOENT, "libbpf.so.1 not found: run scripts/setup")


_lib = _load()
_libc = ctypes.CDLL(None, use_errno=True)
_c = ctypes


class _OpenOpts(_c.Structure):
    _fields_ = [
        ("sz", _c.c_size_t),
        ("object_name", _c.c_char_p),
        ("relaxed_maps", _c.c_bool),
        ("pin_root_path", _c.c_char_p),
    ]


class _TestRunOpts(_c.Structure):
    _fields_ = [
        ("sz", _c.c_size_t),
        ("data_in", _c.c_void_p),
        ("data_out", _c.c_void_p),
        ("data_size_in", _c.c_uint32),
        ("data_size_out", _c.c_uint32),
        ("ctx_in", _c.c_void_p),
        ("ctx_out", _c.c_void_p),
        ("ctx_size_in", _c.c_uint32),
        ("ctx_size_out", _c.c_uint32),
        ("retval", _c.c_uint32),
        ("repeat", _c.c_int),
        ("duration", _c.c_uint32),
        ("flags", _c.c_uint32),
        ("cpu", _c.c_uint32),
        ("batch_size", _c.c_uint32),
    ]


class _TcHook(_c.Structure):
    _fields_ = [
        ("sz", _c.c_size_t),
        ("ifindex", _c.c_int),
        ("attach_point", _c.c_int),
        ("parent", _c.c_uint32),
    ]


class _TcOpts(_c.Structure):
    _fields_ = [
        ("sz", _c.c_size_t),
        ("prog_fd", _c.c_int),
        ("flags", _c.c_uint32),
        ("prog_id", _c.c_uint32),
        ("handle", _c.c_uint32),
        ("priority", _c.c_uint32),
    ]


class _BatchOpts(_c.Structure):
    _fields_ = [("sz", _c.c_size_t), ("elem_flags", _c.c_uint64), ("flags", _c.c_uint64)]


class _MapInfo(_c.Structure):
    _fields_ = [
        ("type", _c.c_uint32),
        ("id", _c.c_uint32),
        ("key_size", _c.c_uint32),
        ("value_size", _c.c_uint32),
        ("max_entries", _c.c_uint32),
        ("map_flags", _c.c_uint32),
        ("name", _c.c_char * 16),
        ("_rest", _c.c_uint8 * 64),
    ]


def _sig(name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_vp, _int, _u32, _cp = _c.c_void_p, _c.c_int, _c.c_uint32, _c.c_char_p
_sig("bpf_object__open_file", _vp, _cp, _c.POINTER(_OpenOpts))
_sig("bpf_object__open_mem", _vp, _cp, _c.c_size_t, _c.POINTER(_OpenOpts))
_sig("bpf_object__load", _int, _vp)
_sig("bpf_object__close", None, _vp)
_sig("bpf_object__find_map_by_name", _vp, _vp, _cp)
_sig("bpf_object__find_program_by_name", _vp, _vp, _cp)
_sig("bpf_map__set_max_entries", _int, _vp, _u32)
_sig("bpf_map__set_pin_path", _int, _vp, _cp)
_sig("bpf_object__next_map", _vp, _vp, _vp)
_sig("bpf_map__fd", _int, _vp)
_sig("bpf_map__name", _cp, _vp)
_sig("bpf_map__is_internal", _c.c_bool, _vp)
_sig("bpf_map__reuse_fd", _int, _vp, _int)
_sig("bpf_object__next_program", _vp, _vp, _vp)
_sig("bpf_program__name", _cp, _vp)
_sig("bpf_program__set_autoload", _int, _vp, _c.c_bool)
_sig("bpf_program__autoload", _c.c_bool, _vp)
_sig("bpf_program__set_log_level", _int, _vp, _u32)
_sig("bpf_program__set_log_buf", _int, _vp, _cp, _c.c_size_t)
_sig("bpf_program__fd", _int, _vp)
_sig("bpf_obj_get", _int, _cp)
_sig("bpf_obj_pin", _int, _int, _cp)
_sig("bpf_map_lookup_elem", _int, _int, _vp, _vp)
_sig("bpf_map_update_elem", _int, _int, _vp, _vp, _c.c_uint64)
_sig("bpf_map_delete_elem", _int, _int, _vp)
_sig("bpf_map_get_next_key", _int, _int, _vp, _vp)
_sig("bpf_map_create", _int, _int, _cp, _u32, _u32, _u32, _vp)
_sig("bpf_map_update_batch", _int, _int, _vp, _vp, _c.POINTER(_u32), _c.POINTER(_BatchOpts))
_sig("bpf_map_get_fd_by_id", _int, _u32)
_sig(
    "bpf_map_lookup_batch", _int, _int, _vp, _vp, _vp, _vp, _c.POINTER(_u32), _c.POINTER(_BatchOpts)
)
_sig("bpf_obj_get_info_by_fd", _int, _int, _vp, _c.POINTER(_u32))
_sig("bpf_prog_test_run_opts", _int, _int, _c.POINTER(_TestRunOpts))
_sig("bpf_tc_hook_create", _int, _c.POINTER(_TcHook))
_sig("bpf_tc_hook_destroy", _int, _c.POINTER(_TcHook))
_sig("bpf_tc_attach", _int, _c.POINTER(_TcHook), _c.POINTER(_TcOpts))
_sig("bpf_tc_detach", _int, _c.POINTER(_TcHook), _c.POINTER(_TcOpts))
_sig("bpf_tc_query", _int, _c.POINTER(_TcHook), _c.POINTER(_TcOpts))
_sig("bpf_xdp_attach", _int, _int, _int, _u32, _vp)
_sig("bpf_xdp_detach", _int, _int, _u32, _vp)
_sig("bpf_xdp_query_id", _int, _int, _int, _c.POINTER(_u32))
_sig("bpf_prog_get_fd_by_id", _int, _u32)
_sig("bpf_link_create", _int, _int, _int, _int, _vp)
_sig("bpf_link_update", _int, _int, _int, _vp)
_sig("bpf_link_detach", _int, _int)
_sig("bpf_prog_query", _int, _int, _int, _u32, _c.POINTER(_u32), _c.POINTER(_u32), _c.POINTER(_u32))
_sig("libbpf_num_possible_cpus", _int)

# libbpf prints through a callback taking a va_list; vsnprintf formats it.
_PRINT_FN = _c.CFUNCTYPE(_int, _int, _cp, _vp)
_libc.vsnprintf.argtypes = [_cp, _c.c_size_t, _cp, _vp]
_libc.vsnprintf.restype = _int
_log_lines: list[str] = []


def _on_print_py(level: int, fmt: bytes, args: int) -> int:
    buf = _c.create_string_buffer(2048)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    _log_lines.append(buf.value.decode(errors="replace"))
    del _log_lines[:-400]
    return 0


_on_print = _PRINT_FN(_on_print_py)  # kept referenced: libbpf holds the pointer
_sig("libbpf_set_print", _vp, _PRINT_FN)
_lib.libbpf_set_print(_on_print)


def _take_log() -> str:
    text = "".join(_log_lines)
    _log_lines.clear()
    return text


def _errno(ret: int) -> int:
    """The errno of a failed call's return: libbpf's -errno, or a plain -1
    with errno set."""
    return -ret if ret != -1 else _c.get_errno()


def _check(call: str, ret: int, *, log: bool = False) -> int:
    if ret < 0:
        raise BpfError(call, _errno(ret), _take_log() if log else "")
    return ret


def _check_ptr(call: str, ptr: int | None) -> int:
    if not ptr:
        raise BpfError(call, _c.get_errno() or errno.EINVAL, _take_log())
    return ptr


def num_possible_cpus() -> int:
    return _check("libbpf_num_possible_cpus", _lib.libbpf_num_possible_cpus())


def obj_get(path: Path | str) -> int:
    """Opens a pinned object; returns its fd (the caller closes it)."""
    return _check(f"bpf_obj_get({path})", _lib.bpf_obj_get(str(path).encode()))


def obj_pin(fd: int, path: Path | str) -> None:
    _check(f"bpf_obj_pin({path})", _lib.bpf_obj_pin(fd, str(path).encode()))


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """Creates a map (no BTF, no flags); returns its fd (the caller closes it)."""
    return _check(
        f"bpf_map_create({name})",
        _lib.bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
    )


def map_get_fd_by_id(map_id: int) -> int:
    """Opens a map by id (e.g. an inner map of a map-in-map); the caller closes the fd."""
    return _check(f"bpf_map_get_fd_by_id({map_id})", _lib.bpf_map_get_fd_by_id(map_id))


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def pinned_info(path: Path) -> MapInfo | None:
    """The info of the map pinned at *path* (opened and closed again); None
    when nothing is pinned there."""
    if not path.exists():
        return None
    m = Map.pinned(path)
    try:
        return m.info
    finally:
        m.close()


class Map:
    """A map by fd, with element I/O on raw bytes (ctypes structs convert)."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self.fd = fd
        self._owned = owned
        self.info = self._info()
        self._value_size = self.info.value_size
        if self.info.type in _MAP_TYPE_PERCPU:
            self._value_size = ((self.info.value_size + 7) // 8 * 8) * num_possible_cpus()

    @classmethod
    def pinned(cls, path: Path | str) -> Map:
        return cls(obj_get(path), owned=True)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _info(self) -> MapInfo:
        info = _MapInfo()
        size = _u32(_c.sizeof(info))
        _check(
            "bpf_obj_get_info_by_fd",
            _lib.bpf_obj_get_info_by_fd(self.fd, _c.byref(info), _c.byref(size)),
        )
        return MapInfo(
            info.type, info.id, info.key_size, info.value_size, info.max_entries, info.name.decode()
        )

    @property
    def percpu(self) -> bool:
        return self.info.type in _MAP_TYPE_PERCPU

    def lookup(self, key: bytes) -> bytes | None:
        kbuf = _c.create_string_buffer(bytes(key), self.info.key_size)
        vbuf = _c.create_string_buffer(self._value_size)
        ret = _lib.bpf_map_lookup_elem(self.fd, kbuf, vbuf)
        if ret < 0:
            err = _errno(ret)
            if err == errno.ENOENT:
                return None
            raise BpfError("bpf_map_lookup_elem", err)
        return vbuf.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        kbuf = _c.create_string_buffer(bytes(key), self.info.key_size)
        vbuf = _c.create_string_buffer(bytes(value), self._value_size)
        _check("bpf_map_update_elem", _lib.bpf_map_update_elem(self.fd, kbuf, vbuf, flags))

    def delete(self, key: bytes) -> bool:
        kbuf = _c.create_string_buffer(bytes(key), self.info.key_size)
        ret = _lib.bpf_map_delete_elem(self.fd, kbuf)
        if ret < 0:
            err = _errno(ret)
            if err == errno.ENOENT:
                return False
            raise BpfError("bpf_map_delete_elem", err)
        return True

    def update_batch(self, keys: bytes, values: bytes, count: int, flags: int = BPF_ANY) -> None:
        """Writes *count* elements in one call: *keys* and *values* are the
        elements' raw bytes back to back (a per-CPU value holds every CPU's)."""
        if len(keys) != count * self.info.key_size or len(values) != count * self._value_size:
            raise ValueError(
                f"update_batch: {count} elements need {count * self.info.key_size} key "
                f"and {count * self._value_size} value bytes"
            )
        n = _u32(count)
        opts = _BatchOpts(sz=_c.sizeof(_BatchOpts), elem_flags=flags)
        _check(
            "bpf_map_update_batch",
            _lib.bpf_map_update_batch(self.fd, keys, values, _c.byref(n), _c.byref(opts)),
        )
        if n.value != count:
            raise BpfError(
                "bpf_map_update_batch", errno.EIO, f"wrote {n.value} of {count} elements"
            )

    def keys(self) -> Iterator[bytes]:
        """Keys by bpf_map_get_next_key; entries changing meanwhile may be missed."""
        prev = None
        nxt = _c.create_string_buffer(self.info.key_size)
        while True:
            ret = _lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if ret < 0:
                err = _errno(ret)
                if err == errno.ENOENT:
                    return
                raise BpfError("bpf_map_get_next_key", err)
            key = nxt.raw
            yield key
            prev = _c.create_string_buffer(key, self.info.key_size)

    def items(self, batch: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs, read in batches where the map type allows it."""
        ks, vs = self.info.key_size, self._value_size
        keys = _c.create_string_buffer(ks * batch)
        vals = _c.create_string_buffer(vs * batch)
        token_in, token_out = _c.create_string_buffer(ks), _c.create_string_buffer(ks)
        opts = _BatchOpts(sz=_c.sizeof(_BatchOpts))
        first = True
        while True:
            count = _u32(batch)
            ret = _lib.bpf_map_lookup_batch(
                self.fd,
                None if first else token_in,
                token_out,
                keys,
                vals,
                _c.byref(count),
                _c.byref(opts),
            )
            err = 0 if ret >= 0 else _errno(ret)
            if err and err not in (errno.ENOENT,):
                if err in (
                    errno.EINVAL,
                    errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524,
                    524,
                ):
                    yield from self._items_by_key()
                    return
                raise BpfError("bpf_map_lookup_batch", err)
            raw_k, raw_v = keys.raw, vals.raw
            for i in range(count.value):
                yield raw_k[i * ks : (i + 1) * ks], raw_v[i * vs : (i + 1) * vs]
            if err == errno.ENOENT:
                return
            _c.memmove(token_in, token_out, ks)
            first = False

    def array_values(self, count: int) -> bytes:
        """The values of an array map's first *count* elements, back to back,
        in one batch call (a per-CPU value holds every CPU's): what a caller
        polling a few counters per event reads without a syscall per element."""
        ks, vs = self.info.key_size, self._value_size
        keys = _c.create_string_buffer(ks * count)
        vals = _c.create_string_buffer(vs * count)
        token = _c.create_string_buffer(ks)
        n = _u32(count)
        opts = _BatchOpts(sz=_c.sizeof(_BatchOpts))
        ret = _lib.bpf_map_lookup_batch(
            self.fd, None, token, keys, vals, _c.byref(n), _c.byref(opts)
        )
        err = 0 if ret >= 0 else _errno(ret)
        if err and err != errno.ENOENT:
            raise BpfError("bpf_map_lookup_batch", err)
        return vals.raw[: n.value * vs]

    def memlock(self) -> int:
        """Kernel memory the map holds, as /proc/self/fdinfo reports it (bytes)."""
        for line in Path(f"/proc/self/fdinfo/{self.fd}").read_text().splitlines():
            if line.startswith("memlock:"):
                return int(line.split()[1])
        raise BpfError("memlock of a map", errno.ENODATA, f"no memlock in fdinfo of fd {self.fd}")

    def count(self) -> int:
        """Entries in the map, read in batches (one syscall per batch, not per key)."""
        return sum(1 for _ in self.items())

    def _items_by_key(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def percpu_values(self, raw: bytes) -> list[bytes]:
        """Splits a per-CPU value into one bytes object per possible CPU."""
        step = (self.info.value_size + 7) // 8 * 8
        return [raw[i : i + self.info.value_size] for i in range(0, len(raw), step)]


class RingBuffer:
    """A BPF ring buffer map read from user space through its pages, mapped
    as libbpf's ring_buffer maps them (the consumer position's page read and
    written; the producer position's page and the data, mapped twice so a
    record never wraps, read only), without libbpf's callback per record:
    :meth:`read_bytes` takes every waiting record of one size at once with
    numpy. :meth:`fileno` (the map's fd) is readable when records wait.

    The kernel writes a record's header (length; BUSY until submitted,
    DISCARD when discarded) before its data; x86's ordering of loads keeps
    a header seen un-BUSY behind its data (libbpf uses acquire loads)."""

    _BUSY, _DISCARD, _HDR = 1 << 31, 1 << 30, 8  # linux/bpf.h BPF_RINGBUF_*

    def __init__(self, map_fd: int) -> None:
        import mmap

        self._fd = map_fd
        size = Map(map_fd).info.max_entries  # the data's bytes, a power of 2
        self._page, self._mask = mmap.PAGESIZE, size - 1
        self._cons: mmap.mmap | None = mmap.mmap(
            map_fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._data: mmap.mmap | None = mmap.mmap(
            map_fd, self._page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self._page
        )
        self._cons_pos: _c.c_uint64 | None = _c.c_uint64.from_buffer(self._cons)  # one store
        self.skipped = 0  # records read_bytes left out: not of its size

    def fileno(self) -> int:
        """The map's fd: readable (select/poll) when the ring holds records."""
        return self._fd

    def _positions(self) -> tuple[int, int]:
        assert self._cons_pos is not None and self._data is not None
        return self._cons_pos.value, _c.c_uint64.from_buffer_copy(self._data, 0).value

    def _consumed(self, pos: int) -> None:
        assert self._cons_pos is not None
        self._cons_pos.value = pos  # the kernel now may reuse the space before it

    def _walk(self, cons: int, prod: int, out: list[bytes]) -> int:
        """Records from *cons* (one header at a time) into *out*, up to
        *prod* or the first not yet submitted; returns where it stopped."""
        import struct

        assert self._data is not None
        while cons < prod:
            at = self._page + (cons & self._mask)
            (hdr,) = struct.unpack_from("<I", self._data, at)
            if hdr & self._BUSY:
                break
            size = hdr & ~(self._BUSY | self._DISCARD)
            if not hdr & self._DISCARD:
                out.append(self._data[at + self._HDR : at + self._HDR + size])
            cons += (size + self._HDR + 7) & ~7
        return cons

    def read(self) -> list[bytes]:
        """Every record waiting now (none: an empty list), oldest first."""
        cons, prod = self._positions()
        out: list[bytes] = []
        self._consumed(self._walk(cons, prod, out))
        return out

    def read_bytes(self, size: int) -> bytes:
        """Every record waiting now, all of *size* bytes, back to back: the
        leading run of submitted records of that size in one numpy copy,
        any other (discarded, another size) one at a time."""
        import numpy as np

        assert self._data is not None
        cons, prod = self._positions()
        stride = (size + self._HDR + 7) & ~7
        n = (prod - cons) // stride
        out: list[bytes] = []
        if n:
            ring = np.frombuffer(
                self._data, np.uint8, count=n * stride, offset=self._page + (cons & self._mask)
            ).reshape(n, stride)
            ok = ring[:, :4].copy().view("<u4").ravel() == size  # submitted, kept, of size
            whole = n if ok.all() else int(np.argmin(ok))
            out.append(ring[:whole, self._HDR : self._HDR + size].tobytes())
            del ring
            cons += whole * stride
        cons = self._walk(cons, prod, out)
        self._consumed(cons)
        kept = [r for r in out if len(r) % size == 0]
        self.skipped += len(out) - len(kept)
        return b"".join(kept)

    def close(self) -> None:
        self._cons_pos = None  # its hold on the mapping first
        for m in (self._cons, self._data):
            if m is not None:
                m.close()
        self._cons = self._data = None


class Program:
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def test_run(
        self, data: bytes, *, repeat: int = 1, ctx: bytes | None = None, out_size: int | None = None
    ) -> TestRun:
        """Runs the program on *data* with BPF_PROG_TEST_RUN (no interface needed)."""
        out = _c.create_string_buffer(out_size or len(data) + 256)
        din = _c.create_string_buffer(data, len(data))
        opts = _TestRunOpts(sz=_c.sizeof(_TestRunOpts))
        opts.data_in = _c.cast(din, _c.c_void_p)
        opts.data_size_in = len(data)
        opts.data_out = _c.cast(out, _c.c_void_p)
        opts.data_size_out = len(out)
        opts.repeat = repeat
        ctx_in = ctx_out = None
        if ctx is not None:
            ctx_in = _c.create_string_buffer(ctx, len(ctx))
            # the kernel copies its whole context back: leave room for all of it
            ctx_out = _c.create_string_buffer(max(len(ctx), _CTX_OUT_SIZE))
            opts.ctx_in = _c.cast(ctx_in, _c.c_void_p)
            opts.ctx_size_in = len(ctx)
            opts.ctx_out = _c.cast(ctx_out, _c.c_void_p)
            opts.ctx_size_out = len(ctx_out)
        _check(
            f"bpf_prog_test_run_opts({self.name})",
            _lib.bpf_prog_test_run_opts(self.fd, _c.byref(opts)),
        )
        return TestRun(
            retval=opts.retval,
            data=out.raw[: opts.data_size_out],
            duration_ns=opts.duration,
            ctx=ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else None,
        )


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int  # mean per repeat, as the kernel measured it
    ctx: bytes | None

    __test__ = False  # not a pytest class


class BpfObject:
    """An ELF object opened and loaded by libbpf, maps pinned by name under
    *pin_root* (existing compatible pins are reused, so state survives), or
    not pinned at all when *pin_root* is None (tests, benchmarks).

    With *programs*, only the programs named are loaded (verified); with
    *skip*, all but those named: :meth:`program` of one not loaded raises.
    With *maps_of*, every map of this object is the same-named map of that
    loaded object (shared by fd: pinned or not, one map; nothing is pinned or
    created again), so a program loaded later works on the same state as the
    first object's. With *verifier_stats*, :attr:`processed` holds each loaded
    program's "processed N insns" from the verifier's log (level 4: stats).
    With *image*, the object is that ELF content (*path* names it), not the
    file as it is now."""

    def __init__(
        self,
        path: Path,
        *,
        pin_root: Path | None = None,
        max_entries: dict[str, int] | None = None,
        programs: Collection[str] | None = None,
        skip: Collection[str] = (),
        maps_of: BpfObject | None = None,
        verifier_stats: bool = False,
        image: bytes | None = None,
    ) -> None:
        self._keep = [str(path).encode(), str(pin_root).encode() if pin_root else None]
        opts = _OpenOpts(sz=_c.sizeof(_OpenOpts), pin_root_path=self._keep[1])
        if image is None:
            obj = _lib.bpf_object__open_file(self._keep[0], _c.byref(opts))
        else:  # path's content as read before (libbpf copies the buffer)
            self._keep.append(path.name.split(".")[0].encode())  # as open_file names it
            opts.object_name = self._keep[-1]
            obj = _lib.bpf_object__open_mem(image, len(image), _c.byref(opts))
        self._obj = _check_ptr(f"bpf_object__open({path})", obj)
        try:
            self._maps_setup(pin_root, max_entries or {}, maps_of)
            self.loaded = self._programs_setup(path, programs, skip)
            logs = self._stats_logs() if verifier_stats else {}
            _check(f"bpf_object__load({path.name})", _lib.bpf_object__load(self._obj), log=True)
            self.processed = {name: _processed(buf.value) for name, buf in logs.items()}
        except BaseException:
            _lib.bpf_object__close(self._obj)
            raise

    def _maps(self) -> Iterator[int]:
        m = _lib.bpf_object__next_map(self._obj, None)
        while m:
            yield m
            m = _lib.bpf_object__next_map(self._obj, m)

    def _fds_by_name(self) -> dict[str, int]:
        return {_lib.bpf_map__name(m).decode(): _lib.bpf_map__fd(m) for m in self._maps()}

    def _maps_setup(
        self, pin_root: Path | None, max_entries: dict[str, int], maps_of: BpfObject | None
    ) -> None:
        # the other object's maps by name: a map libbpf took from a pin may carry
        # the kernel's name, cut to BPF_OBJ_NAME_LEN - 1 (libbpf < 1.2)
        shared = {} if maps_of is None else maps_of._fds_by_name()
        for m in self._maps():
            if pin_root is None or maps_of is not None:
                # libbpf would otherwise pin LIBBPF_PIN_BY_NAME maps under /sys/fs/bpf
                _lib.bpf_map__set_pin_path(m, None)
            if maps_of is not None and not _lib.bpf_map__is_internal(m):
                name = _lib.bpf_map__name(m).decode()
                fd = shared.get(name, shared.get(name[: _OBJ_NAME_LEN - 1]))
                if fd is None:
                    raise BpfError(f"map {name}", errno.ENOENT, "not in the object to share")
                _check(f"bpf_map__reuse_fd({name})", _lib.bpf_map__reuse_fd(m, fd))
        for name, n in max_entries.items():
            m = _check_ptr(
                f"map {name}", _lib.bpf_object__find_map_by_name(self._obj, name.encode())
            )
            _check(f"bpf_map__set_max_entries({name})", _lib.bpf_map__set_max_entries(m, n))

    def _stats_logs(self) -> dict[str, _c.Array[_c.c_char]]:
        """A verifier log buffer (level 4: stats) for each program to load;
        libbpf writes into them at load."""
        logs = {}
        for name in self.loaded:
            p = _lib.bpf_object__find_program_by_name(self._obj, name.encode())
            logs[name] = buf = _c.create_string_buffer(4096)
            _check(f"bpf_program__set_log_level({name})", _lib.bpf_program__set_log_level(p, 4))
            _check(
                f"bpf_program__set_log_buf({name})",
                _lib.bpf_program__set_log_buf(p, buf, len(buf)),
            )
        return logs

    def _programs_setup(
        self, path: Path, programs: Collection[str] | None, skip: Collection[str]
    ) -> frozenset[str]:
        """Marks which programs to load (*programs*, all but *skip*); the names loaded."""
        names, seen = [], set()
        p = _lib.bpf_object__next_program(self._obj, None)
        while p:
            name = _lib.bpf_program__name(p).decode()
            seen.add(name)
            if programs is not None or name in skip:
                _check(
                    f"bpf_program__set_autoload({name})",
                    _lib.bpf_program__set_autoload(
                        p, name in (programs or ()) and name not in skip
                    ),
                )
            if _lib.bpf_program__autoload(p):
                names.append(name)
            p = _lib.bpf_object__next_program(self._obj, p)
        missing = sorted((set(programs or ()) | set(skip)) - seen)
        if missing:
            raise BpfError(
                f"programs of {path.name}", errno.ENOENT, f"no program {', '.join(missing)} in it"
            )
        return frozenset(names)

    def map(self, name: str) -> Map:
        m = _check_ptr(f"map {name}", _lib.bpf_object__find_map_by_name(self._obj, name.encode()))
        return Map(_lib.bpf_map__fd(m))

    def program(self, name: str) -> Program:
        """A loaded program; one this object did not load raises BpfError."""
        p = _check_ptr(
            f"program {name}", _lib.bpf_object__find_program_by_name(self._obj, name.encode())
        )
        if name not in self.loaded:
            only = ", ".join(sorted(self.loaded)) or "none"
            raise BpfError(f"program {name} (not loaded; this object loaded {only})", errno.ENOENT)
        return Program(_lib.bpf_program__fd(p), name)

    def close(self) -> None:
        if self._obj:
            _lib.bpf_object__close(self._obj)
            self._obj = 0

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _processed(log: bytes) -> int:
    """N of the verifier log's "processed N insns" (-1 when absent)."""
    found = re.search(rb"processed (\d+) insns", log)
    return int(found.group(1)) if found else -1


@dataclass(frozen=True)
class TcHook:
    """A clsact hook (ingress or egress) of one interface in the current netns."""

    ifindex: int
    attach_point: int = INGRESS

    def _hook(self) -> _TcHook:
        return _TcHook(sz=_c.sizeof(_TcHook), ifindex=self.ifindex, attach_point=self.attach_point)

    def create(self) -> None:
        """Adds the clsact qdisc if missing."""
        ret = _lib.bpf_tc_hook_create(_c.byref(self._hook()))
        if ret < 0 and -ret != errno.EEXIST:
            _check(f"bpf_tc_hook_create(ifindex {self.ifindex})", ret)

    def attach(self, prog_fd: int, *, handle: int, priority: int) -> int:
        """Attaches (or atomically replaces) our filter; returns the prog id."""
        opts = _TcOpts(
            sz=_c.sizeof(_TcOpts),
            prog_fd=prog_fd,
            flags=_TC_F_REPLACE,
            handle=handle,
            priority=priority,
        )
        _check(
            f"bpf_tc_attach(ifindex {self.ifindex})",
            _lib.bpf_tc_attach(_c.byref(self._hook()), _c.byref(opts)),
        )
        return int(opts.prog_id)

    def query(self, *, handle: int, priority: int) -> int | None:
        """The prog id of our filter, or None when absent."""
        opts = _TcOpts(sz=_c.sizeof(_TcOpts), handle=handle, priority=priority)
        ret = _lib.bpf_tc_query(_c.byref(self._hook()), _c.byref(opts))
        if ret < 0:
            return None
        return int(opts.prog_id)

    def detach(self, *, handle: int, priority: int) -> bool:
        opts = _TcOpts(sz=_c.sizeof(_TcOpts), handle=handle, priority=priority)
        ret = _lib.bpf_tc_detach(_c.byref(self._hook()), _c.byref(opts))
        if ret < 0:
            err = _errno(ret)
            if err in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return False
            raise BpfError(f"bpf_tc_detach(ifindex {self.ifindex})", err)
        return True


BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47  # enum bpf_attach_type (kernel 6.6+)
_TCX_OF_POINT = {INGRESS: BPF_TCX_INGRESS, EGRESS: BPF_TCX_EGRESS}
_LINK_INFO_SIZE = 256  # struct bpf_link_info, room to spare
_LINK_INFO_PROG_ID = 8  # bpf_link_info.prog_id
_LINK_INFO_TCX = 16  # bpf_link_info.tcx: ifindex, attach_type (0 once the device is gone)
_QUERY_MAX = 64  # programs one tcx hook query returns


def link_info(fd: int) -> tuple[int, int, int]:
    """(prog_id, ifindex, attach_type) of a tcx link; ifindex 0 when its
    device went away (the link is defunct)."""
    info = _c.create_string_buffer(_LINK_INFO_SIZE)
    size = _u32(_LINK_INFO_SIZE)
    _check("bpf_obj_get_info_by_fd(link)", _lib.bpf_obj_get_info_by_fd(fd, info, _c.byref(size)))
    (prog_id,) = struct.unpack_from("=I", info.raw, _LINK_INFO_PROG_ID)
    ifindex, attach_type = struct.unpack_from("=II", info.raw, _LINK_INFO_TCX)
    return prog_id, ifindex, attach_type


@dataclass(frozen=True)
class TcxHook:
    """A tcx hook (ingress or egress) of one interface in the current netns
    (kernel 6.6+): programs attached through links, run before any clsact
    filter, without the qdisc's classifier walk. Our link is pinned at
    *pin*, so it outlives the process that made it, as a tc filter does, and
    the next attach replaces its program atomically."""

    ifindex: int
    attach_point: int
    pin: Path

    @property
    def attach_type(self) -> int:
        return _TCX_OF_POINT[self.attach_point]

    def attach(self, prog_fd: int) -> int:
        """Puts the program on the hook (a new link, or the pinned one's
        program replaced); returns its prog id. EINVAL from a kernel without tcx."""
        fd = self._own_link()
        try:  # a new link, unpinned, goes with this fd: nothing left attached
            if fd is not None:
                _check(
                    f"bpf_link_update(tcx, ifindex {self.ifindex})",
                    _lib.bpf_link_update(fd, prog_fd, None),
                )
            else:
                fd = _check(
                    f"bpf_link_create(tcx, ifindex {self.ifindex})",
                    _lib.bpf_link_create(prog_fd, self.ifindex, self.attach_type, None),
                )
                self.pin.parent.mkdir(parents=True, exist_ok=True)
                obj_pin(fd, self.pin)
            return link_info(fd)[0]
        finally:
            if fd is not None:
                os.close(fd)

    def _own_link(self) -> int | None:
        """An fd of the pinned link when it is still on this hook; a pin of a
        link whose device went (or of another hook) is removed."""
        if not self.pin.exists():
            return None
        fd = obj_get(self.pin)
        try:
            _, ifindex, attach_type = link_info(fd)
        except BpfError:
            os.close(fd)
            raise
        if (ifindex, attach_type) == (self.ifindex, self.attach_type):
            return fd
        os.close(fd)
        self.pin.unlink()
        return None

    def detach(self) -> bool:
        """Takes our link off the hook and removes its pin; True when it was on."""
        fd = self._own_link()
        if fd is None:
            return False
        try:
            _check(f"bpf_link_detach(tcx, ifindex {self.ifindex})", _lib.bpf_link_detach(fd))
        finally:
            os.close(fd)
        self.pin.unlink(missing_ok=True)
        return True


def tcx_prog_ids(ifindex: int, attach_point: int) -> list[int]:
    """Every program on a tcx hook, in run order ([] without tcx or programs)."""
    ids = (_u32 * _QUERY_MAX)()
    count = _u32(_QUERY_MAX)
    flags = _u32(0)
    ret = _lib.bpf_prog_query(
        ifindex, _TCX_OF_POINT[attach_point], 0, _c.byref(flags), ids, _c.byref(count)
    )
    if ret < 0:
        err = _errno(ret)
        if err in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
            return []
        raise BpfError(f"bpf_prog_query(tcx, ifindex {ifindex})", err)
    return list(ids[: count.value])


XDP_FLAGS_SKB_MODE = 1 << 1  # linux/if_link.h: the kernel's generic XDP hook
XDP_FLAGS_DRV_MODE = 1 << 2  # the driver's own (native) hook
_PROG_INFO_SIZE = 256  # struct bpf_prog_info, room to spare: the kernel fills what it has
_PROG_INFO_NAME = slice(64, 80)  # bpf_prog_info.name, char[BPF_OBJ_NAME_LEN]


def prog_name(prog_id: int) -> str | None:
    """The name of loaded program *prog_id* (cut to 15 characters by the kernel),
    None when it is gone."""
    fd = _lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = _c.create_string_buffer(_PROG_INFO_SIZE)
        size = _u32(_PROG_INFO_SIZE)
        _check(
            "bpf_obj_get_info_by_fd(prog)", _lib.bpf_obj_get_info_by_fd(fd, info, _c.byref(size))
        )
        return info.raw[_PROG_INFO_NAME].split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)


@dataclass(frozen=True)
class XdpHook:
    """The XDP hook of one interface in the current netns: the driver's
    (native) when it has one, else the kernel's generic one."""

    ifindex: int

    def attach(self, prog_fd: int, flags: int = 0) -> int:
        """Attaches the program, replacing the one there; returns its prog id.
        *flags*: XDP_FLAGS_* (0: the driver's hook if it has one, else generic)."""
        _check(
            f"bpf_xdp_attach(ifindex {self.ifindex})",
            _lib.bpf_xdp_attach(self.ifindex, prog_fd, flags, None),
        )
        prog_id = self.query()
        if prog_id is None:
            raise BpfError(
                f"bpf_xdp_attach(ifindex {self.ifindex}): no program after", errno.ENOENT
            )
        return prog_id

    def query(self, mode: int = 0) -> int | None:
        """The prog id attached here (in *mode*, XDP_FLAGS_SKB_MODE or
        XDP_FLAGS_DRV_MODE; 0: whichever holds one), None when there is none."""
        prog_id = _u32(0)
        ret = _lib.bpf_xdp_query_id(self.ifindex, mode, _c.byref(prog_id))
        if ret < 0:
            err = _errno(ret)
            if err in (errno.ENODEV, errno.ENOENT):
                return None
            raise BpfError(f"bpf_xdp_query_id(ifindex {self.ifindex})", err)
        return int(prog_id.value) or None

    def detach(self, name: str) -> bool:
        """Removes the program here if it is named *name* (another's stays),
        from the driver's hook or the generic one; True when there was one."""
        found = False
        for mode in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            prog_id = self.query(mode)
            if prog_id is None or prog_name(prog_id) != name[:15]:
                continue
            ret = _lib.bpf_xdp_detach(self.ifindex, mode, None)
            if ret < 0:
                err = _errno(ret)
                if err == errno.ENODEV:
                    return found
                raise BpfError(f"bpf_xdp_detach(ifindex {self.ifindex})", err)
            found = True
        return found

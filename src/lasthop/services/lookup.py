"""The data path's service lookup, mirrored: the ``lh_services`` keys a
service claims (:func:`svc_key`), which service a connection's first packet
found (:func:`matcher`, as ``svc_find`` in bpf/service.h does), and the
Maglev tables in ``lh_maglev`` (:func:`write_table`, :func:`read_table`).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from array import array
from collections.abc import Callable, Iterable

from lasthop import abi, libbpf
from lasthop.services.maglev import MAGLEV_SIZE
from lasthop.services.model import Service

__all__ = ["delete_table", "matcher", "read_table", "svc_key", "write_table"]

BPF_MAP_TYPE_ARRAY = 2


def _u32(n: int) -> bytes:
    return struct.pack("=I", n)


_SLOT_KEYS = array("I", range(MAGLEV_SIZE)).tobytes()


def write_table(maglev: libbpf.Map, service_id: int, table: list[int]) -> None:
    """Swaps *table* in as lh_maglev[service_id]: a new inner map, filled in
    one batched write, then put in the outer map with one update."""
    if len(table) != MAGLEV_SIZE:
        raise ValueError(f"a Maglev table has {MAGLEV_SIZE} slots, not {len(table)}")
    fd = libbpf.map_create(BPF_MAP_TYPE_ARRAY, f"lh_maglev_{service_id}", 4, 4, MAGLEV_SIZE)
    try:
        libbpf.Map(fd).update_batch(_SLOT_KEYS, array("I", table).tobytes(), MAGLEV_SIZE)
        maglev.update(_u32(service_id), _u32(fd))  # the swap: the outer map now holds the new table
    finally:
        os.close(fd)  # the outer map keeps the inner one alive


def delete_table(maglev: libbpf.Map, service_id: int) -> None:
    """Takes lh_maglev[service_id] out (the data path finds no table there)."""
    maglev.delete(_u32(service_id))


def read_table(maglev: libbpf.Map, service_id: int) -> list[int] | None:
    """The table lh_maglev[service_id] holds, or None."""
    raw = maglev.lookup(_u32(service_id))
    if raw is None:
        return None
    inner = libbpf.Map(libbpf.map_get_fd_by_id(struct.unpack("=I", raw[:4])[0]), owned=True)
    try:
        table = [0] * MAGLEV_SIZE
        for key, value in inner.items(batch=MAGLEV_SIZE):
            table[struct.unpack("=I", key)[0]] = struct.unpack("=I", value[:4])[0]
        return table
    finally:
        inner.close()


def svc_key(addr: bytes, proto: int, port: int, family: int) -> bytes:
    key = abi.SvcKey(port=socket.htons(port), proto=proto, family=family)
    ctypes.memmove(key.addr, addr, 16)
    return bytes(key)


def matcher(services: Iterable[Service]) -> Callable[[abi.ConnKey], str | None]:
    """key -> name of the service its first packet found (as svc_find does)."""
    keys: dict[tuple[bytes, int, int, int], str] = {}
    for svc in services:
        for addr, proto, port in svc.svc_keys():
            keys[(addr, proto, port, svc.family)] = svc.name

    def match(k: abi.ConnKey) -> str | None:
        addr = bytes(k.daddr)
        if k.proto in (abi.IPPROTO_TCP, abi.IPPROTO_UDP):
            name = keys.get((addr, k.proto, socket.ntohs(k.dport), k.family))
            if name:
                return name
        return keys.get((addr, k.proto, 0, k.family)) or keys.get((addr, 0, 0, k.family))

    return match

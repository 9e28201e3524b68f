"""The agent's replication: a publisher thread that drains lh_changes into
the cluster's Redis stream in batches, and an applier thread that reads the
stream (XREAD) and writes its peers' records into this host's tables.

Neither thread is in the packet path: when Redis is down both hosts keep
forwarding with their own tables, the publisher counts what it could not
publish (the ring itself counts what the kernel could not write,
TC_SYNC_LOST), and on reconnect it publishes a snapshot of its table
(resync), which repairs the peer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import redis

from lasthop import abi, libbpf
from lasthop.clock import Clock
from lasthop.connections import ifname
from lasthop.datapath import Maps
from lasthop.errors import DatapathError, SyncError
from lasthop.sync.wire import (
    RECORD_SIZE,
    WIRE_VERSION,
    BatchEncoder,
    Change,
    DecodedBatch,
    decode_batch,
    encode_record,
    full_keys4,
    last_seen_for,
    records_of,
    split_families,
    sync_epoch_shift,
)

__all__ = [
    "Replicator",
    "SyncStatus",
    "check_url",
    "default_host",
    "export_records",
    "read_status",
    "resync_once",
    "write_changes",
]

log = logging.getLogger("lasthop")
BATCH = 2000  # records per stream message (RECORD_SIZE bytes each)
FLUSH_S = 0.002  # a batch smaller than BATCH leaves at most this long after its first record
PIPELINE = 16  # messages sent per round trip: a peer applies the first while more are encoded
READ_MESSAGES = 8  # stream messages per XREAD: the first is applied before the rest are read
STREAM_MAXLEN = 100_000  # messages the stream keeps (approximately): a peer away longer resyncs
HEARTBEAT_S = 1.0  # how often a host writes its figures into the cluster's hosts hash
RETRY_S = 1.0  # how long a host waits before trying a store that failed again
_REMOVALS = (abi.ChangeKind.REMOVED, abi.ChangeKind.EXPIRED)


def check_url(url: str) -> str:
    """*url* if it names a Redis server (redis://HOST:PORT/DB, or a local
    socket: unix:///PATH?db=N), else ValueError."""
    parts = urlparse(url)
    if parts.scheme == "unix" and parts.path:
        return url
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://HOST:PORT/DB or unix:///PATH, got {url!r}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database in {url!r} must be a number, got {db!r}")
    _ = parts.port  # ValueError when not a port number
    return url


def default_host(netns: str) -> str:
    """This host's id in the cluster: its name and namespace."""
    return f"{socket.gethostname()}/{netns}"


def _keys(cluster: str) -> tuple[str, str]:
    return f"lasthop:{cluster}:changes", f"lasthop:{cluster}:hosts"


def _client(url: str, *, binary: bool = False) -> redis.Redis:
    """A client; *binary*: replies as bytes (the stream's records are)."""
    return redis.Redis.from_url(
        url, decode_responses=not binary, socket_timeout=2, socket_connect_timeout=2
    )


@dataclass
class PeerStatus:
    last_seen_s: float | None = None  # since its last heartbeat
    batches: int = 0  # messages applied from it
    lag_ms: float | None = None  # its last batch: from its publishing to our applying
    lag_p99_ms: float | None = None  # over its last 1000 batches

    def to_json(self) -> dict[str, object]:
        return {
            "last_seen_s": self.last_seen_s,
            "batches": self.batches,
            "lag_ms": self.lag_ms,
            "lag_p99_ms": self.lag_p99_ms,
        }


@dataclass
class SyncStatus:
    """What this host's sync has done (the agent's figures, or its last heartbeat)."""

    host: str
    cluster: str
    running: bool  # an agent with sync on is running here
    connected: bool
    published: int = 0  # records read from the ring (or a snapshot) the store took; merged per key
    unpublished: int = 0  # records read from the ring that the store did not take
    applied: int = 0  # peers' records written into this host's tables
    unmapped: int = 0  # peers' records naming an uplink this host does not have
    hop_refused: int = 0  # peers' tunnel/MPLS last hops not stored here (gone there, no room)
    resyncs: int = 0  # snapshots of the table published
    malformed: int = 0  # peers' batches ignored (another wire version, bad records)
    lost: int = 0  # records the kernel had no ring room for (TC_SYNC_LOST)
    peers: dict[str, PeerStatus] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "cluster": self.cluster,
            "running": self.running,
            "connected": self.connected,
            "published": self.published,
            "unpublished": self.unpublished,
            "applied": self.applied,
            "unmapped": self.unmapped,
            "hop_refused": self.hop_refused,
            "resyncs": self.resyncs,
            "malformed": self.malformed,
            "lost": self.lost,
            "peers": {h: p.to_json() for h, p in sorted(self.peers.items())},
        }


_FLAGS2 = abi.ConnEntry.flags2.offset  # the byte of F_ENTRY2_* in a conn_entry


def _snapshot(maps: Maps) -> Iterator[bytes]:
    """Every live entry as conn_change records (LEARNED, naming its table),
    BATCH records back to back at a time, read in batches; only an
    on-demand resync calls this."""
    for table in maps.tables():
        items = table.map.items()
        while chunk := list(itertools.islice(items, BATCH)):
            keys = np.frombuffer(b"".join(k for k, _ in chunk), dtype=np.uint8)
            keys = keys.reshape(len(chunk), -1)
            if table.family == abi.FAMILY_V4:
                keys = full_keys4(keys)
            entries = np.frombuffer(b"".join(v for _, v in chunk), dtype=np.uint8)
            entries = entries.reshape(len(chunk), -1)
            if table.which == abi.ChangeTable.CONFIRMED:  # in-place entries are pending
                inplace = (entries[:, _FLAGS2] & abi.F_ENTRY2_INPLACE) != 0
                if inplace.any():
                    entries = entries.copy()
                    entries[:, _FLAGS2] &= ~abi.F_ENTRY2_INPLACE & 0xFF
                    yield records_of(abi.ChangeKind.LEARNED, abi.ChangeTable.PENDING,
                                     keys[inplace], entries[inplace])  # fmt: skip
                    keys, entries = keys[~inplace], entries[~inplace]
            yield records_of(abi.ChangeKind.LEARNED, table.which, keys, entries)


def _records(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Each record of chunks of records back to back."""
    for chunk in chunks:
        for o in range(0, len(chunk), RECORD_SIZE):
            yield chunk[o : o + RECORD_SIZE]


def export_records(
    maps: Maps, now: int, vm_ifindex: int, name_of: Callable[[int], str]
) -> list[list[object]]:
    """The entries of the connections pinned to VM port *vm_ifindex* (served
    or opened by it), as wire records (LEARNED, naming their table) with the
    time they have left at jiffies *now*: lasthop export, for a live migration."""
    settings = maps.get_settings()
    out = []
    for raw in _records(_snapshot(maps)):
        rec = abi.ConnChange.from_buffer_copy(raw)
        if rec.entry.vm_ifindex == vm_ifindex:
            out.append(encode_record(raw, name_of, now, settings, maps.hop_desc))
    return out


def _publish(
    client: redis.Redis,
    stream: str,
    host: str,
    kind: str,
    chunks: Iterable[bytes],
    maps: Maps,
    clock: Clock,
) -> int:
    """XADDs *chunks* (records back to back, at most BATCH each), a message
    each, PIPELINE messages per round trip; returns how many records it
    took (a key's records in one chunk travel as one, BatchEncoder)."""
    settings = maps.get_settings()
    names: dict[int, str] = {}

    def name_of(ifindex: int) -> str:
        if ifindex not in names:
            names[ifindex] = ifname(ifindex)
        return names[ifindex]

    sent = 0

    def hop_of(hop_id: int) -> bytes | None:  # read once per publishing a descriptor is used
        desc = maps.hop_desc(hop_id)  # its slot, if the id's generation still holds it
        return bytes(desc) if desc is not None else None

    enc = BatchEncoder(name_of, clock.jiffies(), settings, hop_of)
    pipe = client.pipeline(transaction=False)  # a round trip per PIPELINE messages
    for n, chunk in enumerate(chunks, 1):
        enc.add_bytes(chunk)
        sent += enc.count
        _xadd(pipe, stream, host, kind, *enc.take())
        if n % PIPELINE == 0:
            pipe.execute()
    if not sent and kind == "snapshot":  # an empty table's snapshot: a message all the same
        _xadd(pipe, stream, host, kind, *enc.take())
    pipe.execute()
    return sent


def _chunks(records: bytes) -> Iterator[bytes]:
    """*records* (from the ring, back to back) BATCH at a time."""
    step = BATCH * RECORD_SIZE
    for lo in range(0, len(records), step):
        yield records[lo : lo + step]


def _xadd(
    client: Any,
    stream: str,
    host: str,
    kind: str,
    records: bytes = b"",
    names: list[str] | None = None,
    hops: bytes = b"",
) -> Any:
    """One message (on a client: returns its id; on a pipeline: queued)."""
    fields = {"host": host, "type": kind, "ts": repr(time.time()), "v": WIRE_VERSION}
    fields |= {"names": json.dumps(names or []), "records": records}  # type: ignore[dict-item]
    if hops:
        fields["hops"] = hops  # type: ignore[assignment]
    return client.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)


class Replicator:
    """Publishes this host's changes and applies its peers' (two threads)."""

    def __init__(
        self,
        maps: Maps,
        clock: Clock,
        lock: threading.RLock,
        *,
        url: str,
        cluster: str,
        host: str,
    ) -> None:
        self.maps, self.clock, self.lock = maps, clock, lock
        self.url, self.cluster, self.host = url, cluster, host
        self.stream, self.hosts_key = _keys(cluster)
        self._status = SyncStatus(host=host, cluster=cluster, running=True, connected=False)
        self._lags: dict[str, deque[float]] = {}
        self._stop = threading.Event()
        self._resync_wanted = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ring: libbpf.RingBuffer | None = None
        self._pub = _client(url)
        self._sub = _client(url, binary=True)
        self._names: dict[str, int] = {}
        self._local: deque[bytes] = deque()  # user space's own changes (Maps.report)

    # -- life --------------------------------------------------------------
    def start(self) -> None:
        """Turns the data path's change records on and starts both threads;
        the first thing the publisher does is a resync (and a hello, so the
        peers resync to this host too)."""
        self._ring = libbpf.RingBuffer(self.maps.changes.fd)
        self.maps.on_change = self._local.append  # flush, services: published like the ring's
        self._set_sync_flag(True)
        self._resync_wanted.set()
        for target, name in ((self._publisher, "sync-publish"), (self._applier, "sync-apply")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stops both threads and the data path's records (no reader is left)."""
        self._set_sync_flag(False)
        self.maps.on_change = None
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if self._ring is not None:
            self._ring.close()
        self._pub.close()
        self._sub.close()

    def _set_sync_flag(self, on: bool) -> None:
        with self.lock:
            s = self.maps.get_settings()
            s.flags = (s.flags | abi.F_SET_SYNC) if on else (s.flags & ~abi.F_SET_SYNC)
            s.sync_shift = sync_epoch_shift(s.hz, dict(enumerate(s.timeout)))
            self.maps.set_settings(s)

    def request_resync(self) -> None:
        """Asks the publisher thread for a snapshot of the table."""
        self._resync_wanted.set()

    def status(self) -> SyncStatus:
        st = self._status
        out = SyncStatus(**{**st.__dict__, "peers": {}})
        out.lost = self.maps.table_totals()[abi.TableCounter.SYNC_LOST]
        heartbeats: dict[str, str] = {}
        with contextlib.suppress(redis.RedisError, OSError):
            heartbeats = self._pub.hgetall(self.hosts_key)  # type: ignore[assignment]
        now = time.time()
        for peer in set(heartbeats) | set(st.peers):
            if peer == self.host:
                continue
            p = st.peers.get(peer, PeerStatus())
            seen = _heartbeat_ts(heartbeats.get(peer))
            lags = sorted(self._lags.get(peer, ()))
            out.peers[peer] = PeerStatus(
                last_seen_s=round(now - seen, 3) if seen is not None else None,
                batches=p.batches,
                lag_ms=p.lag_ms,
                lag_p99_ms=round(lags[int(0.99 * (len(lags) - 1))], 3) if lags else None,
            )
        return out

    # -- publishing ----------------------------------------------------------
    def _publisher(self) -> None:
        """Drains the ring into batches bounded by size (BATCH) and time
        (FLUSH_S after a batch's first record), and publishes them."""
        assert self._ring is not None
        st, next_beat = self._status, 0.0
        records: list[bytes] = []  # runs of records back to back
        count, flush_at = 0, 0.0
        while not self._stop.is_set():
            if count:  # a batch is open: the ring keeps what comes until it closes
                # (not select: the ring's fd is readable while a record waits, a spin)
                self._stop.wait(max(0.0, flush_at - time.monotonic()))
            else:  # the first record wakes us
                select.select([self._ring], [], [], 0.05)
            fresh = [self._ring.read_bytes(RECORD_SIZE)]
            while self._local:
                fresh.append(self._local.popleft())
            got = sum(map(len, fresh)) // RECORD_SIZE
            now = time.monotonic()
            if got and not count:
                flush_at = now + FLUSH_S
            records += fresh
            count += got
            due = count >= BATCH or (count and now >= flush_at)
            try:
                if self._resync_wanted.is_set():
                    self._resync_wanted.clear()
                    self._resync()
                if due:
                    st.published += _publish(
                        self._pub,
                        self.stream,
                        self.host,
                        "changes",
                        _chunks(b"".join(records)),
                        self.maps,
                        self.clock,
                    )
                    records, count = [], 0
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = now + HEARTBEAT_S
                if not st.connected:
                    log.info("sync: connected to %s", self.url)
                st.connected = True
            except (redis.RedisError, OSError) as err:
                st.unpublished += count  # dropped: the resync on reconnect repairs it
                records, count = [], 0
                if st.connected:
                    log.warning("sync: store unreachable (%s); counting what is not published", err)
                st.connected = False
                self._resync_wanted.set()  # the peer missed these: a snapshot on reconnect
                self._stop.wait(RETRY_S)

    def _resync(self) -> None:
        sent = _publish(
            self._pub,
            self.stream,
            self.host,
            "snapshot",
            _snapshot(self.maps),
            self.maps,
            self.clock,
        )
        self._status.resyncs += 1
        self._status.published += sent
        log.info("sync: published a snapshot of %d entries", sent)

    def _heartbeat(self) -> None:
        st = self._status
        beat = {"ts": time.time(), "published": st.published, "applied": st.applied}
        beat |= {"unpublished": st.unpublished, "resyncs": st.resyncs}
        beat |= {"unmapped": st.unmapped, "malformed": st.malformed}
        self._pub.hset(self.hosts_key, self.host, json.dumps(beat))

    # -- applying ------------------------------------------------------------
    def _applier(self) -> None:
        last_id = ""  # read from our hello on: what came before, the peers' resyncs bring
        hello_sent = False
        while not self._stop.is_set():
            try:
                if not hello_sent:
                    hello_id = _xadd(self._sub, self.stream, self.host, "hello")
                    last_id = last_id or hello_id
                    hello_sent = True
                reply: Any = self._sub.xread({self.stream: last_id}, count=READ_MESSAGES, block=200)
            except (redis.RedisError, OSError):
                hello_sent = False
                self._stop.wait(RETRY_S)
                continue
            for _stream, messages in reply or []:
                for msg_id, fields in messages:
                    last_id = msg_id
                    self._handle(fields)

    def _handle(self, raw: dict[bytes, bytes]) -> None:
        fields = {k.decode(errors="replace"): v for k, v in raw.items()}
        peer = fields.get("host", b"").decode(errors="replace")
        if peer == self.host:
            return
        kind = fields.get("type", b"").decode(errors="replace")
        if kind == "hello":
            self._resync_wanted.set()  # a peer (re)started: it gets our table
            return
        try:
            version = fields.get("v", b"").decode(errors="replace")
            if version != WIRE_VERSION:
                raise ValueError(f"wire version {version!r}, this host reads {WIRE_VERSION!r}")
            names = json.loads(fields.get("names", b"[]"))
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("names is not a list of interface names")
            self.apply(fields.get("records", b""), names, fields.get("hops", b""))
        except (ValueError, TypeError) as err:
            self._status.malformed += 1
            log.warning("sync: ignoring a malformed batch from %s: %s", peer, err)
            return
        p = self._status.peers.setdefault(peer, PeerStatus())
        p.batches += 1
        try:
            p.lag_ms = round((time.time() - float(fields["ts"])) * 1000, 3)
            self._lags.setdefault(peer, deque(maxlen=1000)).append(p.lag_ms)
        except (KeyError, ValueError):
            pass

    def _index_of(self, name: str) -> int:
        if name not in self._names:
            try:
                self._names[name] = socket.if_nametoindex(name)
            except OSError:
                return 0  # not cached: the interface may appear later
        return self._names[name]

    def _hop_id(self, desc: bytes) -> int | None:
        """This host's id of a peer's hop descriptor (found, or stored as the
        data path would); None when lh_hop_descs has no room for it."""
        try:
            return self.maps.put_hop_desc(abi.HopDesc.from_buffer_copy(desc))
        except (DatapathError, libbpf.BpfError) as err:
            log.debug("sync: cannot store a peer's hop: %s", err)
            return None

    def apply(self, records: bytes, names: list[str], hops: bytes = b"") -> DecodedBatch:
        """Writes a peer's batch (binary records, the names and hop
        descriptors they use) into this host's tables; ValueError when it is
        malformed."""
        with self.lock:
            batch = decode_batch(
                records,
                names,
                self._index_of,
                self.clock.jiffies(),
                self.maps.get_settings(),
                hops,
                self._hop_id,
            )
            written = write_batch(self.maps, batch)
        refused = len(batch.keys) + len(batch.removed) - written  # a full table
        self._status.applied += batch.records - batch.unmapped - refused - batch.hop_refused
        self._status.unmapped += batch.unmapped
        self._status.hop_refused += batch.hop_refused
        return batch


def write_batch(maps: Maps, batch: DecodedBatch) -> int:
    """Writes a decoded batch into this host's tables, one batch call per map
    where the kernel allows: removals, then each entry into the table its
    record names (confirmed; pending unless the key is confirmed here
    already, looked up unless the record is a new one's); a confirmed one
    leaves pending (not looked for in an empty pending table: a fresh peer's
    resync). Asks for an expiry walk. Returns how many records it wrote."""
    written = len(batch.removed)
    for conns, pending, keys, rows in _by_family(maps, batch.keys):
        confirmed, new = batch.confirmed[rows], batch.new[rows]
        entries = np.ascontiguousarray(batch.entries[rows]).view(np.uint8).reshape(len(rows), -1)
        entries[:, _FLAGS2] &= ~abi.F_ENTRY2_INPLACE & 0xFF  # written here: never in place
        to_conns = confirmed.copy()
        for i in np.flatnonzero(~confirmed & ~new):  # a state or hop move into pending
            to_conns[i] = conns.lookup(keys[i].tobytes()) is not None
        written += _update_map(conns, keys[to_conns], entries[to_conns])
        written += _update_map(pending, keys[~to_conns], entries[~to_conns])
        if confirmed.any() and next(pending.keys(), None) is not None:  # one syscall: empty?
            for key in keys[confirmed]:
                pending.delete(key.tobytes())
    for key in batch.removed:  # a confirmed map's entry: through lh_conn_remove (maps.remove)
        k = abi.ConnKey.from_buffer_copy(key.tobytes())
        confirmed_t, pending_t = maps.tables_for(k)
        maps.remove(confirmed_t, k) is not None or pending_t.delete(k)
    maps.request_expiry()  # written from user space: the expiry pass must look
    return written


def _by_family(
    maps: Maps, keys: np.ndarray
) -> Iterator[tuple[libbpf.Map, libbpf.Map, np.ndarray, np.ndarray]]:
    """(confirmed map, pending map, their keys as a (rows, key size) array,
    the rows of *keys*) per family, for full conn_keys *keys*."""
    rows4, keys4, rows6, keys6 = split_families(keys)
    if len(rows4):
        yield maps.conns4, maps.pending4, keys4, rows4
    if len(rows6):
        yield maps.conns, maps.pending, keys6, rows6


def _update_map(table: libbpf.Map, keys: np.ndarray, values: np.ndarray) -> int:
    """Writes *keys* / *values* (rows of bytes) in one batch call; when the
    kernel refuses the batch (a full table), one by one, skipping those it
    refuses. Returns how many."""
    if not len(keys):
        return 0
    try:
        table.update_batch(keys.tobytes(), values.tobytes(), len(keys))
        return len(keys)
    except libbpf.BpfError as err:
        log.debug("sync: a batch write failed (%s), writing one by one", err)
    written = 0
    for key, value in zip(keys, values, strict=True):
        try:
            table.update(key.tobytes(), value.tobytes())
        except libbpf.BpfError as err:
            log.debug("sync: cannot apply an entry: %s", err)
            continue
        written += 1
    return written


def write_changes(
    maps: Maps, changes: Iterable[Change], now: int, index_of: Callable[[str], int]
) -> tuple[int, int]:
    """Writes *changes* (a peer's, or an export's) into this host's tables at
    jiffies *now*, interfaces by name through *index_of* (0: none here), and
    asks for an expiry walk. Returns (written, skipped: an uplink not here)."""
    m = maps
    applied = unmapped = 0
    settings = m.get_settings()
    for c in changes:
        conns, pending = m.tables_for(c.key)  # its family's
        if c.kind in _REMOVALS:
            m.remove(conns, c.key) is not None or pending.delete(c.key)
            applied += 1
            continue
        e = c.entry
        e.flags2 &= ~abi.F_ENTRY2_INPLACE  # written from user space: never in place
        e.ifindex = index_of(c.uplink) if c.uplink else 0
        if c.uplink and not e.ifindex:
            unmapped += 1
            continue
        if e.flags & abi.F_ENTRY_HOP_EXT:  # its hop's descriptor, under this host's id
            if not c.hop:
                unmapped += 1
                continue
            hop_id = m.put_hop_desc(abi.HopDesc.from_buffer_copy(c.hop))
            e.vlan_tci[0], e.vlan_tci[1] = hop_id & 0xFFFF, hop_id >> 16
        e.vm_ifindex = index_of(c.vm_port) if c.vm_port else 0
        if not e.vm_ifindex:
            e.flags &= ~abi.F_ENTRY_VM_FAST
        state = e.state if e.state < abi.CS_MAX else 0
        e.last_seen = last_seen_for(c.left_ms, now, settings.hz, settings.timeout[state])
        confirmed = c.table == abi.ChangeTable.CONFIRMED
        here = conns.lookup(c.key)
        if here is not None and here.flags2 & abi.F_ENTRY2_INPLACE:
            m.remove(conns, c.key)  # its place in the quota back, before it is overwritten
            here = None if confirmed else here
        try:
            if confirmed or here is not None:
                conns.update(c.key, e)
                if confirmed:
                    pending.delete(c.key)
            else:
                pending.update(c.key, e)
        except libbpf.BpfError as err:
            log.debug("sync: cannot apply an entry: %s", err)
            continue
        applied += 1
    m.request_expiry()  # written from user space: the expiry pass must look
    return applied, unmapped


def _heartbeat_ts(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        return float(json.loads(raw)["ts"])
    except (ValueError, KeyError, TypeError):
        return None


def read_status(url: str, cluster: str, host: str, maps: Maps) -> SyncStatus:
    """This host's sync as its agent last reported it (the cluster's hosts hash),
    with the ring's losses from the kernel: for a CLI without the agent's memory."""
    _, hosts_key = _keys(cluster)
    client = _client(url)
    try:
        beats: dict[str, str] = client.hgetall(hosts_key)  # type: ignore[assignment]
    except (redis.RedisError, OSError) as err:
        raise SyncError(f"cannot read the sync store at {url}: {err}") from err
    finally:
        client.close()
    mine = json.loads(beats.get(host, "{}"))
    now = time.time()
    st = SyncStatus(
        host=host,
        cluster=cluster,
        running=bool(mine) and now - float(mine.get("ts", 0)) < 5 * HEARTBEAT_S,
        connected=True,
        published=int(mine.get("published", 0)),
        unpublished=int(mine.get("unpublished", 0)),
        applied=int(mine.get("applied", 0)),
        resyncs=int(mine.get("resyncs", 0)),
        unmapped=int(mine.get("unmapped", 0)),
        malformed=int(mine.get("malformed", 0)),
        lost=maps.table_totals()[abi.TableCounter.SYNC_LOST],
    )
    for peer, raw in beats.items():
        seen = _heartbeat_ts(raw)
        if peer != host:
            st.peers[peer] = PeerStatus(last_seen_s=round(now - seen, 3) if seen else None)
    return st


def resync_once(
    url: str, cluster: str, host: str, maps: Maps, clock: Clock, progress: Callable[[int], object]
) -> int:
    """Publishes a snapshot of this host's table (the CLI, when no agent runs one)."""
    stream, _ = _keys(cluster)
    client = _client(url)
    try:
        sent = _publish(client, stream, host, "snapshot", _snapshot(maps), maps, clock)
    except (redis.RedisError, OSError) as err:
        raise SyncError(f"cannot publish to the sync store at {url}: {err}") from err
    finally:
        client.close()
    progress(sent)
    return sent

"""Replication of the connection table between hosts (docs/ha.md): the data
path's change records (lh_changes) published to a Redis stream per cluster,
and peers' records applied with the time their entries have left."""

from lasthop.sync.replicator import Replicator, SyncStatus, read_status, resync_once
from lasthop.sync.wire import WIRE_FIELDS, decode_record, encode_record

__all__ = [
    "Replicator",
    "SyncStatus",
    "WIRE_FIELDS",
    "decode_record",
    "encode_record",
    "read_status",
    "resync_once",
]

"""Prometheus metrics: a collector that reads the counters and the table
size from the controller on every scrape (no background polling).

| metric | type | labels |
| --- | --- | --- |
| lasthop_packets_total | counter | reason, interface |
| lasthop_table_entries | gauge | |
| lasthop_table_capacity | gauge | |
| lasthop_table_evicted_total | counter | |
| lasthop_table_removed_total | counter | |
| lasthop_sync_records_total | counter | event (published, unpublished, applied, unmapped, lost) |
| lasthop_sync_resyncs_total | counter | |
| lasthop_sync_malformed_batches_total | counter | |
| lasthop_sync_peer_last_seen_seconds | gauge | peer |
| lasthop_sync_peer_lag_seconds | gauge | peer |

and the services' metrics (lasthop.services.metrics).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lasthop.controller import Stats
from lasthop.services.metrics import ServicesCollector

__all__ = ["StatsCollector", "StatsSource", "SyncCollector", "registry"]

# Not a packet: the agent's own removals (aging, flush) go to lasthop_table_removed_total.
_REMOVED = "agent_removed"


class StatsSource(Protocol):
    def stats(self) -> Stats: ...


class StatsCollector(Collector):
    """Turns one :meth:`Controller.stats` call per scrape into metric families."""

    def __init__(self, source: StatsSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not read the maps

    def collect(self) -> Iterable[Metric]:
        st = self.source.stats()
        packets = CounterMetricFamily(
            "lasthop_packets",
            "Packets the data path handled, by reason and interface",
            labels=["reason", "interface"],
        )
        for interface, counts in sorted(st.interfaces.items()):
            for reason, n in sorted(counts.items()):
                if reason != _REMOVED:
                    packets.add_metric([reason, interface], n)
        yield packets
        yield GaugeMetricFamily(
            "lasthop_table_entries", "Connections in the table", value=st.entries
        )
        yield GaugeMetricFamily(
            "lasthop_table_capacity", "Connections the table can hold", value=st.capacity
        )
        yield CounterMetricFamily(
            "lasthop_table_evicted",
            "Pending entries the full pending table evicted (LRU)",
            value=st.pending.evicted,
        )
        states = GaugeMetricFamily(
            "lasthop_table_state_entries",
            "Entries by table and connection state, as the last expiry pass found them",
            labels=["table", "state"],
        )
        events = CounterMetricFamily(
            "lasthop_table_events", "Table events the kernel counted", labels=["table", "event"]
        )
        for name, t in (("confirmed", st.confirmed), ("pending", st.pending)):
            for state, n in sorted(t.states.items()):
                states.add_metric([name, state], n)
            for event in ("inserted", "expired", "removed"):
                events.add_metric([name, event], getattr(t, event))
        events.add_metric(["pending", "promoted"], st.promoted)
        events.add_metric(["confirmed", "refused"], st.confirm_refused)
        yield states
        yield events
        expiry = CounterMetricFamily(
            "lasthop_expiry_runs",
            "Runs of the kernel's expiry pass: walked the tables, or skipped (no change, none due)",
            labels=["outcome"],
        )
        expiry.add_metric(["walked"], st.expiry_passes)
        expiry.add_metric(["skipped"], st.expiry_skipped)
        yield expiry
        yield CounterMetricFamily(
            "lasthop_table_removed",
            "Entries the agent flushed or moved out (services)",
            value=st.totals.get(_REMOVED, 0),
        )


class SyncCollector(Collector):
    """The sync's figures, when the agent runs one (the controller's replicator)."""

    def __init__(self, source: object) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        replicator = getattr(self.source, "replicator", None)
        if replicator is None:
            return
        st = replicator.status()
        records = CounterMetricFamily(
            "lasthop_sync_records", "Change records of the sync, by what became of them",
            labels=["event"],
        )  # fmt: skip
        for event in ("published", "unpublished", "applied", "unmapped", "lost"):
            records.add_metric([event], getattr(st, event))
        yield records
        yield CounterMetricFamily(
            "lasthop_sync_resyncs", "Snapshots of the table published", value=st.resyncs
        )
        yield CounterMetricFamily(
            "lasthop_sync_malformed_batches",
            "Peers' batches ignored (another wire version, bad records)",
            value=st.malformed,
        )
        seen = GaugeMetricFamily(
            "lasthop_sync_peer_last_seen_seconds", "Since the peer's last heartbeat",
            labels=["peer"],
        )  # fmt: skip
        lag = GaugeMetricFamily(
            "lasthop_sync_peer_lag_seconds",
            "From a peer's publishing of its last batch to its applying here",
            labels=["peer"],
        )
        for peer, p in sorted(st.peers.items()):
            if p.last_seen_s is not None:
                seen.add_metric([peer], p.last_seen_s)
            if p.lag_ms is not None:
                lag.add_metric([peer], p.lag_ms / 1000)
        yield seen
        yield lag


def registry(source: StatsSource) -> CollectorRegistry:
    """A registry of its own (not the global one) holding our collectors; the
    services' one when *source* has services (the controller does)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(source))
    reg.register(SyncCollector(source))
    services = getattr(source, "services", None)
    if services is not None:
        reg.register(ServicesCollector(services))
    return reg

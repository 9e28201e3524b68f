"""The datapath benchmark runs end to end (tiny settings: this checks the
method's plumbing and self-checks, not the figures: no target is asserted,
nothing here is timed). It runs once, through `lasthop bench datapath
--json`: the tests read its results and what the CLI printed of them."""

from __future__ import annotations

import ctypes
import json
import re
import statistics
from dataclasses import replace

import pytest
from benchcli import CliRun, invoke

from lasthop import abi
from lasthop.bench import datapath
from lasthop.datapath import MAP_NAMES, default_pending, table_sizes

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

SMALL = {"repeat": 2000, "rounds": 2, "inserts": 300, "table": 1024, "memory_entries": 4096}
FIGURES = [
    "empty",
    "reference",
    "reply_hit_v4",
    "reply_hit_v6",
    "reply_hit_pending",
    "uplink_refresh",
    "reply_miss",
    "reply_hit_routed",
    "reply_hit_l3",
    "reply_hit_vxlan",
    "reply_hit_mpls",
    "reference_vxlan",
    "reference_mpls",
    "insert_room",
    "insert_full",
    "refresh_single",
    "new_connection",
    "new_connection_room",
    "new_connection_flood",
    "new_connection_single",
]


ARGS = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]


@pytest.fixture(scope="module")
def cli_run() -> CliRun:
    return invoke(datapath, ["datapath", "--json", *ARGS])


@pytest.fixture(scope="module")
def results(cli_run: CliRun) -> datapath.Results:
    assert isinstance(cli_run.results, datapath.Results)
    return cli_run.results


def test_every_figure_is_measured(results: datapath.Results) -> None:
    """Every path gets a positive time and both ratios: to lh_empty (1.0 for
    itself) and to lh_reference (1.0 for itself)."""
    assert [f.name for f in results.figures] == FIGURES
    assert all(
        f.ns > 0 and f.ns_low > 0 and f.vs_empty > 0 and f.vs_reference > 0 for f in results.figures
    )
    assert results.figure("empty").vs_empty == 1.0
    assert results.figure("reference").vs_reference == 1.0
    assert results.figure("reference").program == "lh_reference"


def test_l3_reply_is_measured_against_the_ethernet_one(results: datapath.Results) -> None:
    """The L3 uplink's reply carries its ratio to the Ethernet uplink's reply,
    both routed and measured in the same rounds."""
    l3, eth = results.figure("reply_hit_l3"), results.figure("reply_hit_routed")
    assert l3.vs_ethernet == pytest.approx(l3.ns / eth.ns)
    assert eth.vs_ethernet is None


def test_tunnel_reply_is_measured_against_the_plain_one(results: datapath.Results) -> None:
    """The VXLAN and MPLS uplinks' replies carry their ratio to reply_hit_v4
    (the same reply on a plain Ethernet uplink), measured in the same rounds."""
    plain = results.figure("reply_hit_v4")
    for name in ("reply_hit_vxlan", "reply_hit_mpls"):
        hop = results.figure(name)
        assert hop.vs_plain == pytest.approx(hop.ns / plain.ns)
        assert hop.vs_ethernet is None
    assert plain.vs_plain is None


def test_tunnel_replies_carry_the_floor_of_their_helper(results: datapath.Results) -> None:
    """Each tunnel reply carries its floor: the reference with the helper that
    reply needs (the tunnel key set, the labels pushed), over the reference;
    the floors are rows of their own, the MPLS one less the same undo as the
    MPLS reply, round by round."""
    reference = results.figure("reference")
    for name, floor_name in (("reply_hit_vxlan", "reference_vxlan"),
                             ("reply_hit_mpls", "reference_mpls")):  # fmt: skip
        hop, floor = results.figure(name), results.figure(floor_name)
        assert hop.floor == pytest.approx(floor.ns / reference.ns)
        assert floor.floor is None and floor.target is None
    assert results.figure("reference_vxlan").program == "lh_bench_ref_vxlan"
    mpls, ref_mpls = results.figure("reply_hit_mpls"), results.figure("reference_mpls")
    undo = re.search(r"less its undo's own cost \[(.*?)\]", mpls.detail)
    ref_undo = re.search(r"lh_bench_ref_mpls \[(.*?)\] less its undo's own cost \[(.*?)\]",
                         ref_mpls.detail)  # fmt: skip
    assert undo is not None and ref_undo is not None, (mpls.detail, ref_mpls.detail)
    assert ref_undo.group(2) == undo.group(1)  # the same undo, subtracted from both
    raw = [float(t) for t in ref_undo.group(1).split(", ")]
    own = [r - float(u) for r, u in zip(raw, ref_undo.group(2).split(", "), strict=True)]
    assert ref_mpls.ns == pytest.approx(statistics.median(own), abs=0.1)


def test_the_mpls_row_is_its_runs_less_the_undo(results: datapath.Results) -> None:
    """reply_hit_mpls is, round by round, lh_bench_vmport_mpls's time less the
    own cost of its undo (lh_bench_mpls_undo less lh_empty) measured in the
    same round; the detail shows both."""
    mpls = results.figure("reply_hit_mpls")
    got = re.fullmatch(
        r"rounds: \[(.*)\] \(lh_bench_vmport_mpls \[(.*)\] less its undo's own cost "
        r"\[(.*)\], same rounds\); .*",
        mpls.detail,
    )
    assert got is not None, mpls.detail
    net, raw, undo = ([float(t) for t in g.split(", ")] for g in got.groups())
    assert len(net) == len(raw) == len(undo) == SMALL["rounds"]
    own = [r - u for r, u in zip(raw, undo, strict=True)]
    assert net == pytest.approx(own, abs=0.5)  # (printed to 1 ns, the undo to 0.1)
    assert mpls.ns == pytest.approx(statistics.median(own), abs=0.1)
    assert all(u > 0 for u in undo)  # the undo costs something: it was subtracted


def test_targets_are_the_issues(results: datapath.Results) -> None:
    """Reply hits and the uplink refresh are held to the reference, the new
    connection to 1.5 us, memory to 150 B; ok follows the figure either way."""
    targeted = {f.name: f.target for f in results.figures if f.target}
    assert targeted == {
        "reply_hit_v4": datapath.Target(1.5, "reference"),
        "reply_hit_v6": datapath.Target(1.5, "reference"),
        "uplink_refresh": datapath.Target(1.5, "reference"),
        "new_connection": datapath.Target(1500.0, "ns"),
        "reply_hit_l3": datapath.Target(1.3, "ethernet"),
        "reply_hit_vxlan": datapath.Target(1.3, "plain"),
        "reply_hit_mpls": datapath.Target(1.3, "plain"),
    }
    for f in results.figures:
        if f.target:
            value = {
                "reference": f.vs_reference,
                "ethernet": f.vs_ethernet,
                "plain": f.vs_plain,
            }.get(f.target.of, f.ns)
            assert value is not None
            assert f.ok == (value <= f.target.limit)
    assert results.ok == all(
        [
            *(f.ok for f in results.figures if f.ok is not None),
            results.memory is None or results.memory.ok,
        ]
    )


def test_runs_did_what_their_names_say(results: datapath.Results) -> None:
    """Each run's counters moved exactly as expected, and no other counter moved:
    every reply hit redirected, every refresh refreshed, every miss missed,
    every new entry went into lh_pending, every handshake was confirmed (in
    single runs and back to back)."""
    n, packets = SMALL["inserts"], SMALL["repeat"] * SMALL["rounds"]
    assert set(results.checks) == {
        "back-to-back",
        "insert_room",
        "new_connection_single",
        "new_connection_room",
        "new_connection",
        "new_connection_flood",
        "insert_full",
    }
    assert all(c.ok for cs in results.checks.values() for c in cs)
    moved = {run: {c.counter: c.counted for c in cs} for run, cs in results.checks.items()}
    assert moved["back-to-back"] == {
        "vm0 REDIRECTED": 5 * packets,  # v4, v6, pending, the VXLAN and MPLS uplinks' replies
        "vm0 ENCAP_REDIRECTED": 2 * packets,  # the VXLAN and MPLS replies: tunnel, labels
        "up0 REFRESHED": packets,
        "vm0 MISS": packets,
        "vmr0 REDIRECTED": 2 * packets,  # the routed replies: Ethernet uplink, L3 uplink
    }
    # the bench's in-place quota: a quarter of lh_pending4 (1024); SYNs that never
    # confirm keep their place, so a single run fills it, and the rest take the LRU
    quota = 1024 // 4
    assert moved["insert_room"] == {"up0 LEARNED": n, "up0 REFRESHED": n,
                                    "table INPLACE_INSERTED": quota,
                                    "table PENDING_INSERTED": n - quota}  # fmt: skip
    # lh_conns4 full (prefilled): the in-place insert fails, the LRU takes it
    assert moved["insert_full"] == {"up0 LEARNED": n, "up0 REFRESHED": n,
                                    "table PENDING_INSERTED": n}  # fmt: skip
    common = {
        "up0 LEARNED": n,
        "vm0 REDIRECTED": n,
        "up0 REFRESHED": n,
        "up0 CONFIRMED": n,
        "vm0 VM_ADDR_LEARNED": 1,
        "table STATE_CHANGES": 2 * n,
    }
    handshake = common | {"table INPLACE_INSERTED": n, "table INPLACE_CONFIRMED": n}
    promoted = common | {
        "table PENDING_INSERTED": n,
        "table PENDING_PROMOTED": n,
        "table CONFIRMED_INSERTED": n,
    }
    assert moved["new_connection_single"] == handshake
    # back to back: inserts // rounds connections a round; the VM port's
    # address is known by then (VM_ADDR_LEARNED 1 // n = 0)
    streamed = n // SMALL["rounds"] * SMALL["rounds"]
    # the same counts with lh_pending4 full (every SYN evicts a made-up entry:
    # evictions move no counter) and with room
    for run in ("new_connection", "new_connection_room"):
        assert moved[run] == {k: v // n * streamed for k, v in handshake.items()}
    # the flood row: the quota taken, every SYN into the full LRU and promoted
    assert moved["new_connection_flood"] == {k: v // n * streamed for k, v in promoted.items()}
    flood = results.figure("new_connection_flood").detail
    assert "taken (as a flood leaves it): each SYN into lh_pending4, full (1024" in flood
    assert "quota 256 free" in results.figure("new_connection").detail
    assert "lh_pending4 with room" in results.figure("new_connection_room").detail
    assert "tables {'lh_conns4': 1024," in results.figure("insert_full").detail


def test_memory_counts_every_table(results: datapath.Results) -> None:
    """Kernel memory is the memlock of every map the agent pins, over the
    entries of the four tables at the agent's sizes for table_size 4096
    (IPv4 pending a quarter; IPv6 a quarter of IPv4, at least 1024), and
    over the confirmed ones."""
    m = results.memory
    assert m is not None
    assert m.sizes == table_sizes(4096)
    assert (m.confirmed, m.pending) == (4096 + 1024, default_pending(4096) + 1024)
    assert set(m.maps) == set(MAP_NAMES) and sum(m.maps.values()) == m.memlock_bytes
    assert m.per_entry == m.memlock_bytes / (m.confirmed + m.pending)
    assert m.per_confirmed == m.memlock_bytes / m.confirmed
    value = ctypes.sizeof(abi.ConnEntry)
    for name, size in m.sizes.items():  # at least key + value per entry
        key = abi.ConnKey4 if name.endswith("4") else abi.ConnKey
        assert m.maps[name] / size > ctypes.sizeof(key) + value, name


def test_json_has_every_field(results: datapath.Results) -> None:
    """The JSON report carries both ratios, the targets, the memory breakdown
    and the counter checks."""
    report = json.loads(json.dumps(results.to_json()))
    fig = {f["name"]: f for f in report["figures"]}
    assert set(fig) == set(FIGURES)
    assert {"ns", "ns_low", "vs_empty", "vs_reference", "target", "ok", "method", "detail"} <= set(
        fig["reply_hit_v4"]
    )
    assert fig["new_connection"]["target"] == {"limit": 1500.0, "of": "ns"}
    assert set(report["targets"]) == set(datapath.TARGETS)
    assert {
        "confirmed",
        "pending",
        "entries",
        "maps",
        "memlock_bytes",
        "per_entry",
        "per_confirmed",
        "ok",
    } <= set(report["memory"])
    assert report["checks"]["new_connection"][0]["ok"] is True
    assert report["settings"]["pending"] == max(default_pending(1024), 2 * SMALL["inserts"])


def test_cli_json_and_exit_codes(cli_run: CliRun) -> None:
    """`bench datapath --json` passes its options to the run and prints the
    run's figures; exit 0 even when a target is missed, unless --strict;
    --memory-entries 0 skips the memory figure."""
    assert cli_run.output.exit_code == 0, cli_run.output.output
    assert {k: v for k, v in cli_run.kwargs.items() if k != "progress"} == SMALL
    report = json.loads(cli_run.output.stdout)
    assert report == json.loads(json.dumps(cli_run.results.to_json()))
    assert {f["name"] for f in report["figures"]} >= {
        "reference",
        "reply_hit_v4",
        "new_connection",
        "insert_full",
    }
    measured = cli_run.results

    def same_run(**kwargs: object) -> datapath.Results:  # the figures just measured
        return measured

    strict = invoke(datapath, ["datapath", "--json", *ARGS, "--strict"], run=same_run)
    assert strict.output.exit_code == (0 if measured.ok else 1)
    assert json.loads(strict.output.stdout)["ok"] == measured.ok
    no_memory = invoke(
        datapath,
        ["datapath", "--json", *ARGS, "--memory-entries", "0"],
        run=lambda **kwargs: replace(measured, memory=None),
    )
    assert no_memory.kwargs["memory_entries"] == 0
    assert json.loads(no_memory.output.stdout)["memory"] is None

"""The lab's drawing (lasthop.lab.drawing) from a topology and ways given
here, without root: a node per namespace, an edge per link, each way's steps
along the links it crosses, the same bytes every time, and a clear error for
a file type it cannot write. The drawing of a real lab, made by the demo, is
checked in test_lab_cli.

    cl1 ── fw1 ──┐
                 sw ── host ── vm1
    cl2 ── fw2 ──┘
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from drawn import read

from lasthop.lab.discover import Iface, Link, Node, Topology
from lasthop.lab.drawing import DrawingError, check_format, graph, render
from lasthop.lab.ways import Sketch, Way

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")


def _if(name: str, mac: str, *addrs: str, master: str = "") -> Iface:
    return Iface(name, 2, mac, "veth", master, addrs)


TOPO = Topology(
    "t",
    "bridged",
    (
        Node("t-cl1", "client", (_if("eth0", "02:00:00:c0:00:01", "10.1.1.2/24"),)),
        Node("t-cl2", "client", (_if("eth0", "02:00:00:c0:00:02", "10.1.2.2/24"),)),
        Node("t-fw1", "firewall", (_if("tr0", "02:00:00:f0:00:01"), _if("lan0", "x"))),
        Node("t-fw2", "firewall", (_if("tr0", "02:00:00:f0:00:02"), _if("lan0", "y"))),
        Node("t-sw", "switch", tuple(_if(n, "z", master="br0") for n in ("fw1", "fw2", "host"))),
        Node("t-host", "host", (_if("up0", "u", master="br0"), _if("vm1", "v", master="br0"))),
        Node("t-vm1", "vm", (_if("eth0", "02:00:00:a0:00:01", "10.0.0.11/24"),)),
    ),
    (
        Link("t-cl1", "eth0", "t-fw1", "lan0"),
        Link("t-cl2", "eth0", "t-fw2", "lan0"),
        Link("t-fw1", "tr0", "t-sw", "fw1"),
        Link("t-fw2", "tr0", "t-sw", "fw2"),
        Link("t-sw", "host", "t-host", "up0"),
        Link("t-host", "vm1", "t-vm1", "eth0"),
    ),
)
WAYS = [
    Way("request", "cl2", "vm1", ("t-cl2", "t-fw2", "t-sw", "t-host", "t-vm1"), "cl2 → vm1"),
    Way("reply-off", "cl2", "vm1", ("t-vm1", "t-host", "t-sw", "t-fw1"), "dies", "t-fw1"),
    Way("reply-on", "cl2", "vm1", ("t-vm1", "t-host", "t-sw", "t-fw2", "t-cl2"), "arrives"),
]


def _sketch() -> Sketch:
    return Sketch(
        TOPO, list(WAYS), {"t-fw1": "drop_invalid +3"}, {"vm1": {"cl1": 4, "cl2": 2}}, ["note"]
    )


@needs_dot
def test_a_node_per_namespace_an_edge_per_link_and_each_way_along_the_links(
    tmp_path: Path,
) -> None:
    """The SVG has one node per namespace, one link edge per veth pair, and
    each way's steps in order between the namespaces it crosses."""
    drawn = read(render(_sketch(), tmp_path / "lab.svg"))
    assert sorted(drawn.nodes) == sorted(n.ns for n in TOPO.nodes)
    assert sorted(drawn.links) == sorted((k.a_ns, k.b_ns) for k in TOPO.links)
    for way in WAYS:
        hops = list(zip(way.hops, way.hops[1:], strict=False))
        # each step is drawn left to right: compare the pairs without their order
        assert [set(s) for s in drawn.way(way.kind, way.client, way.vm)] == [set(h) for h in hops]
    assert "drop_invalid +3" in drawn.texts["t-fw1"]
    assert "dies" in drawn.texts["way:reply-off:cl2:vm1:2"]
    assert "cl1 4" in drawn.texts["service:vm1"]


@needs_dot
@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_the_same_input_draws_the_same_bytes(tmp_path: Path, suffix: str) -> None:
    """The layout is Graphviz's and depends on the input only: two drawings are identical."""
    a = render(_sketch(), tmp_path / f"a{suffix}").read_bytes()
    b = render(_sketch(), tmp_path / f"b{suffix}").read_bytes()
    assert a == b and len(a) > 1000
    if suffix == ".png":
        assert a.startswith(b"\x89PNG")


def test_a_way_across_namespaces_without_a_link_is_refused() -> None:
    """A way whose step has no link under it is an error naming both namespaces."""
    bad = Sketch(TOPO, [Way("request", "cl1", "vm1", ("t-cl1", "t-vm1"))])
    with pytest.raises(DrawingError, match="no link between t-cl1 and t-vm1"):
        graph(bad)


@pytest.mark.parametrize("name", ["lab.txt", "lab", "lab.svg.gz"])
def test_an_unknown_file_type_is_refused_naming_the_suffix(name: str) -> None:
    with pytest.raises(DrawingError, match=r"must end in \.png or \.svg"):
        check_format(Path(name))


def test_lab_draw_with_a_bad_suffix_exits_2_before_touching_anything(tmp_path: Path) -> None:
    """`lab draw -o x.txt` and `lab demo --draw x.txt` are usage errors, root or not."""
    for args in (["draw", "-o", "x.txt"], ["demo", "--draw", "x.txt"]):
        result = subprocess.run(
            [sys.executable, "-m", "lasthop.lab.cli", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert "must end in .png or .svg" in result.stderr
        assert not (tmp_path / "x.txt").exists()

"""Draws the lab and the ways of its connections with Graphviz (dot: the
layout is computed, never placed by hand, and the same input gives the same
picture). One node per namespace, a row per interface (name, MAC, addresses);
one edge per veth pair; then each way as coloured edges along the links it
crosses, ending where it arrives or where it is dropped.

    clients ── firewalls ── switch ── host ── VMs        (left to right)

Edge ids in the SVG: `link:<ns>:<if>--<ns>:<if>` for a link,
`way:<kind>:<client>:<vm>:<step>` for a way's step, `service:<vm>`.
graphviz (the Python binding, and the `dot` program of the apt package) is
imported here only, when a drawing is made.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from lasthop.lab.discover import Iface, Node, Topology
from lasthop.lab.ways import Sketch, Way

if TYPE_CHECKING:
    import graphviz

__all__ = ["FORMATS", "DrawingError", "graph", "render", "check_format"]

FORMATS = (".png", ".svg")
FONT = "Helvetica"
ROLE_COLOURS = {  # fill of a namespace's title row
    "client": "#e8f0fe",
    "firewall": "#fde8e8",
    "switch": "#eeeeee",
    "host": "#fff4d6",
    "vm": "#e6f4ea",
}
WAY_STYLES = {  # kind -> (colour, style, legend)
    "request": ("#1f5fbf", "solid", "request"),
    "reply-off": ("#c62828", "dashed", "reply without lasthop"),
    "reply-on": ("#2e7d32", "bold", "reply with lasthop"),
}
SERVICE_COLOUR = "#7b1fa2"


class DrawingError(ValueError):
    """A drawing cannot be made: an unknown file type, or Graphviz missing."""


def check_format(path: Path) -> str:
    """The Graphviz format of *path* by its suffix ("png", "svg")."""
    if path.suffix.lower() not in FORMATS:
        raise DrawingError(
            f"{path}: the drawing's file must end in {' or '.join(FORMATS)}, not {path.suffix!r}"
        )
    return path.suffix.lower().lstrip(".")


def _short(topo: Topology, ns: str) -> str:
    return ns[len(topo.name) + 1 :]


def _iface_row(i: Iface) -> str:
    bits = [f"<b>{escape(i.name)}</b>"]
    if i.master:
        bits.append(f"(port of {escape(i.master)})")
    elif i.kind == "bridge":
        bits.append("(bridge)")
    text = " ".join(bits) + f'<br/><font point-size="9">{escape(i.mac)}</font>'
    for a in i.addrs:
        text += f'<br/><font point-size="9">{escape(a)}</font>'
    return f'<tr><td port="{escape(i.name)}" align="left">{text}</td></tr>'


def _node_label(topo: Topology, node: Node, drops: str) -> str:
    title = f"<b>{escape(_short(topo, node.ns))}</b> {node.role}"
    if node.role == "host":
        title += f" ({topo.mode})"
    rows = [f'<tr><td bgcolor="{ROLE_COLOURS[node.role]}">{title}</td></tr>']
    rows += [_iface_row(i) for i in node.ifaces]
    if drops:
        rows.append(
            f'<tr><td><font color="{WAY_STYLES["reply-off"][0]}">✗ '
            + "<br/>".join(escape(d) for d in drops.split(", "))
            + "</font></td></tr>"
        )
    table = '<table border="0" cellborder="1" cellspacing="0" cellpadding="3">'
    return f"<{table}{''.join(rows)}</table>>"


def _ends(topo: Topology, a: str, b: str) -> tuple[str, str, bool]:
    """The link from namespace a to b as Graphviz edge ends, left one first
    ("ns:if:e", "ns:if:w"), and whether the step goes right to left."""
    link = topo.link_between(a, b)
    if link is None:
        raise DrawingError(f"no link between {a} and {b}")
    return f"{link.a_ns}:{link.a_if}:e", f"{link.b_ns}:{link.b_if}:w", link.a_ns != a


def _way_edges(g: graphviz.Digraph, topo: Topology, way: Way) -> None:
    """A way's steps, each drawn left to right (a reply's with its arrow
    turned back), so they follow the links instead of looping round them."""
    colour, style, _ = WAY_STYLES[way.kind]
    steps = list(zip(way.hops, way.hops[1:], strict=False))
    for n, (a, b) in enumerate(steps):
        left, right, back = _ends(topo, a, b)
        last = n == len(steps) - 1
        arrow = "tee" if last and way.dies_at else "normal"
        g.edge(
            left,
            right,
            id=f"way:{way.kind}:{way.client}:{way.vm}:{n}",
            color=colour,
            fontcolor=colour,
            style=style,
            constraint="false",
            dir="back" if back else "forward",
            arrowhead=arrow,
            arrowtail=arrow,
            arrowsize="0.6",
            label=way.label if last else "",
            fontsize="9",
        )


def graph(sketch: Sketch, title: str = "") -> graphviz.Digraph:
    """The Graphviz graph of *sketch* (nothing is rendered yet)."""
    try:
        import graphviz
    except ModuleNotFoundError as err:  # pragma: no cover - a dependency
        raise DrawingError("drawing needs the graphviz Python package") from err
    topo = sketch.topology
    g = graphviz.Digraph(name=f"lab {topo.name}", engine="dot")
    g.attr(rankdir="LR", nodesep="0.25", ranksep="1.1", fontname=FONT, labelloc="t")
    g.attr("node", shape="plaintext", fontname=FONT, fontsize="10")
    g.attr("edge", fontname=FONT, dir="forward")
    for node in topo.nodes:
        g.node(node.ns, label=_node_label(topo, node, sketch.drops.get(node.ns, "")), id=node.ns)
    for role in ("client", "firewall", "vm"):  # one column per role
        with g.subgraph() as same:
            same.attr(rank="same")
            for node in topo.nodes:
                if node.role == role:
                    same.node(node.ns)
    for link in topo.links:
        g.edge(
            f"{link.a_ns}:{link.a_if}:e",
            f"{link.b_ns}:{link.b_if}:w",
            id=f"link:{link.a_ns}:{link.a_if}--{link.b_ns}:{link.b_if}",
            dir="none",
            color="#555555",
            penwidth="2",
        )
    for way in sketch.ways:
        _way_edges(g, topo, way)
    for vm, clients in sorted(sketch.service.items()):
        vm_node = next((n for n in topo.nodes if _short(topo, n.ns) == vm), None)
        if vm_node is None:
            continue
        host = next(n.ns for n in topo.nodes if n.role == "host")
        tail, head, _ = _ends(topo, host, vm_node.ns)
        total = sum(clients.values())
        g.edge(
            tail,
            head,
            id=f"service:{vm}",
            color=SERVICE_COLOUR,
            fontcolor=SERVICE_COLOUR,
            constraint="false",
            penwidth=str(1 + min(total, 60) / 10),
            label="service: " + " · ".join(f"{c} {k}" for c, k in sorted(clients.items())),
            fontsize="9",
        )
    legend = [title or f"lab {topo.name}: {topo.mode} host"]
    kinds = {w.kind for w in sketch.ways}
    legend += [
        f"{name}: {style} {'red' if k == 'reply-off' else 'green' if k == 'reply-on' else 'blue'}"
        for k, (_, style, name) in WAY_STYLES.items()
        if k in kinds
    ]
    if sketch.service:
        legend.append("service: purple, connections per client on each VM")
    g.attr(label="\\l".join([*legend, *sketch.caption]) + "\\l", fontsize="11")
    return g


def render(sketch: Sketch, path: Path, title: str = "") -> Path:
    """Writes the drawing of *sketch* to *path* (PNG or SVG, by its suffix)."""
    fmt = check_format(path)
    import graphviz

    try:
        data = graph(sketch, title).pipe(format=fmt)
    except graphviz.ExecutableNotFound as err:
        raise DrawingError("drawing needs Graphviz's dot program (apt install graphviz)") from err
    path.write_bytes(data)
    return path

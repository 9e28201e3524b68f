"""Reads a drawing of lasthop.lab.drawing back from its SVG: the nodes (one
per namespace), the link edges and each way's steps, by the ids the drawing
gives them (`link:...`, `way:<kind>:<client>:<vm>:<step>`, `service:<vm>`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

SVG = "{http://www.w3.org/2000/svg}"


@dataclass
class Drawn:
    nodes: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (ns, ns), left one first
    steps: dict[str, dict[int, tuple[str, str]]] = field(default_factory=dict)  # way -> (ns, ns)
    texts: dict[str, str] = field(default_factory=dict)  # element id -> its text

    def way(self, kind: str, client: str, vm: str) -> list[tuple[str, str]]:
        steps = self.steps.get(f"{kind}:{client}:{vm}", {})
        return [steps[n] for n in sorted(steps)]


def _ends(title: str) -> tuple[str, str]:
    """ "lh-fw2:tr0:e->lh-sw:fw2:w" -> ("lh-fw2", "lh-sw")."""
    tail, head = title.split("->")
    return tail.split(":")[0], head.split(":")[0]


def read(path: Path) -> Drawn:
    drawn = Drawn()
    for g in ET.parse(path).getroot().iter(f"{SVG}g"):
        kind, gid = g.get("class"), g.get("id", "")
        title = g.findtext(f"{SVG}title") or ""
        drawn.texts[gid] = " ".join(t.text or "" for t in g.iter(f"{SVG}text"))
        if kind == "node":
            drawn.nodes.append(title)
        elif kind == "edge" and gid.startswith("link:"):
            drawn.links.append(_ends(title))
        elif kind == "edge" and gid.startswith("way:"):
            _, way_kind, client, vm, step = gid.split(":")
            drawn.steps.setdefault(f"{way_kind}:{client}:{vm}", {})[int(step)] = _ends(title)
    return drawn

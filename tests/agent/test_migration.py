"""Live migration without a store: `lasthop export --vm` on the host a VM
leaves, `lasthop import --vm-port` on the host it moves to:

    fw (10.0.0.1) ── fw0 ┐                            ┌ fw0    host B: other ifindexes,
                          br0  host A                  ├ vnet7  the VM's port named otherwise
    vm (10.0.0.2) ── vm0 ┘   export --vm vm0 ──file──▶ import --vm-port vnet7

B holds A's entries of vm0's connections before the VM's first packet
there: the same last-hop MAC, the uplink by name (B's own ifindex), the
VM port B names, and the time left within a second of A's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlib import ROOT_MARKS, BridgedSite, Netns, lasthop, sandbox

pytestmark = [*ROOT_MARKS, pytest.mark.slow]


class Hosts:
    def __init__(self, site: BridgedSite, b: Netns) -> None:
        self.site, self.a, self.b = site, site.host, b

    def conn(self, ns: Netns, proto: str, port: int) -> dict[str, Any] | None:
        result = lasthop("show", "--netns", ns.name, "--json")
        assert result.returncode == 0, result.stderr
        found = [c for c in json.loads(result.stdout) if c["proto"] == proto and c["sport"] == port]
        return found[0] if found else None


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with sandbox() as box:
        site = BridgedSite(box)
        b = box.netns("b")
        b.veth("pad0", "pad0p")  # B's fw0 gets another ifindex than A's
        b.veth("fw0", "fw0p")
        b.veth("vnet7", "vnet7p")
        try:
            site.serve()
            box.agent("--uplink", "fw0", "--bridge", "br0", netns=site.host)
            box.agent("--uplink", "fw0", "--vm-port", "vnet7", netns=b)
            yield Hosts(site, b)
        finally:
            site.close()


def test_entries_exported_on_a_are_imported_on_b(hosts: Hosts, tmp_path: Path) -> None:
    """A's entries of the connections pinned to vm0 appear on B with the same
    last-hop MAC, B's uplink of the same name, pinned to vnet7, and the time
    left within a second of A's."""
    tcp, udp = hosts.site.exchange("tcp", n=3), hosts.site.exchange("udp", n=3)
    out = tmp_path / "vm0.json"
    exported = lasthop("export", "--netns", hosts.a.name, "--vm", "vm0", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert len(json.loads(out.read_text())["records"]) >= 2
    imported = lasthop("import", "--netns", hosts.b.name, str(out), "--vm-port", "vnet7")
    assert imported.returncode == 0, imported.stderr
    assert "0 skipped" in imported.stdout
    for proto, port in (("tcp", tcp), ("udp", udp)):
        a, b = hosts.conn(hosts.a, proto, port), hosts.conn(hosts.b, proto, port)
        assert a is not None and b is not None, (proto, a, b)
        assert a["vm_port"] == "vm0" and b["vm_port"] == "vnet7"
        assert b["mac"] == a["mac"] == hosts.site.fw_mac
        assert b["uplink"] == a["uplink"] == "fw0"
        assert b["uplink_ifindex"] == hosts.b.ifindex("fw0") != a["uplink_ifindex"]
        assert b["state"] == a["state"]
        assert abs(b["age_s"] - a["age_s"]) < 1.0  # same timeouts: the same time left


def test_import_refuses_what_is_not_an_export(hosts: Hosts, tmp_path: Path) -> None:
    """A file that is not a lasthop export: exit 2, nothing written; an
    unknown VM port to export: exit 2."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"records": []}')
    result = lasthop("import", "--netns", hosts.b.name, str(bad), "--vm-port", "vnet7")
    assert result.returncode == 2 and "not a lasthop export" in result.stderr
    result = lasthop("export", "--netns", hosts.a.name, "--vm", "nosuch0")
    assert result.returncode == 2

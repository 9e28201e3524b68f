"""allow_last_hops / deny_last_hops end to end: the agent writes the config's
lists into lh_hops at attach; a firewall the allow-list leaves out is not
learned (its frames take the host's normal path, counted with its MAC in
`stats`), one it names is."""

from __future__ import annotations

import json

import pytest

from agentlib import ROOT_MARKS, BridgedSite, Sandbox, lasthop

pytestmark = ROOT_MARKS

OTHER_MAC = "02:00:5e:00:01:0a"


def _json(*args: str) -> object:
    result = lasthop(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("listed", [False, True], ids=["left-out", "named"])
def test_allow_list_decides_what_is_learned(box: Sandbox, listed: bool) -> None:
    site = BridgedSite(box)
    macs = [OTHER_MAC, site.fw_mac] if listed else [OTHER_MAC]
    config = box.logs / "hops.toml"
    config.write_text(f'[[uplink]]\nname = "fw0"\nallow_last_hops = {json.dumps(macs)}\n')
    try:
        site.serve()
        box.agent("--config", str(config), "--bridge", "br0", netns=site.host)
        port = site.exchange("udp", n=3)  # works either way: the bridge forwards it
        rows = [
            c
            for c in _json("show", "--netns", site.host.name, "--json")  # type: ignore[union-attr]
            if c["sport"] == port
        ]
        stats = _json("stats", "--netns", site.host.name, "--json")
        assert isinstance(stats, dict)
        refused = stats["untrusted_hops"].get("fw0", {})
        if listed:
            assert [r["mac"] for r in rows] == [site.fw_mac]
            assert refused == {}
        else:
            assert rows == []
            assert refused[site.fw_mac] >= 3  # every request, counted with its MAC
            assert stats["totals"]["hop_untrusted"] == refused[site.fw_mac]
    finally:
        site.close()

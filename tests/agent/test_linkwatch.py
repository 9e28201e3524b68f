"""Link loss (lasthop.linkwatch): when an uplink's link goes down the agent
flags it within a moment, and the data path stops sending its connections'
replies into the dead link (ordinary routing, counted `hop_down`); when the
link returns the same entry is used again."""

from __future__ import annotations

from agentlib import ROOT_MARKS, BridgedSite, Sandbox, back_to_own_netns, wait_for
from lasthop.controller import Controller

pytestmark = ROOT_MARKS


def _link_down(site: BridgedSite) -> bool:
    with back_to_own_netns():
        c = Controller(site.host.name)
        try:
            return {i.name: i.link_down for i in c.interfaces()}["fw0"]
        finally:
            c.close()


def test_replies_avoid_an_uplink_whose_link_is_down_until_it_returns(box: Sandbox) -> None:
    site = BridgedSite(box)
    try:
        site.serve()
        box.agent("--uplink", "fw0", "--bridge", "br0", netns=site.host)
        port = site.exchange("udp", n=2)
    finally:
        site.close()  # the echo server: the VM's late answers below are ours
    site.keep_firewall_mac()  # while the link is down no ARP gets through

    assert not _link_down(site)
    site.host.ip("link", "set", "fw0", "down")
    wait_for(lambda: _link_down(site))
    before = site.vm_counters()
    site.answer_late(port)
    wait_for(lambda: site.vm_counters().get("hop_down", 0) == before.get("hop_down", 0) + 1)
    assert site.vm_counters().get("redirected", 0) == before.get("redirected", 0)

    site.host.ip("link", "set", "fw0", "up")
    wait_for(lambda: not _link_down(site))
    site.answer_late(port)
    wait_for(lambda: site.vm_counters().get("redirected", 0) == before.get("redirected", 0) + 1)
    assert site.vm_counters().get("hop_down", 0) == before.get("hop_down", 0) + 1

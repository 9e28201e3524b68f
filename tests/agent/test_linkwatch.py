"""Link loss (lasthop.linkwatch): when an uplink's link goes down the agent
flags it within a moment, and the data path stops sending its connections'
replies into the dead link (ordinary routing, counted `hop_down`); when the
link returns the same entry is used again."""

from __future__ import annotations

import json
import sys

from agentlib import ROOT_MARKS, BridgedSite, Sandbox, back_to_own_netns, lasthop, wait_for
from lasthop.controller import Controller

pytestmark = ROOT_MARKS

# the VM answers the firewall's connection once more, from the server's port
VM_REPLY = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "s.sendto(b'late answer', (sys.argv[3], int(sys.argv[4])))\n"
)


def _link_down(site: BridgedSite) -> bool:
    with back_to_own_netns():
        c = Controller(site.host.name)
        try:
            return {i.name: i.link_down for i in c.interfaces()}["fw0"]
        finally:
            c.close()


def _vm0(site: BridgedSite) -> dict[str, int]:
    result = lasthop("stats", "--netns", site.host.name, "--json")
    assert result.returncode == 0, result.stderr
    counters: dict[str, int] = json.loads(result.stdout)["interfaces"].get("vm0", {})
    return counters


def test_replies_avoid_an_uplink_whose_link_is_down_until_it_returns(box: Sandbox) -> None:
    site = BridgedSite(box)
    try:
        site.serve()
        box.agent("--uplink", "fw0", "--bridge", "br0", netns=site.host)
        port = site.exchange("udp", n=2)
    finally:
        site.close()  # the echo server: the VM's late answers below are ours
    # the VM keeps the firewall's MAC while the link is down (no ARP gets through)
    site.vm.ip(
        "neigh", "replace", site.FW_IP, "lladdr", site.fw_mac, "dev", "eth0", "nud", "permanent"
    )

    def answer() -> None:
        site.vm.exec(
            sys.executable, "-c", VM_REPLY, site.VM_IP, str(site.PORT), site.FW_IP, str(port)
        )

    assert not _link_down(site)
    site.host.ip("link", "set", "fw0", "down")
    wait_for(lambda: _link_down(site))
    before = _vm0(site)
    answer()
    wait_for(lambda: _vm0(site).get("hop_down", 0) == before.get("hop_down", 0) + 1)
    assert _vm0(site).get("redirected", 0) == before.get("redirected", 0)

    site.host.ip("link", "set", "fw0", "up")
    wait_for(lambda: not _link_down(site))
    answer()
    wait_for(lambda: _vm0(site).get("redirected", 0) == before.get("redirected", 0) + 1)
    assert _vm0(site).get("hop_down", 0) == before.get("hop_down", 0) + 1

"""links.link_kind: what an interface's frames carry, from its netlink
attributes (no root: the function reads numbers and names only)."""

from __future__ import annotations

import pytest

from lasthop import abi
from lasthop.links import link_kind


@pytest.mark.parametrize(
    ("link_type", "info_kind", "external", "want"),
    [
        (1, None, False, abi.LinkKind.ETHERNET),  # ARPHRD_ETHER: a NIC, veth, tap
        (1, "veth", False, abi.LinkKind.ETHERNET),
        (1, "gretap", False, abi.LinkKind.ETHERNET),  # GRE carrying Ethernet: an Ethernet link
        (1, "vxlan", True, abi.LinkKind.VXLAN),  # external (collect metadata)
        (1, "geneve", True, abi.LinkKind.GENEVE),
        (1, "vxlan", False, abi.LinkKind.ETHERNET),  # its own remote: forwards by MAC
        (1, "geneve", False, abi.LinkKind.ETHERNET),
        (1, "veth", True, abi.LinkKind.ETHERNET),  # only tunnels are external
        (0xFFFE, "tun", False, abi.LinkKind.L3),  # ARPHRD_NONE: tun in IFF_TUN mode
        (0xFFFE, "wireguard", False, abi.LinkKind.L3),
        (0xFFFE, "xfrm", False, abi.LinkKind.L3),
        (778, "gre", False, abi.LinkKind.L3),  # ARPHRD_IPGRE
        (768, "ipip", False, abi.LinkKind.L3),  # ARPHRD_TUNNEL
        (769, "ip6tnl", False, abi.LinkKind.L3),  # ARPHRD_TUNNEL6
        (776, "sit", False, abi.LinkKind.L3),
        (823, "ip6gre", False, abi.LinkKind.L3),
    ],
)
def test_link_kind(
    link_type: int, info_kind: str | None, external: bool, want: abi.LinkKind
) -> None:
    """L3 by link type (no Ethernet header), external overlays by IFLA_INFO_KIND,
    else Ethernet."""
    assert link_kind(link_type, info_kind, external) == want

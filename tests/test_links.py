"""links.link_kind: what an interface's frames carry, from its netlink
attributes (no root: the function reads numbers and names only)."""

from __future__ import annotations

import pytest

from lasthop import abi
from lasthop.links import link_kind


@pytest.mark.parametrize(
    ("link_type", "info_kind", "want"),
    [
        (1, None, abi.LinkKind.ETHERNET),  # ARPHRD_ETHER: a NIC, veth, tap
        (1, "veth", abi.LinkKind.ETHERNET),
        (1, "gretap", abi.LinkKind.ETHERNET),  # GRE carrying Ethernet: an Ethernet link
        (1, "vxlan", abi.LinkKind.VXLAN),
        (1, "geneve", abi.LinkKind.GENEVE),
        (0xFFFE, "tun", abi.LinkKind.L3),  # ARPHRD_NONE: tun in IFF_TUN mode
        (0xFFFE, "wireguard", abi.LinkKind.L3),
        (0xFFFE, "xfrm", abi.LinkKind.L3),
        (778, "gre", abi.LinkKind.L3),  # ARPHRD_IPGRE
        (768, "ipip", abi.LinkKind.L3),  # ARPHRD_TUNNEL
        (769, "ip6tnl", abi.LinkKind.L3),  # ARPHRD_TUNNEL6
        (776, "sit", abi.LinkKind.L3),
        (823, "ip6gre", abi.LinkKind.L3),
    ],
)
def test_link_kind(link_type: int, info_kind: str | None, want: abi.LinkKind) -> None:
    """L3 by link type (no Ethernet header), overlays by IFLA_INFO_KIND, else Ethernet."""
    assert link_kind(link_type, info_kind) == want

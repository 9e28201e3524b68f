"""lasthop.endpoint writes an address with its port the one way the CLI, the
API and the lab show it."""

from __future__ import annotations

from lasthop.endpoint import format_endpoint


def test_ipv4_address_and_port_join_with_a_colon() -> None:
    assert format_endpoint("192.0.2.1", 80) == "192.0.2.1:80"


def test_ipv6_address_goes_in_brackets() -> None:
    assert format_endpoint("2001:db8::1", 443) == "[2001:db8::1]:443"


def test_port_is_written_as_given() -> None:
    assert format_endpoint("2001:db8::1", "80,443") == "[2001:db8::1]:80,443"

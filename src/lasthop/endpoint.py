"""How lasthop writes an address with its port, everywhere it shows one:
``192.0.2.1:80``, and an IPv6 address in brackets, ``[2001:db8::1]:80``."""

from __future__ import annotations

__all__ = ["format_endpoint", "format_flow"]


def format_endpoint(addr: object, port: object) -> str:
    """*addr*:*port*; an IPv6 address (one with a colon) goes in brackets.

    *port* may be any text (``"80,443"``): it is written as given."""
    text = str(addr)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def format_flow(proto: str, src: str, sport: int, dst: str, dport: int) -> str:
    """One direction of a connection: ``tcp 192.0.2.1:40000 -> 10.0.0.11:80``;
    an ICMP echo by its identifier (*sport*): ``icmp echo 192.0.2.1 -> 10.0.0.11 id 7``."""
    if proto == "icmp":
        return f"icmp echo {src} -> {dst} id {sport}"
    return f"{proto} {format_endpoint(src, sport)} -> {format_endpoint(dst, dport)}"

"""How lasthop writes an address with its port, everywhere it shows one:
``192.0.2.1:80``, and an IPv6 address in brackets, ``[2001:db8::1]:80``."""

from __future__ import annotations

__all__ = ["format_endpoint"]


def format_endpoint(addr: object, port: object) -> str:
    """*addr*:*port*; an IPv6 address (one with a colon) goes in brackets.

    *port* may be any text (``"80,443"``): it is written as given."""
    text = str(addr)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"

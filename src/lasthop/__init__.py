"""lasthop: per-connection routing for hosts that run virtual machines."""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing: `lasthop stats` goes without
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Config", "ConfigError", "Controller"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # lazy: `python -m lasthop.build` must not load libbpf or pyroute2
    if name in ("Config", "ConfigError"):
        from lasthop import config

        return getattr(config, name)
    if name == "Controller":
        from lasthop.controller import Controller

        return Controller
    raise AttributeError(name)

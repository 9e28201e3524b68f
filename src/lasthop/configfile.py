"""The config file as TOML, and where it puts an agent's pins — its `netns`
and `pin_root` — read without building the model.

The commands that only read or remove what `run` set up (show, stats, flush,
detach) need these two keys and no more, and loading pydantic with the whole
model (services, health checks) was most of their start-up (issue 8). A file
whose keys are all the config's and whose two values have the right type goes
the short way; anything else is left to :func:`lasthop.config.load`, so the
error names the key as `run` would.
"""

from __future__ import annotations

from pathlib import Path

from lasthop.errors import ConfigError

TYPE_CHECKING = False  # typing's, without importing typing (`lasthop stats --config`)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["KEYS", "Place", "place", "read"]

# Every top-level key lasthop.config.Config takes, by name and by alias
# (tests/test_config.py checks this against the model).
KEYS = frozenset(
    {
        "api",
        "api_socket",
        "api_socket_group",
        "api_tokens",
        "bridge",
        "bridge_zone",
        "expiry_interval",
        "fast_path",
        "health",
        "idle_timeout",
        "last_hop_names",
        "netns",
        "on_vm_down",
        "pending_in_place",
        "pending_table_size",
        "pending_table_size_v6",
        "peer_redirect",
        "pin_root",
        "relearn",
        "routed",
        "scope",
        "scope_default",
        "service",
        "services",
        "sync",
        "sync_cluster",
        "sync_host",
        "table_size",
        "table_size_v6",
        "tc_hook",
        "timeouts",
        "uplink",
        "uplinks",
        "vm_origin",
        "vm_origin_quota",
        "vm_port",
        "vm_ports",
    }
)


def read(path: Path) -> dict[str, Any]:
    """The TOML in *path*; ConfigError when it cannot be read or is not TOML."""
    import tomllib  # only with a file: `stats` without --config starts without it

    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


class Place:
    """Where an agent runs: its namespace (None: this one) and its pins' root
    (None: <bpffs>/lasthop). A plain class, not a dataclass: `lasthop stats
    --config` starts without dataclasses and inspect (lasthop.stats_cli)."""

    __slots__ = ("netns", "pin_root")

    def __init__(self, netns: str | None = None, pin_root: Path | None = None) -> None:
        self.netns = netns
        self.pin_root = pin_root

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Place):
            return NotImplemented
        return (self.netns, self.pin_root) == (other.netns, other.pin_root)

    def __hash__(self) -> int:
        return hash((self.netns, self.pin_root))

    def __repr__(self) -> str:
        return f"Place(netns={self.netns!r}, pin_root={self.pin_root!r})"


def place(path: Path | None) -> Place:
    """The `netns` and `pin_root` of the config at *path* (the defaults when None)."""
    if path is None:
        return Place()
    data = read(path)
    netns, pin_root = data.get("netns"), data.get("pin_root")
    if data.keys() <= KEYS and isinstance(netns, str | None) and isinstance(pin_root, str | None):
        return Place(netns, None if pin_root is None else Path(pin_root))
    from lasthop import config  # raises the model's ConfigError, naming the key

    cfg = config.load(path)
    return Place(cfg.netns, cfg.pin_root)

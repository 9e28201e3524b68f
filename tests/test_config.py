"""The TOML config: defaults, every error naming its key and the reason, and
command-line flags merged on top."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lasthop.config import Config, ConfigError, load, parse_hostport

FULL = """
netns = "host"
bridge = "br0"
bridge_zone = 3
routed = true
relearn = "first"
table_size = 65536
idle_timeout = 120
pin_root = "/sys/fs/bpf/custom"
api = "127.0.0.1:9180"
api_socket = "/run/lasthop/custom.sock"

[[uplink]]
name = "eth0"
zone = 1

[[uplink]]
name = "eth1.100"

[[vm_port]]
name = "tap0"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lasthop.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, text))
    return str(err.value)


def test_no_file_gives_the_defaults() -> None:
    """Without a file every key has its documented default."""
    cfg = load(None)
    assert cfg == Config()
    assert (cfg.netns, cfg.uplinks, cfg.vm_ports, cfg.bridge) == (None, [], [], None)
    assert (cfg.routed, cfg.relearn, cfg.table_size, cfg.idle_timeout) == (
        False,
        "latest",
        1_048_576,
        None,
    )
    assert (cfg.pending_table_size, cfg.vm_origin_quota, cfg.expiry_interval) == (None, 16384, 1.0)
    assert cfg.timeouts.tcp_established == 7440.0 and cfg.timeouts.tcp_syn == 60.0
    assert (cfg.bridge_zone, cfg.pin_root, cfg.api, cfg.api_socket) == (0, None, None, None)


def test_every_key_is_read(tmp_path: Path) -> None:
    """A file using every key loads into the same values."""
    cfg = load(_write(tmp_path, FULL))
    assert cfg.netns == "host" and cfg.bridge == "br0" and cfg.bridge_zone == 3
    assert [(i.name, i.zone) for i in cfg.uplinks] == [("eth0", 1), ("eth1.100", 0)]
    assert [(i.name, i.zone) for i in cfg.vm_ports] == [("tap0", 0)]
    assert cfg.routed and cfg.relearn == "first" and cfg.table_size == 65536
    assert cfg.idle_timeout == 120.0 and cfg.timeouts.tcp_established == 120.0
    assert cfg.pin_root == Path("/sys/fs/bpf/custom")
    assert cfg.api == "127.0.0.1:9180" and cfg.api_socket_path("host") == Path(
        "/run/lasthop/custom.sock"
    )


def test_docs_example_is_valid(tmp_path: Path) -> None:
    """The example TOML in docs/config.md loads."""
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    load(_write(tmp_path, example))


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[[uplink]]\nname = "eth0"\nzone = -1\n', "uplink[0].zone", "greater than or equal to 0"),
        (
            '[[uplink]]\nname = "eth0"\n[[uplink]]\nname = "eth1"\nzone = 70000\n',
            "uplink[1].zone",
            "less than or equal to 65535",
        ),
        ('[[uplink]]\nname = "eth0"\nzone = "red"\n', "uplink[0].zone", "valid integer"),
        ("[[uplink]]\nzone = 1\n", "uplink[0].name", "Field required"),
        (
            '[[vm_port]]\nname = "a-very-long-interface-name"\n',
            "vm_port[0].name",
            "at most 15 characters",
        ),
        (
            '[[uplink]]\nname = "eth0"\ncolour = "red"\n',
            "uplink[0].colour",
            "Extra inputs are not permitted",
        ),
        ('uplinx = "eth0"\n', "uplinx", "Extra inputs are not permitted"),
        ('relearn = "sometimes"\n', "relearn", "'latest' or 'first'"),
        ("table_size = 0\n", "table_size", "greater than or equal to 1"),
        ("table_size = 1000.5\n", "table_size", "valid integer"),
        ("idle_timeout = 0\n", "idle_timeout", "greater than 0"),
        ('routed = "yes please"\n', "routed", "valid boolean"),
        ('api = "localhost"\n', "api", "expected HOST:PORT"),
        ('api = "127.0.0.1:0"\n', "api", "expected HOST:PORT"),
        ('sync = "localhost:6379"\n', "sync", "expected redis://HOST:PORT/DB"),
        ('sync = "redis://localhost:6379/x"\n', "sync", "must be a number"),
        ('sync_cluster = "a b"\n', "sync_cluster", "should match pattern"),
        (
            '[[uplink]]\nname = "eth0"\nfollow_failover = true\n',
            "uplink[0]",
            "follow_failover needs firewall_addresses",
        ),
        (
            '[[uplink]]\nname = "eth0"\nfirewall_addresses = ["10.0.0.1/33"]\n',
            "uplink[0].firewall_addresses[0]",
            "not a valid IPv4 or IPv6 network",
        ),
        (
            '[[vm_port]]\nname = "tap0"\nfirewall_addresses = ["10.0.0.1"]\n',
            "vm_port",
            "tap0: follow_failover and firewall_addresses are for uplinks",
        ),
        ('[[uplink]]\nname = "eth0"\nlearn = "sometimes"\n', "uplink[0].learn", "valid boolean"),
        (
            '[[uplink]]\nname = "vx0"\nallow_endpoints = ["10.255.0.1/33"]\n',
            "uplink[0].allow_endpoints[0]",
            "not a valid IPv4 or IPv6 network",
        ),
        (
            '[[uplink]]\nname = "vx0"\nallow_endpoints = ["10.255.0.1"]\n'
            'deny_endpoints = ["10.255.0.3"]\n',
            "uplink[0]",
            "allow_endpoints and deny_endpoints: give one list, not both",
        ),
        (
            '[[vm_port]]\nname = "tap0"\ndeny_endpoints = ["10.255.0.3"]\n',
            "vm_port",
            "tap0: allow_endpoints and deny_endpoints are for tunnel uplinks",
        ),
        ('[[vm_port]]\nname = "tap0"\nlearn = false\n', "vm_port", "tap0: learn is for uplinks"),
        (
            "".join(f'[[uplink]]\nname = "e{n}"\nlearn = false\n' for n in range(64)),
            "",
            "scope: at most 63 rules, uplinks with learn = false counted",
        ),
        ('[[vm_port]]\nname = "tap0"\nmpls = true\n', "vm_port", "tap0: mpls is for uplinks"),
        (
            '[[uplink]]\nname = "eth0"\npeer_redirect = false\n',
            "uplink",
            "eth0: peer_redirect is for VM ports",
        ),
        ('[[uplink]]\nname = "eth0"\nmpls = "maybe"\n', "uplink[0].mpls", "valid boolean"),
    ],
)
def test_a_bad_value_names_its_key_and_the_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    """Each invalid value is reported as "<file>: key '<key>': <reason>"."""
    message = _error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'lasthop.toml'}: key '{key}': ")
    assert reason in message


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes give one line each."""
    lines = _error(tmp_path, 'relearn = "x"\ntable_size = 0\n').splitlines()
    assert [line.split("'")[1] for line in lines] == ["relearn", "table_size"]


def test_invalid_toml_says_so_with_the_position(tmp_path: Path) -> None:
    """A syntax error names the file, "not valid TOML", and the line."""
    message = _error(tmp_path, 'uplink = [\n"eth0"\nrouted = true\n')
    assert message.startswith(f"{tmp_path / 'lasthop.toml'}: not valid TOML: ")
    assert "line 3" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that does not exist is reported with the OS's reason."""
    with pytest.raises(ConfigError, match="nope.toml: cannot read: No such file or directory"):
        load(tmp_path / "nope.toml")


def test_unreadable_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission is reported with the OS's reason."""
    path = _write(tmp_path, "routed = true\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: fail the read as it fails for anyone else

        def denied(self: Path, *args: object, **kwargs: object) -> str:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

        monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match="cannot read: Permission denied"):
        load(path)


def test_a_directory_is_a_config_error(tmp_path: Path) -> None:
    """A directory given as the config file cannot be read (works as root, too)."""
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load(tmp_path)


def test_flags_merge_over_the_file(tmp_path: Path) -> None:
    """Given flags replace file values; None keeps them; interface lists are added to, without
    repeating a name the file already has."""
    cfg = load(_write(tmp_path, FULL)).merged(
        netns=None,
        uplinks=("eth0", "eth2"),
        vm_ports=(),
        bridge="br1",
        routed=None,
        relearn="latest",
        table_size=None,
        idle_timeout=5.0,
        api=None,
        api_socket="",
    )
    assert [(i.name, i.zone) for i in cfg.uplinks] == [("eth0", 1), ("eth1.100", 0), ("eth2", 0)]
    assert [i.name for i in cfg.vm_ports] == ["tap0"]
    assert (cfg.netns, cfg.bridge, cfg.routed, cfg.relearn) == ("host", "br1", True, "latest")
    assert (cfg.table_size, cfg.idle_timeout, cfg.api) == (65536, 5.0, "127.0.0.1:9180")
    assert cfg.api_socket_path("host") is None  # "" = no unix socket


def test_a_bad_flag_names_the_command_line(tmp_path: Path) -> None:
    """A flag value the file would not accept either is reported against the command line."""
    with pytest.raises(
        ConfigError, match="command line: key 'table_size': .*greater than or equal to 1"
    ):
        Config().merged(table_size=0)


def test_api_socket_defaults_to_the_netns_name() -> None:
    """Without api_socket the API listens on /run/lasthop/<netns>.sock."""
    assert Config().api_socket_path("lab-host") == Path("/run/lasthop/lab-host.sock")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:9180", ("127.0.0.1", 9180)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_hostport(text: str, parsed: tuple[str, int]) -> None:
    """HOST:PORT splits at the last colon; IPv6 hosts come in brackets."""
    assert parse_hostport(text) == parsed


def test_sync_takes_a_redis_url_or_a_unix_socket(tmp_path: Path) -> None:
    """`sync` accepts redis://HOST:PORT/DB and unix:///PATH; the cluster defaults to "default"."""
    cfg = load(_write(tmp_path, 'sync = "redis://10.0.0.9:6379/2"\n'))
    assert (cfg.sync, cfg.sync_cluster, cfg.sync_host) == (
        "redis://10.0.0.9:6379/2",
        "default",
        None,
    )
    assert load(_write(tmp_path, 'sync = "unix:///run/redis.sock?db=0"\n')).sync


def test_an_uplink_that_does_not_learn_is_a_pass_rule_ahead_of_the_scope_rules(
    tmp_path: Path,
) -> None:
    """learn = false on eth1 puts "pass uplink eth1" before [[scope]]; the data
    path then matches new connections (F_SET_SCOPE) though no rule is written."""
    cfg = load(
        _write(
            tmp_path,
            '[[uplink]]\nname = "eth0"\n[[uplink]]\nname = "eth1"\nlearn = false\n'
            '[[scope]]\naction = "pass"\nproto = "udp"\n',
        )
    )
    assert [r.describe() for r in cfg.scope_rules()] == ["pass uplink eth1", "pass proto udp"]
    assert cfg.scoped()
    plain = load(_write(tmp_path, '[[uplink]]\nname = "eth0"\n'))
    assert plain.scope_rules() == [] and not plain.scoped()


def test_endpoint_lists_take_addresses_and_prefixes_of_both_families(tmp_path: Path) -> None:
    cfg = load(
        _write(
            tmp_path,
            '[[uplink]]\nname = "vx0"\nallow_endpoints = ["10.255.0.1", "fd00:ff::/64"]\n',
        )
    )
    assert [str(n) for n in cfg.uplinks[0].allow_endpoints] == ["10.255.0.1/32", "fd00:ff::/64"]
    assert cfg.lists_endpoints()
    assert not load(_write(tmp_path, '[[uplink]]\nname = "vx0"\n')).lists_endpoints()

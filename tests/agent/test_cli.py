"""The command line's exit codes: 0 ok, 1 kernel or runtime failure, 2 usage,
config or unknown interface/namespace, 3 nothing attached. In-process with
click's CliRunner (the test thread returns to its own namespace after)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agentlib import BPFFS, Sandbox, back_to_own_netns
from lasthop.cli import EXIT_FAILURE, EXIT_NOT_ATTACHED, EXIT_USAGE, cli
from lasthop.config import Config, Interface
from lasthop.controller import Controller
from lasthop.datapath import Pins


def invoke(*args: str) -> Result:
    with back_to_own_netns():
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- 2: usage and config, no kernel needed ------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["run", "--no-such-flag"],
        ["run", "--relearn", "sometimes"],
        ["run", "--table-size", "many"],
        ["show", "--limit", "-1"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    """Unknown commands, flags and badly typed values exit 2."""
    assert invoke(*args).exit_code == EXIT_USAGE


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    """A config error exits 2 with "config error:" and the key."""
    path = tmp_path / "bad.toml"
    path.write_text('[[uplink]]\nname = "eth0"\nzone = -1\n')
    result = invoke("run", "--config", str(path))
    assert result.exit_code == EXIT_USAGE
    assert _one_line(result.stderr).startswith(f"config error: {path}: key 'uplink[0].zone':")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = invoke("run", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == EXIT_USAGE
    assert "cannot read: No such file or directory" in _one_line(result.stderr)


def test_bad_flag_value_exits_2() -> None:
    """A flag the config model rejects (here --api without a port) is a config error too."""
    result = invoke("run", "--uplink", "eth0", "--api", "localhost")
    assert result.exit_code == EXIT_USAGE
    assert "command line: key 'api'" in _one_line(result.stderr)


@pytest.mark.parametrize("command", ["show", "stats", "flush", "detach"])
def test_unknown_netns_exits_2(command: str) -> None:
    """A --netns that does not exist exits 2 and names it."""
    result = invoke(command, "--netns", "lasthop-no-such-ns")
    assert result.exit_code == EXIT_USAGE
    assert "network namespace 'lasthop-no-such-ns' not found" in _one_line(result.stderr)


# -- with a namespace -------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.parametrize("command", ["show", "stats", "flush"])
def test_nothing_attached_exits_3(box: Sandbox, command: str) -> None:
    """show, stats and flush where no agent ever attached exit 3 and say so."""
    ns = box.host()
    result = invoke(command, "--netns", ns.name)
    assert result.exit_code == EXIT_NOT_ATTACHED
    assert "no data path pinned" in _one_line(result.stderr)
    assert "is `lasthop run` attached here?" in _one_line(result.stderr)


@pytest.mark.root
@pytest.mark.netns
def test_detach_where_nothing_is_attached_exits_0(box: Sandbox) -> None:
    """detach is idempotent: nothing to remove is not an error."""
    ns = box.host()
    result = invoke("detach", "--netns", ns.name)
    assert result.exit_code == 0
    assert "detached from no interface" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uplink", "nope0"], "uplink 'nope0' not found in this network namespace"),
        (["--uplink", "up0", "--vm-port", "nope1"], "VM port 'nope1' not found"),
        (["--uplink", "up0", "--bridge", "nobr"], "bridge 'nobr' not found"),
        (["--vm-port", "vm0"], "no uplink given"),
    ],
)
@pytest.mark.root
@pytest.mark.netns
def test_run_with_an_unknown_interface_exits_2(box: Sandbox, args: list[str], message: str) -> None:
    """run exits 2 naming an interface that is not there, and attaches nothing."""
    ns = box.host()
    result = invoke("run", "--netns", ns.name, "--api-socket", "", *args)
    assert result.exit_code == EXIT_USAGE
    assert message in _one_line(result.stderr)
    assert ns.tc_program("up0") is None


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_show_stats_flush_exit_0_when_attached(box: Sandbox) -> None:
    """With a data path pinned, show, stats and flush exit 0 and print their tables."""
    ns = box.host()
    with back_to_own_netns():
        c = Controller(ns.name)
        c.start(
            Config(
                uplinks=[Interface(name="up0")], vm_ports=[Interface(name="vm0")], table_size=1000
            )
        )
        c.close()
    shown = invoke("show", "--netns", ns.name)
    assert shown.exit_code == 0 and "0 connections" in shown.stdout
    stats = invoke("stats", "--netns", ns.name)
    # IPv4 and IPv6 together (IPv6: a quarter of IPv4's size, at least 1024)
    assert stats.exit_code == 0 and "confirmed: 0 of 2024 entries" in stats.stdout
    # pending: lh_pending4 1024, the in-place room (a quarter of it), lh_pending 1024
    assert "pending: 0 of 2304 entries" in stats.stdout and "0 evicted" in stats.stdout
    flushed = invoke("flush", "--netns", ns.name)
    assert flushed.exit_code == 0 and "flushed 0 entries" in flushed.stdout
    assert invoke("show", "--netns", ns.name, "--json").stdout.strip() == "[]"


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_table_size_conflict_exits_2(box: Sandbox) -> None:
    """A table_size other than the pinned table's is a config error: exit 2, nothing changed."""
    ns = box.host()
    with back_to_own_netns():
        c = Controller(ns.name)
        c.start(Config(uplinks=[Interface(name="up0")], table_size=1000))
        c.close()
    result = invoke(
        "run", "--netns", ns.name, "--uplink", "up0", "--table-size", "2000", "--api-socket", ""
    )
    assert result.exit_code == EXIT_USAGE
    # lh_conns4 with its default in-place room: a quarter of lh_pending4 (1024)
    assert "holds 1256 entries, the config asks for 2256" in _one_line(result.stderr)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_kernel_failure_exits_1(box: Sandbox, tmp_path: Path) -> None:
    """When the kernel refuses (here: pinning maps outside a bpffs), run exits 1 with the call
    and errno."""
    ns = box.host()
    config = tmp_path / "lasthop.toml"
    config.write_text(f'pin_root = "{tmp_path}/pins"\napi_socket = ""\n')
    result = invoke("run", "--config", str(config), "--netns", ns.name, "--uplink", "up0")
    assert result.exit_code == EXIT_FAILURE
    err = _one_line(result.stderr)
    assert "cannot load the data path" in err and "errno" in err
    assert ns.tc_program("up0") is None


@pytest.mark.root
@pytest.mark.netns
def test_second_agent_on_the_same_socket_exits_1(box: Sandbox) -> None:
    """If something already answers on the API socket (another agent), run exits 1 before
    attaching anything."""
    ns = box.host()
    ns.socket.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(ns.socket))
    listener.listen()
    try:
        result = invoke("run", "--netns", ns.name, "--uplink", "up0", "--vm-port", "vm0")
        assert result.exit_code == EXIT_FAILURE
        assert f"another lasthop agent answers on {ns.socket}" in _one_line(result.stderr)
        assert ns.tc_program("up0") is None and not ns.pins.exists()
        assert ns.socket.exists(), "the other agent's socket is left alone"
    finally:
        listener.close()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_a_stale_socket_is_replaced(box: Sandbox) -> None:
    """A socket file nobody listens on (an agent that was killed) does not stop run."""
    ns = box.host()
    ns.socket.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ns.socket))
    stale.close()
    agent = box.agent("--uplink", "up0", netns=ns)
    assert f"API on unix:{ns.socket}" in agent.ready_line


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_config_names_the_namespace_and_pin_root_for_every_command(
    box: Sandbox, tmp_path: Path
) -> None:
    """run, show, stats, flush and detach given the same --config find the same pins (its netns,
    its pin_root), where plain --netns finds nothing; detach leaves no pin root behind."""
    ns = box.host()
    pin_root = BPFFS / f"lht-custom-{ns.name}"
    config = tmp_path / "lasthop.toml"
    config.write_text(
        f'netns = "{ns.name}"\npin_root = "{pin_root}"\napi_socket = ""\n[[uplink]]\nname = "up0"\n'
    )
    try:
        box.agent("--config", str(config), netns=None).stop()
        assert (pin_root / ns.name / "lh_conns").exists()
        assert invoke("show", "--netns", ns.name).exit_code == EXIT_NOT_ATTACHED
        for command in ("show", "stats", "flush"):
            assert invoke(command, "--config", str(config)).exit_code == 0, command
        assert invoke("detach", "--config", str(config)).exit_code == 0
        assert not pin_root.exists(), "the pin root its last namespace left empty stays"
    finally:
        Pins(pin_root / ns.name).remove()

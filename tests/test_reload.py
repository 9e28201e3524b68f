"""lasthop.reload: which keys a reload applies live and which it keeps; and
the CLI's --version and shell completion (click's)."""

from __future__ import annotations

import os
import subprocess
import sys

from lasthop import reload
from lasthop.config import Config


def test_every_config_key_is_either_live_or_kept() -> None:
    assert set(Config.model_fields) == reload.LIVE | reload.KEPT
    assert not reload.LIVE & reload.KEPT


def test_live_keys_change_and_kept_keys_keep_their_running_value() -> None:
    old = Config(uplinks=[{"name": "up0"}], table_size=1024)
    new = Config(
        uplinks=[{"name": "up0"}, {"name": "up1"}],
        table_size=4096,
        timeouts={"tcp_established": 60},
    )
    p = reload.plan(old, new)
    assert p.changed == ["uplink", "timeouts"]
    assert p.kept == ["table_size"]
    assert p.config.table_size == 1024
    assert [i.name for i in p.config.uplinks] == ["up0", "up1"]
    assert p.config.timeouts.tcp_established == 60


def test_the_same_config_changes_nothing() -> None:
    p = reload.plan(Config(uplinks=[{"name": "up0"}]), Config(uplinks=[{"name": "up0"}]))
    assert (p.changed, p.kept) == ([], [])


def _lasthop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lasthop", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = _lasthop("--version")
    assert result.returncode == 0
    assert result.stdout.strip().endswith(f" {version('lasthop')}")


def test_click_shell_completion_completes_commands() -> None:
    """_LASTHOP_COMPLETE=bash_complete with COMP_WORDS "lasthop re" offers reload."""
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lasthop")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "_LASTHOP_COMPLETE": "bash_complete", "COMP_WORDS": "lasthop re",
             "COMP_CWORD": "1"},
    )  # fmt: skip
    assert "plain,reload" in result.stdout.splitlines()
    script = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lasthop")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "_LASTHOP_COMPLETE": "bash_source"},
    ).stdout
    assert "_lasthop_completion" in script

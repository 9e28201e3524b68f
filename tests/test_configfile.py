"""The config file read the short way (lasthop.configfile): the netns and
pin_root the read-only commands use are those the full model reads, and what
the short way cannot vouch for fails as the full model fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasthop import configfile
from lasthop.config import Config, ConfigError, load


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lasthop.toml"
    path.write_text(text)
    return path


def test_keys_are_the_models_top_level_keys() -> None:
    """KEYS is every name and alias Config takes, no more."""
    fields = Config.model_fields
    taken = set(fields) | {f.alias for f in fields.values() if f.alias}
    assert taken == configfile.KEYS


@pytest.mark.parametrize(
    "text",
    [
        "",
        'netns = "host"\n',
        'pin_root = "/sys/fs/bpf/custom"\n',
        'pin_root = ""\nnetns = ""\n',
        'netns = "h"\npin_root = "p"\ntable_size = 4096\n[[uplink]]\nname = "eth0"\n'
        '[[service]]\nname = "web"\naddress = "192.0.2.10"\n',
    ],
)
def test_place_is_what_the_model_reads(tmp_path: Path, text: str) -> None:
    """netns and pin_root read the short way equal the full model's."""
    path = _write(tmp_path, text)
    cfg = load(path)
    assert configfile.place(path) == configfile.Place(cfg.netns, cfg.pin_root)


def test_no_file_is_the_defaults() -> None:
    assert configfile.place(None) == configfile.Place(None, None)


@pytest.mark.parametrize(
    "text",
    [
        'pin-root = "/sys/fs/bpf/custom"\n',  # a key that is not the config's
        "netns = 1\n",
        'pin_root = ["/a"]\n',
        "netns = \n",  # not TOML
    ],
)
def test_what_the_short_way_cannot_vouch_for_fails_as_the_model_does(
    tmp_path: Path, text: str
) -> None:
    """An unknown key, a value of the wrong type or bad TOML: the model's ConfigError."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as expected:
        load(path)
    with pytest.raises(ConfigError) as got:
        configfile.place(path)
    assert str(got.value) == str(expected.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        configfile.place(tmp_path / "nope.toml")

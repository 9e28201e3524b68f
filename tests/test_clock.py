"""lasthop.clock: the kernel's HZ from its build config (/proc/config.gz, else
/boot/config-<release>), None when neither names one, and that figure against
the jiffies the pinned-clock program counts on this machine."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from lasthop import libbpf
from lasthop.clock import KNOWN_HZ, Clock, config_hz

CONFIG = b"# Linux kernel config\nCONFIG_HZ_PERIODIC=y\nCONFIG_HZ_%d=y\nCONFIG_HZ=%d\nCONFIG_X=y\n"


def _boot(folder: Path, text: bytes) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"config-{os.uname().release}").write_bytes(text)
    return folder


@pytest.mark.parametrize("hz", KNOWN_HZ)
def test_config_hz_reads_proc_config_gz(tmp_path: Path, hz: int) -> None:
    proc = tmp_path / "config.gz"
    proc.write_bytes(gzip.compress(CONFIG % (hz, hz)))
    assert config_hz(proc, tmp_path / "no-boot") == hz


def test_config_hz_falls_back_to_boot_config(tmp_path: Path) -> None:
    """No /proc/config.gz (a kernel without CONFIG_IKCONFIG_PROC): the one in /boot."""
    boot = _boot(tmp_path / "boot", CONFIG % (300, 300))
    assert config_hz(tmp_path / "missing.gz", boot) == 300


def test_config_hz_skips_a_broken_proc_config(tmp_path: Path) -> None:
    """A /proc/config.gz that is not gzip, or names no HZ, gives way to /boot's."""
    proc = tmp_path / "config.gz"
    boot = _boot(tmp_path / "boot", CONFIG % (1000, 1000))
    proc.write_bytes(b"not gzip")
    assert config_hz(proc, boot) == 1000
    proc.write_bytes(gzip.compress(b"CONFIG_X=y\n# CONFIG_HZ=250 is not set\n"))
    assert config_hz(proc, boot) == 1000


def test_config_hz_is_none_without_a_known_hz(tmp_path: Path) -> None:
    """Nothing readable, or an HZ the kernel does not offer: None (the agent measures)."""
    assert config_hz(tmp_path / "missing.gz", tmp_path / "no-boot") is None
    proc = tmp_path / "config.gz"
    proc.write_bytes(gzip.compress(CONFIG % (123, 123)))
    assert config_hz(proc, tmp_path / "no-boot") is None


@pytest.mark.root
@pytest.mark.bpf
def test_hz_agrees_with_the_jiffies_counted() -> None:
    """The HZ an agent stores (config, else measured) is the rate at which the
    data path's clock (lh_clock, test-run) advances on this kernel."""
    from lasthop.datapath import _object

    with libbpf.BpfObject(_object(), programs=["lh_clock"]) as obj:
        clock = Clock(obj.program("lh_clock").fd)
        assert clock.hz() == clock.measure_hz()

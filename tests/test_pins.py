"""Pins (lasthop.datapath): one folder per namespace under a pin root that
exists only while some namespace's pins are in it -- made by the first
create(), removed by the last remove(), never from under a concurrent
create(). Plain directories stand in for bpffs here (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasthop.datapath import Pins


def _pinned(pins: Pins, *names: str) -> None:
    pins.create()
    for name in names:
        pins.path(name).write_bytes(b"")


def test_create_makes_the_root_and_the_namespace_folder(tmp_path: Path) -> None:
    """create() makes the missing pin root and the namespace's folder in it."""
    pins = Pins(tmp_path / "lasthop" / "ns1")
    pins.create()
    assert pins.folder.is_dir() and pins.root == tmp_path / "lasthop"
    pins.create()  # again: nothing to do
    assert list(pins.root.iterdir()) == [pins.folder]


def test_the_last_remove_takes_the_root_with_it(tmp_path: Path) -> None:
    """remove() takes the namespace's pins and folder; the root stays while
    another namespace's pins are in it and goes with the last of them."""
    root = tmp_path / "lasthop"
    one, two = Pins(root / "ns1"), Pins(root / "ns2")
    _pinned(one, "lh_conns", "lh_clock")
    _pinned(two, "lh_conns")
    assert sorted(one.remove()) == ["lh_clock", "lh_conns"]
    assert not one.folder.exists() and list(root.iterdir()) == [two.folder]
    assert two.remove() == ["lh_conns"]
    assert not root.exists()
    assert two.remove() == []  # nothing left: nothing to do


def test_remove_takes_nested_folders(tmp_path: Path) -> None:
    """Folders inside the namespace's folder go too (deepest first)."""
    pins = Pins(tmp_path / "lasthop" / "ns1")
    _pinned(pins, "lh_conns")
    (pins.folder / "old" / "older").mkdir(parents=True)
    (pins.folder / "old" / "older" / "lh_hops").write_bytes(b"")
    assert sorted(pins.remove()) == ["lh_conns", "old", "old/older", "old/older/lh_hops"]
    assert not (tmp_path / "lasthop").exists()


def test_a_root_removed_between_the_two_mkdirs_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remove() of another namespace that takes the (then empty) root after
    create() made it, before it made its own folder, costs create() one more
    try, not a failure: the agent starting there still gets its folder."""
    pins = Pins(tmp_path / "lasthop" / "ns1")
    other = Pins(tmp_path / "lasthop" / "ns2")
    real_mkdir = Path.mkdir
    raced: list[Path] = []

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == pins.folder and not raced:
            raced.append(self)
            other.remove()  # the concurrent detach: the root is empty, so it goes
            assert not pins.root.exists()
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    pins.create()
    assert raced and pins.folder.is_dir()


def test_a_mount_point_root_is_never_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins straight in a bpffs mount (pin_root = the mount) leave the mount alone."""
    mount = tmp_path / "bpf"
    pins = Pins(mount / "lasthop-bench-1")
    _pinned(pins, "lh_conns")
    monkeypatch.setattr("lasthop.datapath.os.path.ismount", lambda p: Path(p) == mount)
    assert pins.remove() == ["lh_conns"]
    assert mount.is_dir() and not pins.folder.exists()

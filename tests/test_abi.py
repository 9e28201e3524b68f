"""lasthop.abi mirrors the data path's map ABI exactly: struct sizes, field
names, offsets and sizes, and the enums, as the compiled object's BTF states
them; the flag and size constants as the C preprocessor sees consts.h.

Needs clang and bpftool (scripts/setup installs both), not root: nothing is
loaded into the kernel.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lasthop import abi, build

BPFTOOL = shutil.which("bpftool") or "/usr/sbin/bpftool"


@pytest.fixture(scope="module")
def btf(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The object's BTF types by id."""
    if not Path(BPFTOOL).exists():
        pytest.skip("bpftool not found: run scripts/setup")
    try:
        obj = build.build(tmp_path_factory.mktemp("abi") / "lasthop.bpf.o")
    except build.BuildError as err:
        pytest.skip(str(err))
    out = subprocess.run(
        [BPFTOOL, "-j", "btf", "dump", "file", str(obj), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def named(btf: dict[int, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [t for t in btf.values() if t["kind"] == kind and t.get("name") == name]
    assert found, f"{kind} {name} not in the object's BTF"
    return found[0]


def resolve(btf: dict[int, dict[str, Any]], type_id: int) -> dict[str, Any]:
    """Through typedefs and qualifiers to the type that has a size."""
    t = btf[type_id]
    while t["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT"):
        t = btf[t["type_id"]]
    return t


def size_of(btf: dict[int, dict[str, Any]], type_id: int) -> int:
    t = resolve(btf, type_id)
    if t["kind"] == "ARRAY":
        return int(t["nr_elems"]) * size_of(btf, t["type_id"])
    return int(t["size"])


def shape(btf: dict[int, dict[str, Any]], type_id: int) -> tuple[int, ...]:
    """Array lengths, outermost first; () for a scalar."""
    t = resolve(btf, type_id)
    return (int(t["nr_elems"]), *shape(btf, t["type_id"])) if t["kind"] == "ARRAY" else ()


def ctypes_shape(ctype: Any) -> tuple[int, ...]:
    return (ctype._length_, *ctypes_shape(ctype._type_)) if hasattr(ctype, "_length_") else ()


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_struct_matches_btf(btf: dict[int, dict[str, Any]], name: str) -> None:
    """The mirror has the struct's size and, in order, its fields' names,
    offsets, sizes and array lengths."""
    struct = named(btf, "STRUCT", name)
    mirror = abi.STRUCTS[name]
    assert ctypes.sizeof(mirror) == struct["size"]
    want = [
        (m["name"], m["bits_offset"] // 8, size_of(btf, m["type_id"]), shape(btf, m["type_id"]))
        for m in struct["members"]
    ]
    have = [
        (f, getattr(mirror, f).offset, getattr(mirror, f).size, ctypes_shape(t))
        for f, t in mirror._fields_
    ]  # type: ignore[misc]
    assert have == want
    assert all(m["bits_offset"] % 8 == 0 for m in struct["members"]), "no bit fields in the ABI"


def test_every_map_key_and_value_struct_has_a_mirror(btf: dict[int, dict[str, Any]]) -> None:
    """No struct a map holds is missing from lasthop.abi.STRUCTS."""
    maps = named(btf, "DATASEC", ".maps")
    used = set()
    for var in maps["vars"]:
        definition = resolve(btf, btf[var["type_id"]]["type_id"])
        for member in definition["members"]:
            if member["name"] in ("key", "value"):
                target = resolve(btf, resolve(btf, member["type_id"])["type_id"])
                if target["kind"] == "STRUCT":
                    used.add(target["name"])
    assert used, "found no struct keys or values: the walk over .maps is broken"
    assert used <= set(abi.STRUCTS), f"no mirror for {sorted(used - set(abi.STRUCTS))}"


def test_counters_match_enum_lh_counter(btf: dict[int, dict[str, Any]]) -> None:
    """abi.Counter is enum lh_counter without its CNT_ prefix; CNT_MAX is abi.CNT_MAX."""
    values = {v["name"]: v["val"] for v in named(btf, "ENUM", "lh_counter")["values"]}
    assert values.pop("CNT_MAX") == abi.CNT_MAX
    assert {f"CNT_{c.name}": int(c) for c in abi.Counter} == values
    assert max(values.values()) < abi.CNT_MAX


def test_roles_match_enum_lh_role(btf: dict[int, dict[str, Any]]) -> None:
    values = {v["name"]: v["val"] for v in named(btf, "ENUM", "lh_role")["values"]}
    assert {f"ROLE_{r.name}": int(r) for r in abi.Role} == values


# Constants are #defines, which BTF does not carry: read them as clang's
# preprocessor defines them from consts.h, and compare those the mirror has.
_DEFINE = re.compile(r"#define (\w+) (.+)")


@pytest.fixture(scope="module")
def defines() -> dict[str, int]:
    try:
        clang = build._clang()
    except build.BuildError as err:
        pytest.skip(str(err))
    out = subprocess.run(
        [clang, "-dM", "-E", "-target", "bpf", str(build.BPF_DIR / "consts.h")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = {}
    for line in out.splitlines():
        m = _DEFINE.fullmatch(line.strip())
        if m and re.fullmatch(r"[\s\d()x<|A-Fa-f*+-]+", m.group(2)):
            values[m.group(1)] = int(eval(m.group(2), {"__builtins__": {}}))  # noqa: S307
    return values


MIRRORED_DEFINES = [
    "ETH_ALEN",
    "MAX_VLAN_TAGS",
    "MAX_IFACES",
    "FAMILY_V4",
    "FAMILY_V6",
    "MAX_SERVICES",
    "MAGLEV_SIZE",
    "MAGLEV_SEED",
]


def test_constants_match_consts_h(defines: dict[str, int]) -> None:
    """Every F_* flag and size constant of consts.h has the same value in the mirror,
    and every F_* flag of the mirror exists in consts.h."""
    flags_c = {k: v for k, v in defines.items() if k.startswith("F_")}
    flags_py = {k: v for k, v in vars(abi).items() if k.startswith("F_")}
    assert flags_py == flags_c
    for name in MIRRORED_DEFINES:
        assert getattr(abi, name) == defines[name], name

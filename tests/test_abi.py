"""lasthop.abi mirrors the data path's map ABI exactly: struct sizes, field
names, offsets and sizes, and the enums, as the compiled object's BTF states
them; and every constant of consts.h the Python side repeats (sizes, flags,
CNT_MAX), which consts.h declares as enum constants so that they reach the BTF.

Needs clang and bpftool (scripts/setup installs both), not root: nothing is
loaded into the kernel.
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import json
import pkgutil
import re
import shutil
import socket
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import lasthop
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


@pytest.mark.parametrize(
    ("mirror", "c_enum", "prefix", "maximum"),
    [
        (abi.State, "conn_state", "CS_", ("CS_MAX", abi.CS_MAX)),
        (abi.TableCounter, "lh_table_counter", "TC_", ("TC_MAX", abi.TC_MAX)),
        (abi.VmAddrOrigin, "vm_addr_origin", "VM_ADDR_", None),
        (abi.ChangeKind, "lh_change_kind", "CH_", None),
        (abi.ChangeTable, "lh_change_table", "CHT_", None),
        (abi.ScopeAction, "lh_scope_action", "SCOPE_", None),
        (abi.LinkKind, "lh_link_kind", "LINK_", None),
        (abi.FragVerdict, "lh_frag_verdict", "FRAG_", None),
        (abi.HopKind, "lh_hop_kind", "HOP_", None),
        (abi.Delivery, "lh_delivery", "DELIVER_", None),
    ],
)
def test_enums_match_btf(
    btf: dict[int, dict[str, Any]],
    mirror: type[enum.IntEnum],
    c_enum: str,
    prefix: str,
    maximum: tuple[str, int] | None,
) -> None:
    """abi.State, abi.TableCounter and abi.VmAddrOrigin are their C enums without
    the prefix; CS_MAX and TC_MAX are abi.CS_MAX and abi.TC_MAX, above every value."""
    values = {v["name"]: v["val"] for v in named(btf, "ENUM", c_enum)["values"]}
    if maximum is not None:
        name, value = maximum
        assert values.pop(name) == value
        assert max(values.values()) < value
    assert {f"{prefix}{m.name}": int(m) for m in mirror} == values


def test_roles_match_enum_lh_role(btf: dict[int, dict[str, Any]]) -> None:
    values = {v["name"]: v["val"] for v in named(btf, "ENUM", "lh_role")["values"]}
    assert {f"ROLE_{r.name}": int(r) for r in abi.Role} == values


# Every constant the agent mirrors is an enum constant in consts.h, kept in the
# object's BTF by struct lh_abi_enums (abi.h): #defines would leave no trace there.
CONST_ENUMS = (
    "lh_const",
    "lh_iface_flag",
    "lh_settings_flag",
    "lh_entry_flag",
    "lh_entry_flag2",
    "lh_hop_flag",
    "lh_endpoint_verdict",
)
# the kernel's numbers, which the C takes from its headers: checked against those
KERNEL_CONSTANTS = (
    "ETH_ALEN",
    "IFNAMSIZ",
    "IPPROTO_ICMP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "IPPROTO_ICMPV6",
)


@pytest.fixture(scope="module")
def c_constants(btf: dict[int, dict[str, Any]]) -> dict[str, int]:
    """The constants of consts.h the agent mirrors, by name, from the BTF."""
    values = {}
    for enum_name, bound in (
        ("lh_counter", "CNT_MAX"),
        ("conn_state", "CS_MAX"),
        ("lh_table_counter", "TC_MAX"),
    ):
        values[bound] = {v["name"]: v["val"] for v in named(btf, "ENUM", enum_name)["values"]}[
            bound
        ]
    for enum_name in CONST_ENUMS:
        values |= {v["name"]: v["val"] for v in named(btf, "ENUM", enum_name)["values"]}
    return values


def _int_constants(module: ModuleType) -> dict[str, int]:
    return {
        k: v for k, v in vars(module).items() if k.isupper() and type(v) is int
    }  # not bool, not IntEnum members


def test_every_c_constant_has_its_value_in_the_mirror(c_constants: dict[str, int]) -> None:
    """lasthop.abi has every constant of consts.h's mirrored enums, with the same
    value, and no constant of its own that the C lacks (besides the kernel's)."""
    mine = {k: v for k, v in _int_constants(abi).items() if k not in KERNEL_CONSTANTS}
    assert mine == c_constants


def test_no_module_keeps_a_drifted_copy_of_a_c_constant(c_constants: dict[str, int]) -> None:
    """A module of the package that names a C constant (MAX_IFINDEX, IFNAMSIZ, ...)
    has the C's value: a copy outside lasthop.abi cannot drift unnoticed."""
    known = c_constants | {k: getattr(abi, k) for k in KERNEL_CONSTANTS}
    drifted = []
    for info in pkgutil.walk_packages(lasthop.__path__, "lasthop."):
        if info.name == "lasthop.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, value in _int_constants(module).items():
            if name in known and value != known[name]:
                drifted.append(f"{info.name}.{name} = {value}, C has {known[name]}")
    assert not drifted


def test_kernel_constants_match_the_kernel_headers() -> None:
    """ETH_ALEN and IFNAMSIZ as linux/if_ether.h and linux/if.h define them; the
    IPPROTO_* numbers as the socket module (the C library's headers) has them."""
    try:
        clang = build._clang()
    except build.BuildError as err:
        pytest.skip(str(err))
    source = "#include <linux/if_ether.h>\n#include <linux/if.h>\n"
    out = subprocess.run(
        [clang, "-dM", "-E", "-target", "bpf", *build._multiarch_include(), "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    defines = dict(re.findall(r"^#define (\w+) (\d+)$", out, re.M))
    assert int(defines["ETH_ALEN"]) == abi.ETH_ALEN
    assert int(defines["IFNAMSIZ"]) == abi.IFNAMSIZ
    for name in KERNEL_CONSTANTS:
        if name.startswith("IPPROTO_"):
            assert getattr(abi, name) == getattr(socket, name), name

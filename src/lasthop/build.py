"""Compiles the BPF object (bpf/lasthop.c -> bpf/lasthop.bpf.o) with clang.

Run as ``python -m lasthop.build``; the loader calls :func:`ensure_object`,
which rebuilds only when the sources differ from those the object was built
from (their digest, written beside it: an installed wheel's files carry the
time of the install, not of the build, so times cannot tell). A wheel built
by ``pip wheel .`` carries the object and its digest (setup.py compiles it),
so an install needs no compiler.

The object is not built for one kernel: it includes only the kernel's UAPI
headers (the ``__sk_buff`` context, packet headers), its one kernel struct
(``struct bpf_map``) is read through CO-RE (``preserve_access_index``,
relocated by libbpf against the running kernel's BTF), and its kfunc
(``bpf_map_sum_elem_count``) is resolved by name at load. It loads on any
kernel with the features it uses (6.6+, x86-64 or arm64 alike: BPF bytecode).
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = BPF_DIR / "lasthop.c"
OBJECT = BPF_DIR / "lasthop.bpf.o"
DIGEST = BPF_DIR / "lasthop.bpf.sha256"  # of the sources OBJECT was built from


class BuildError(RuntimeError):
    """The BPF object could not be compiled."""


def _clang() -> str:
    for name in ("clang", "clang-16", "clang-14"):
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("clang not found: run scripts/setup (it installs clang, llvm, libbpf-dev)")


def _multiarch_include() -> list[str]:
    triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        platform.machine(), ""
    )
    path = Path("/usr/include") / triplet
    return [f"-I{path}"] if triplet and path.is_dir() else []


def build(
    output: Path = OBJECT, defines: dict[str, str] | None = None, source: Path = SOURCE
) -> Path:
    """Compiles *source* (the package's bpf/lasthop.c, or a scratch copy a
    bench script made) to *output*; *defines* become ``-D`` flags."""
    flags = [f"-D{k}={v}" for k, v in (defines or {}).items()]
    cmd = [
        _clang(), "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        *_multiarch_include(), *flags, "-c", str(source), "-o", str(output),
    ]  # fmt: skip
    digest = sources_digest()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"clang failed:\n{result.stderr}")
    if output == OBJECT and source == SOURCE and not defines:
        DIGEST.write_text(digest + "\n")
    return output


def sources_digest() -> str:
    """SHA-256 over the BPF sources' names and contents."""
    h = hashlib.sha256()
    for path in sorted([*BPF_DIR.glob("*.c"), *BPF_DIR.glob("*.h")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def is_current() -> bool:
    """Whether OBJECT exists and was built from the sources as they are now."""
    try:
        return OBJECT.exists() and DIGEST.read_text().strip() == sources_digest()
    except OSError:
        return False


def ensure_object() -> Path:
    """Returns the object, building it first if missing or built from other sources."""
    if not is_current():
        build()
    return OBJECT


def main() -> int:
    try:
        path = build()
    except BuildError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

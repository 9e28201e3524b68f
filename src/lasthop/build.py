"""Compiles the BPF object (bpf/lasthop.c -> bpf/lasthop.bpf.o) with clang.

Run as ``python -m lasthop.build``; the loader calls :func:`ensure_object`,
which rebuilds only when a source is newer than the object.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = BPF_DIR / "lasthop.c"
OBJECT = BPF_DIR / "lasthop.bpf.o"


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


def build(output: Path = OBJECT, defines: dict[str, str] | None = None) -> Path:
    """Compiles the object to *output*; *defines* become ``-D`` flags."""
    flags = [f"-D{k}={v}" for k, v in (defines or {}).items()]
    cmd = [
        _clang(), "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        *_multiarch_include(), *flags, "-c", str(SOURCE), "-o", str(output),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"clang failed:\n{result.stderr}")
    return output


def ensure_object() -> Path:
    """Returns the object, building it first if missing or older than a source."""
    sources = list(BPF_DIR.glob("*.c")) + list(BPF_DIR.glob("*.h"))
    newest = max(p.stat().st_mtime for p in sources)
    if not OBJECT.exists() or OBJECT.stat().st_mtime < newest:
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

"""What the measurement scripts beside this file share (they import it: a
script's own folder is first on sys.path): the BPF sources of a git
revision copied to a scratch folder and compiled there (bench-newconn,
bench-tunnel compare several builds in one run), and the kernel's run-time
statistics of lasthop's programs (bench-lab-ab, bench-lab-progs)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from lasthop import build

ROOT = Path(__file__).resolve().parent.parent
BPF = "src/lasthop/bpf"


def bpf_sources(rev: str, into: Path) -> Path:
    """A scratch copy, at *into*, of the BPF sources of git revision *rev*
    (or of the work tree's: ``worktree``)."""
    if rev == "worktree":
        shutil.copytree(ROOT / BPF, into, ignore=shutil.ignore_patterns("*.o", "*.sha256"))
        return into
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, BPF], check=True,
                         capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into.parent / "x")  # our own git archive
    shutil.move(into.parent / "x" / BPF, into)
    shutil.rmtree(into.parent / "x")
    return into


def compile_bench(src: Path, out: Path, defines: tuple[str, ...] = ()) -> Path:
    """The scratch copy *src* compiled to *out* with the bench programs
    (LH_BENCH) and each of *defines* set to 1."""
    flags = {"LH_BENCH": "1", **{d: "1" for d in defines}}
    return build.build(out, flags, source=src / "lasthop.c")


def prog_stats() -> dict[tuple[int, str], tuple[int, int]]:
    """(id, name) -> (run_time_ns, run_cnt) of every loaded lh_ program
    (kernel.bpf_stats_enabled must be on for the times to move)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
    return {
        (p["id"], p.get("name", "")): (p.get("run_time_ns", 0), p.get("run_cnt", 0))
        for p in json.loads(out)
        if p.get("name", "").startswith("lh_")
    }

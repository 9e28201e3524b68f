"""python -m fuzz (with tests/ on PYTHONPATH, as root): runs the
differential fuzzer and prints cases per class and outcome, discrepancies
(each with its frame as hex and a scapy expression) and the time. Exit
status 1 when any case disagrees with the oracle."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .runner import PROGRAMS, Fuzzer, Result, build_object, sandbox


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    ap.add_argument("--cases", type=int, default=20_000, help="cases per program (20000)")
    ap.add_argument("--seed", type=int, default=13, help="the run's seed (13)")
    ap.add_argument("--program", choices=(*PROGRAMS, "both"), default="both")
    ap.add_argument("--case", type=int, help="run this one case only (from a report)")
    ap.add_argument("--first", type=int, default=0, help="number of the first case (0)")
    ap.add_argument("--show", type=int, default=5, help="discrepancies printed in full (5)")
    ap.add_argument(
        "--broken", action="store_true", help="fuzz a build with one bounds check flipped"
    )
    ap.add_argument("--object", type=Path, help="fuzz this object (a test build) instead")
    args = ap.parse_args(argv)
    if args.cases < 1:
        ap.error("--cases: must be at least 1")
    programs = PROGRAMS if args.program == "both" else (args.program,)
    first, count = (args.case, 1) if args.case is not None else (args.first, args.cases)
    found = 0
    with tempfile.TemporaryDirectory() as tmp, sandbox() as (up, vm):
        obj = args.object or build_object(Path(tmp) / "fuzz.bpf.o", args.broken)
        fuzzer = Fuzzer(obj, up, vm)
        try:
            for program in programs:
                result = fuzzer.run(program, args.seed, count, first, progress=_progress)
                print(result.summary(), flush=True)
                for d in result.discrepancies[: args.show]:
                    print(d.report(), flush=True)
                found += result.found
        finally:
            fuzzer.close()
    return 1 if found else 0


def _progress(result: Result) -> None:
    print(
        f"  ... {result.program}: {result.cases} cases, {result.seconds:.0f} s, "
        f"{result.found} discrepancies",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

"""The `lasthop` console script and `python -m lasthop`: `stats` goes the
short way (lasthop.stats_cli: no click, ~half the start-up), everything
else, and anything that short way does not take, to the click CLI.

However a command ends (return, SystemExit from click, an exception), the
objects it leaves are frozen first (gc.freeze): the interpreter's last
collection at exit then skips them. After FastAPI's and pydantic's imports
(`lasthop run`, `detach`, `service`) that collection took ~0.2 s of every
exit for nothing: the process is ending, and what it holds open (maps,
sockets, links) the kernel closes with it; standard streams and logging
are still flushed as before."""

from __future__ import annotations

import gc
import sys


def main() -> int:
    try:
        if sys.argv[1:2] == ["stats"]:
            from lasthop import stats_cli

            code = stats_cli.main(sys.argv[2:])
            if code is not None:
                return code
        from lasthop.cli import main as click_main

        return click_main()
    finally:
        gc.freeze()

"""The `lasthop` console script and `python -m lasthop`: `stats` goes the
short way (lasthop.stats_cli: no click, ~half the start-up), everything
else, and anything that short way does not take, to the click CLI."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["stats"]:
        from lasthop import stats_cli

        code = stats_cli.main(sys.argv[2:])
        if code is not None:
            return code
    from lasthop.cli import main as click_main

    return click_main()

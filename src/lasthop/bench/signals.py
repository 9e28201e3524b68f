"""Stop signals that unwind a bench like Ctrl-C, in the bench's process only."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["stop_signals_interrupt"]


@contextmanager
def stop_signals_interrupt(*signums: int) -> Iterator[None]:
    """While inside, *signums* raise KeyboardInterrupt, so a bench's clean-up
    (namespaces, pins, the agent) runs as on Ctrl-C.

    Only in this process: pyroute2 forks helper children to enter a namespace
    and stops them with SIGTERM. A child that inherited a raising handler would
    skip its os._exit and go on running our caller's code (a whole test suite,
    once) inside the bench's namespace; such a child exits at once instead."""
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

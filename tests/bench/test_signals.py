"""stop_signals_interrupt: the bench's process unwinds, a forked child dies.

The child case is the CI failure it was written for: pyroute2 forks to enter a
namespace and stops the child with SIGTERM; a child that raised instead went on
running the rest of the test suite inside the bench's namespace."""

from __future__ import annotations

import os
import signal

import pytest

from lasthop.bench.signals import stop_signals_interrupt


def test_the_owner_gets_keyboard_interrupt_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with (
        pytest.raises(KeyboardInterrupt, match="signal 15"),
        stop_signals_interrupt(signal.SIGTERM),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # a point where the handler has run
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_forked_child_exits_instead_of_running_the_callers_code() -> None:
    read, write = os.pipe()
    ready_r, ready_w = os.pipe()
    with stop_signals_interrupt(signal.SIGTERM):
        pid = os.fork()
        if pid == 0:  # the child: what pyroute2's wrapper does, minus its work
            os.close(read)
            try:
                os.write(ready_w, b"r")
                while True:
                    signal.pause()
            except BaseException:
                os.write(write, b"escaped")  # it would go on with the caller's code
            os._exit(0)
        os.close(write)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.read(read, 100) == b""
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
    os.close(read)
    os.close(ready_r)

"""lasthop.logs: a change of state is one line with its fields, as text or
JSON; under systemd's journal the text carries no timestamp."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lasthop.logs import event, setup

log = logging.getLogger("lasthop.test")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_carry_the_time_the_level_and_the_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup("text", "info", out)
    event(log, "attach", role="uplink", interface="up0", ifindex=3, note="two words")
    line = out.getvalue().strip()
    assert line.endswith(' INFO attach role=uplink interface=up0 ifindex=3 note="two words"'), line
    assert line[:4].isdigit()  # the timestamp first


def test_json_lines_are_one_object_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup("json", "info", out)
    event(log, "flush", removed=12)
    log.warning("plain %s", "message")
    log.debug("not shown")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first.pop("ts") > 0
    assert first == {"level": "info", "event": "flush", "removed": 12}
    assert second["message"] == "plain message" and second["level"] == "warning"


def test_under_the_journal_text_has_no_timestamp_but_the_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM naming stderr's device:inode (as systemd sets it) drops the
    time: the journal stamps each line itself, and reads the level from <N>."""
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup("text", "info", stream)
        event(log, "reload", changed="timeouts")
        log.warning("careful")
        stream.seek(0)
        assert stream.read().splitlines() == ["<6>reload changed=timeouts", "<4>careful"]


def test_a_journal_stream_of_another_file_keeps_the_timestamp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    out = io.StringIO()
    setup("text", "info", out)
    log.info("x")
    assert out.getvalue().split()[2:] == ["INFO", "x"]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json, got 'xml'"):
        setup("xml")

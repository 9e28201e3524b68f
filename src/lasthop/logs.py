"""lasthop's log lines: text or JSON, one line per change of state.

A change of state (an interface attached or forgotten, a reload, a flush, a
service changed, a VM's health, a write through the API) is logged with
:func:`event`: a name and its fields. In text the line is the name then
``key=value`` pairs; in JSON one object per line. Other messages (warnings,
errors) are plain lines, or objects with a ``message`` field.

Under systemd (stderr is the journal, ``JOURNAL_STREAM`` names it) text lines
carry no timestamp and no level word of their own: the journal records both.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, TextIO

__all__ = ["FORMATS", "LEVELS", "event", "setup", "under_journal"]

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
_FIELDS = "lasthop_fields"  # the LogRecord attribute event() stores its fields in
_EVENT = "lasthop_event"
# the journal's priority prefix (sd-daemon(3)): the journal reads the level from it
_PRIORITY = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}


def under_journal(stream: TextIO) -> bool:
    """Whether *stream* is the journal's: JOURNAL_STREAM is "DEV:INODE" of it."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def _value(v: object) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return json.dumps(text) if (not text or any(c in text for c in ' ="')) else text


class TextFormatter(logging.Formatter):
    """``[time] LEVEL message key=value ...``; under the journal ``<prio>message key=value``."""

    def __init__(self, journal: bool) -> None:
        super().__init__("%(message)s" if journal else "%(asctime)s %(levelname)s %(message)s")
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        if fields:
            line += " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if self.journal:
            line = _PRIORITY.get(record.levelno, "<6>") + line
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (unless under the journal), level, event or message, fields."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {} if self.journal else {"ts": round(record.created, 3)}
        out["level"] = record.levelname.lower()
        name = getattr(record, _EVENT, None)
        if name is not None:
            out["event"] = name
        else:
            out["message"] = record.getMessage()
        out.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(fmt: str = "text", level: str = "warning", stream: TextIO | None = None) -> None:
    """Configures the "lasthop" and the root logger: *fmt* text|json, *level* by name."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = stream or sys.stderr
    journal = under_journal(out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def event(logger: logging.Logger, name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    """One change of state: *name* (attach, reload, flush, ...) and its fields, on one line."""
    logger.log(level, name, extra={_EVENT: name, _FIELDS: fields})

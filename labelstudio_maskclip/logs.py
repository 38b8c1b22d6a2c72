"""Log output of every process (server workers, CLI, re-scoring): one record, one line.

Messages carry what clients send (task image URLs, task ids, error texts from image hosts). A newline in one
would start a line that reads like a record of its own; :class:`OneLineFormatter` escapes control characters
(and Unicode's line and paragraph separators) in the message, so a forged line cannot appear. Tracebacks keep
their lines: they follow the record's escaped first line.
"""

from __future__ import annotations

import logging

__all__ = ["FORMAT", "OneLineFormatter", "one_line", "configure"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, 0x85)}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with control characters and line separators written as backslash escapes."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """A formatter whose records' messages (after %-formatting with their arguments) are one line each."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = one_line(record.message)
        return super().formatMessage(record)


def configure(level: str) -> None:
    """The process's root logger: one-line records at ``level`` on stderr (``logging.basicConfig``'s place)."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=str(level).upper(), handlers=[handler])

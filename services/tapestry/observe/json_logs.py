"""Log records as one JSON object per line, for log collectors (``--log-format json``).

Each line holds ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and
``message``, plus ``exception`` (the formatted traceback) when the record carries one and
``stack`` when it carries a stack. A message that spans lines stays one JSON line: its
newlines are escaped, so a collector never splits a record.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def log_handler(log_format: LogFormat = "text", stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) as text lines or as JSON lines."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    return handler


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Log at ``level`` and above to stderr, as text lines or as JSON lines (the process's
    entry point: it leaves a root logger that already has handlers alone)."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)])

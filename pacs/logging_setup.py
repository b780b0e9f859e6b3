"""The log format of every `pacs` process: plain text, or JSON objects one per line (``PACS_LOG_FORMAT``).

A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``role`` (serve, api, scp,
worker, hl7, or cli for one-shot commands), ``process`` (pid), ``thread`` and, for an exception, ``exception``
(its traceback). uvicorn's and Celery's loggers go through the same handler (neither installs its own).

Log lines name objects by UID and peers by AE title and address, never patients: no patient name, ID, birth
date or accession number is logged (the audit trail is where who-saw-which-patient is kept).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"

_role = "cli"


def set_role(role: str) -> None:
    """Name this process in every later log line (and in ``pacs_process_info``)."""
    global _role
    _role = role


def current_role() -> str:
    return _role


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": _role,
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter_for(log_format: str) -> logging.Formatter:
    return JsonLinesFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(level: str, log_format: str) -> None:
    """Like ``logging.basicConfig``: with no handler on the root logger, one stderr handler in ``log_format``
    (text or json) and the level; otherwise (a second call, a test harness) plain stream handlers already there
    get the formatter and nothing else changes."""
    root = logging.getLogger()
    if not root.handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(formatter_for(log_format))
        root.addHandler(stream)
        root.setLevel(level.upper())
        return
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(formatter_for(log_format))

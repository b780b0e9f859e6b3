"""Operator maintenance of the archive: rebuild the index from the store (`pacs reindex`) and verify
the store against the index (`pacs check`).

Both walk everything, so they report progress through the small :class:`ProgressSink` interface
(the command line draws it with rich; tests and benchmarks pass nothing).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class ProgressSink(Protocol):
    """Receives progress: a phase starts (with a total when known), then advances."""

    def phase(self, name: str, total: int | None = None) -> None: ...

    def advance(self, count: int = 1, nbytes: int = 0) -> None: ...


class NoProgress:
    """A sink that shows nothing."""

    def phase(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, count: int = 1, nbytes: int = 0) -> None:
        pass


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; SQLite hands back naive values that were stored as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

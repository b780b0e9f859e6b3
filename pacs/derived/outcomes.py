"""How a derived-task handler tells its runner what happened, besides returning a note."""

from __future__ import annotations

from dataclasses import dataclass


class TransientError(Exception):
    """A dependency is down; the task should run again later."""


class Deferred(Exception):
    """The work cannot be done yet (more input is expected): retry later, not a failure."""


@dataclass(frozen=True)
class Completed:
    """A handler's result when it marked its row done itself, atomically with its last check."""

    note: str = ""

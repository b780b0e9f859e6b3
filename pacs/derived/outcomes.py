"""How a derived-task handler tells its runner what happened, besides returning a note."""

from __future__ import annotations

from dataclasses import dataclass


class TransientError(Exception):
    """A dependency is down; the task should run again later.

    ``attempts`` is the row's attempt count after this one (0 when unknown): the backoff follows it rather
    than one broker message's retry count, since the relay's sweep may publish a task again as a new message.
    """

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


class Deferred(Exception):
    """The work cannot be done yet (more input is expected): retry later, not a failure."""


@dataclass(frozen=True)
class Completed:
    """A handler's result when it marked its row done itself, atomically with its last check."""

    note: str = ""

"""One vocabulary for the archive's job tables, and one retry rule.

Five tables hold work that outlives a request and is retried until it succeeds or gives up: derived tasks
(``derived_task``), forwarding (``forward_job``), storage-commitment reports (``commitment_request``), HL7
results (``hl7_outbound``) and the reconciliation queue. Each uses a subset of :class:`JobState`; the values
are the strings stored in the ``state`` columns (a :class:`~enum.StrEnum` compares equal to its string, so
rows written before this module existed read the same).

Leases and owners differ per table (a derived task is held by a registered process, a forward or HL7 job by a
lease time) and stay with the table's own module; what is shared is the state names, the backoff after a
failed attempt and reading timestamps back in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class JobState(StrEnum):
    """Where a queued job is. Not every table uses every state."""

    PENDING = "pending"  # waiting for its turn (or for its backoff to pass)
    QUEUED = "queued"  # published to a broker or an in-process pool, not started (derived tasks)
    RUNNING = "running"  # claimed by a live process (derived tasks)
    DONE = "done"  # finished: built, sent, acknowledged
    SENT = "sent"  # delivered and acknowledged by the peer (forwarding, HL7 results)
    REPORTED = "reported"  # the requester took the storage-commitment N-EVENT-REPORT (commitment reports)
    FAILED = "failed"  # gave up after the configured attempts; an operator's retry makes it pending again


def retry_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Wait after the ``attempts``-th failed attempt: base, 2×base, 4×base, … capped at ``max_s``."""
    return min(max_s, base_s * 2 ** min(max(attempts - 1, 0), 40))


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a job gets and the backoff between them; a sender's config extends it with its own
    fields (poll interval, lease, batch size), so the rule after a failed attempt is written once."""

    max_attempts: int = 20
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0

    def delay(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failed attempt (:func:`retry_delay`)."""
        return retry_delay(attempts, self.retry_base_s, self.retry_max_s)

    def after_failure(self, attempts: int, now: datetime) -> dict[str, object]:
        """The job row's new values after its ``attempts``-th failed attempt: the count, and then either
        :attr:`JobState.FAILED` (that was the last attempt) or when to try again (``next_attempt_at``)."""
        if attempts >= self.max_attempts:
            return {"attempts": attempts, "state": JobState.FAILED}
        return {"attempts": attempts, "next_attempt_at": now + timedelta(seconds=self.delay(attempts))}


def utcnow() -> datetime:
    """The current time, aware, in UTC (what every job table stores)."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """A stored timestamp in UTC: SQLite returns naive datetimes (stored in UTC), PostgreSQL aware ones in its
    session's zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

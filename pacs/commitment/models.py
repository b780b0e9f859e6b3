"""Index table of Storage Commitment requests: one row per Transaction UID (PS3.4 Annex J).

A row is written when the N-ACTION is accepted and is the report's queue: the background
reporter (:class:`pacs.commitment.service.CommitmentReporter`) decides the result once, keeps it in
``result``, and sends the N-EVENT-REPORT until the requester takes it. A restart between the
N-ACTION and the report therefore loses nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pacs.db.models import UID, Base, QueuedJobColumns
from pacs.jobs import JobState

# states (``storage_commitment.state``): the job vocabulary of pacs.jobs, and one of this table's own
PENDING = JobState.PENDING  # a report is due (at ``next_attempt_at``)
REPORTED = JobState.REPORTED  # the requester took the N-EVENT-REPORT
FAILED = JobState.FAILED  # gave up: unregistered requester, or every attempt failed


class StorageCommitment(QueuedJobColumns, Base):
    """One storage commitment transaction and the state of its N-EVENT-REPORT."""

    __tablename__ = "storage_commitment"
    __table_args__ = (Index("ix_storage_commitment_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, unique=True)
    requesting_ae: Mapped[str] = mapped_column(String(16))
    requesting_address: Mapped[str] = mapped_column(String(64), default="")  # host:port, for the log only
    # JSON [[sop_class_uid, sop_instance_uid], ...] as requested (duplicates removed, order kept)
    requested_refs: Mapped[str] = mapped_column(Text)
    # JSON {"success": [[class, instance], ...], "failed": [[class, instance, reason], ...]}; decided once
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    # state (pending, reported, failed), attempts, next_attempt_at, last_error, created_at, updated_at:
    # QueuedJobColumns
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

"""The reconciliation queue's table (:mod:`pacs.reconciliation.service`): objects received and kept, but not filed.

Like orders, these rows are primary data: ``pacs reindex`` walks ``dicom/`` only, and a held object lives
under ``reconciliation/{sha256}.dcm`` until someone of the study's facility resolves it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from pacs.db.models import UID, Base
from pacs.jobs import JobState

# states (``reconciliation_item.state``): waiting as in pacs.jobs, then how a person resolved it
PENDING = JobState.PENDING
FILED = "filed"  # filed into the study it names, as received
SEPARATED = "separated"  # filed as a study of its own (new Study/Series Instance UIDs)
DISCARDED = "discarded"  # removed from the store
STATES = (PENDING, FILED, SEPARATED, DISCARDED)

# why an object was held (``reconciliation_item.reason``)
SENDER = "sender"  # the sender may not write this study (another facility, or an unregistered peer)
PATIENT = "patient"  # its Patient ID / issuer is not the study's (or the order's) patient
UNTRUSTED_FIRST = "untrusted-first"  # an unregistered peer's object, moved out when a trusted exam claimed the UID
REASONS = (SENDER, PATIENT, UNTRUSTED_FIRST)


class ReconciliationItem(Base):
    """One held object: what it claims (UIDs, patient), what the study expected, who sent it, and its fate."""

    __tablename__ = "reconciliation_item"
    __table_args__ = (Index("ix_reconciliation_item_queue", "facility", "state", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    facility: Mapped[str] = mapped_column(String(64), default="")  # whose queue: the study's facility
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    expected_patient_id: Mapped[str] = mapped_column(String(64), default="")
    expected_issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    object_key: Mapped[str] = mapped_column(String(400))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    transport: Mapped[str] = mapped_column(String(16), default="")
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    source_address: Mapped[str] = mapped_column(String(64), default="")
    source_user: Mapped[str] = mapped_column(String(128), default="")
    source_facility: Mapped[str] = mapped_column(String(64), default="")
    source_trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_by: Mapped[str] = mapped_column(String(128), default="")
    resolution_note: Mapped[str] = mapped_column(Text, default="")
    resolved_study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

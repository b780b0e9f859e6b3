"""The tables of study management: rejected instances (IHE IOCM) and the rejection notes that rejected them.

A rejected instance leaves the ``instance`` table: every query and retrieve path reads that table, so a
rejection takes effect everywhere at once without a condition in each of them. Its row moves here with what a
restore needs to put it back (the instance row's columns as JSON in ``snapshot``); its stored object stays in
the store under its ``dicom/`` key until it is deleted (:mod:`pacs.studies.deletion`). Series and study rows
stay, with their counts lowered: a series or study with no current instance is hidden from every query path.

Both tables are derived data like the rest of the index: the rejection notes are stored objects (Key Object
Selection documents with a rejection title, ours or received), and ``pacs reindex`` rebuilds these rows from them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from pacs.db.models import UID, Base

# IHE IOCM rejection reasons: the API's names and the KOS document titles (CID 7011, scheme DCM)
QUALITY = "quality"
PATIENT_SAFETY = "patient-safety"
INCORRECT_WORKLIST_ENTRY = "incorrect-worklist-entry"
RETENTION_EXPIRED = "retention-expired"
REASON_CODES: dict[str, tuple[str, str]] = {
    QUALITY: ("113001", "Rejected for Quality Reasons"),
    PATIENT_SAFETY: ("113037", "Rejected for Patient Safety Reasons"),
    INCORRECT_WORKLIST_ENTRY: ("113038", "Incorrect Modality Worklist Entry"),
    RETENTION_EXPIRED: ("113039", "Data Retention Policy Expired"),
}
REASON_BY_CODE: dict[str, str] = {code: reason for reason, (code, _meaning) in REASON_CODES.items()}


class RejectedInstance(Base):
    """One rejected SOP instance, hidden from every query and retrieve path until restored or deleted."""

    __tablename__ = "rejected_instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    facility: Mapped[str] = mapped_column(String(64), default="", index=True)  # the study's, for scoped lists
    reason: Mapped[str] = mapped_column(String(32))  # one of REASON_CODES
    note_sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)  # the rejection note that rejected it
    object_key: Mapped[str] = mapped_column(String(400))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    snapshot: Mapped[str] = mapped_column(Text, default="{}")  # the instance row's columns (JSON), for restore
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    rejected_by: Mapped[str] = mapped_column(String(128), default="")  # user, or the AE that sent the note


class RejectionNote(Base):
    """A stored rejection note (a KOS with an IOCM rejection title): made here or received from a modality."""

    __tablename__ = "rejection_note"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    reason: Mapped[str] = mapped_column(String(32))
    object_key: Mapped[str] = mapped_column(String(400))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    source: Mapped[str] = mapped_column(String(16), default="")  # api / dimse / stow / import / reindex
    created_by: Mapped[str] = mapped_column(String(128), default="")

"""Report tables: reports and their versions, study claims, key-image selections, and the HL7 outbound queue.

Like orders, these rows are primary data (a radiologist's words exist only here until they are
signed into an SR), so ``pacs reindex`` does not rebuild them: back them up with the database.
A report belongs to one study by its Study Instance UID, not by a foreign key to the derived
``study`` row, so reindexing never orphans a report.

Versions: version 1 is the first draft; it moves draft → preliminary → final in place (its text
changes only while draft or preliminary). An amendment is a new version (draft, with a reason)
that becomes ``amended`` when signed. A final or amended version never changes again.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pacs.db.models import UID, Base, QueuedJobColumns

# Report and version states.
DRAFT = "draft"
PRELIMINARY = "preliminary"
FINAL = "final"
AMENDED = "amended"
REPORT_STATES = (DRAFT, PRELIMINARY, FINAL, AMENDED)
SIGNED_STATES = (FINAL, AMENDED)


class Report(Base):
    """One study's report. ``status`` is the status of its newest version, except that a report whose
    amendment is still a draft stays ``final``/``amended`` (what was signed is what counts)."""

    __tablename__ = "report"
    __table_args__ = (Index("ix_report_study_status", "study_instance_uid", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    facility: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), default=DRAFT)
    current_version: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())

    versions: Mapped[list[ReportVersion]] = relationship(back_populates="report", order_by="ReportVersion.version",
                                                         cascade="all, delete-orphan")


class ReportVersion(Base):
    """One version of a report's text, who wrote it, and (once signed) who signed it and when."""

    __tablename__ = "report_version"
    __table_args__ = (UniqueConstraint("report_fk", "version", name="uq_report_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_fk: Mapped[int] = mapped_column(ForeignKey("report.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=DRAFT)
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    language: Mapped[str] = mapped_column(String(8), default="")
    author: Mapped[str] = mapped_column(String(128), default="")
    author_name: Mapped[str] = mapped_column(String(128), default="")
    amend_reason: Mapped[str] = mapped_column(Text, default="")
    preliminary_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    signed_by: Mapped[str] = mapped_column(String(128), default="")
    signed_by_name: Mapped[str] = mapped_column(String(128), default="")
    signed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")  # the SR made when it was signed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())

    report: Mapped[Report] = relationship(back_populates="versions")


class StudyClaim(Base):
    """A radiologist reading a study: at most one claim per study, so two do not read the same one."""

    __tablename__ = "study_claim"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    claimed_by: Mapped[str] = mapped_column(String(128))
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class KeyImageSelection(Base):
    """Key images a radiologist marked in a study, stored as a Key Object Selection document."""

    __tablename__ = "key_image_selection"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    kos_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    kos_series_instance_uid: Mapped[str] = mapped_column(UID)
    instances_json: Mapped[str] = mapped_column(Text, default="[]")  # [[series uid, sop uid], …]
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Hl7Outbound(QueuedJobColumns, Base):
    """One HL7 v2 message waiting for (or done with) delivery to one MLLP destination.

    Written in the transaction that signs a report, so a message is never lost when a process dies;
    the delivery loop sends it until the receiver answers ``AA``/``CA`` (``state`` ``sent``), with
    backoff, and marks it ``failed`` after the configured attempts (listed by ``pacs hl7 outbound``).
    """

    __tablename__ = "hl7_outbound"
    __table_args__ = (
        UniqueConstraint("destination", "report_fk", "report_version", name="uq_hl7_outbound"),
        Index("ix_hl7_outbound_queue", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))  # a name from PACS_HL7_DESTINATIONS
    message_type: Mapped[str] = mapped_column(String(16), default="ORU^R01")
    message_control_id: Mapped[str] = mapped_column(String(64), unique=True)
    report_fk: Mapped[int | None] = mapped_column(ForeignKey("report.id", ondelete="SET NULL"), nullable=True)
    report_version: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")  # ER7 text, segments separated by \r
    # state (pending, sent, failed), attempts, next_attempt_at, last_error, created_at, updated_at: QueuedJobColumns
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ack_code: Mapped[str] = mapped_column(String(4), default="")

"""Teleconsultation tables: a consult (one study, one question, two sides) and its answers.

Like reports, these rows are primary data (a consultant's words exist only here): ``pacs reindex`` does not
rebuild them, and a consult names its study by Study Instance UID, not by a foreign key to the derived
``study`` row, so rebuilding the index never orphans or deletes a consult.

Sides: the *requester* side is the requesting facility (or, for a principal without a facility, the requesting
user); the *consultant* side is the consulted facility, or an outside doctor reached through a share link of
scope ``study`` (``external``). Each side has a read marker: ``events_for_X`` counts what happened that side
should notice (a new consult, an answer, a close, the expiry), ``X_seen`` how many of those it has opened;
``events_for_X > X_seen`` is "unread". Counters, not timestamps, so the comparison is exact on every database.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pacs.db.models import UID, Base

# Consult states. ``expired`` is written by :func:`pacs.consults.service.expire_due`; access ends at
# ``expires_at`` whether or not that has run (the grant compares the time itself).
OPEN = "open"
ANSWERED = "answered"
CLOSED = "closed"
EXPIRED = "expired"
CONSULT_STATES = (OPEN, ANSWERED, CLOSED, EXPIRED)
ACTIVE_STATES = (OPEN, ANSWERED)  # the consulted side sees the study (until expires_at)


class Consult(Base):
    __tablename__ = "consult"
    __table_args__ = (
        # the access grant (pacs.consults.grants): per study row, is there an active consult to my facility?
        Index("ix_consult_grant", "study_instance_uid", "consulted_facility", "state", "expires_at"),
        Index("ix_consult_inbox", "consulted_facility", "state", "id"),
        Index("ix_consult_sent", "requesting_facility", "state", "id"),
        Index("ix_consult_due", "state", "expires_at"),  # the expiry sweep
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    patient_id: Mapped[str] = mapped_column(String(64), default="")  # for the audit rows
    study_facility: Mapped[str] = mapped_column(String(64), default="")
    requested_by: Mapped[str] = mapped_column(String(128), index=True)
    requested_by_name: Mapped[str] = mapped_column(String(128), default="")
    requesting_facility: Mapped[str] = mapped_column(String(64), default="")
    consulted_facility: Mapped[str] = mapped_column(String(64), default="")  # "" when external
    external: Mapped[bool] = mapped_column(Boolean, default=False)
    share_link_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the link of an external consult
    question: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=OPEN)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_by: Mapped[str] = mapped_column(String(128), default="")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    events_for_requester: Mapped[int] = mapped_column(Integer, default=0)
    requester_seen: Mapped[int] = mapped_column(Integer, default=0)
    requester_read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    events_for_consultant: Mapped[int] = mapped_column(Integer, default=0)
    consultant_seen: Mapped[int] = mapped_column(Integer, default=0)
    consultant_read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    answers: Mapped[list[ConsultAnswer]] = relationship(back_populates="consult", order_by="ConsultAnswer.id",
                                                        cascade="all, delete-orphan")


class ConsultAnswer(Base):
    """One answer: text as written (Vietnamese exact), who, from which facility, when; optionally the draft
    report a radiologist consultant started with it."""

    __tablename__ = "consult_answer"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consult.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(256))
    author_name: Mapped[str] = mapped_column(String(256), default="")
    author_facility: Mapped[str] = mapped_column(String(64), default="")
    share_link_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # answered through this link
    report_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the draft report made from it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    consult: Mapped[Consult] = relationship(back_populates="answers")

"""The person tables: a person is the set of patient records (``patient.person_fk``) that are one human being.

A person holds the national identifiers its records carried (``person_identifier``: one row per system and
value, unique archive-wide, so one identifier names at most one person). A record carrying no national
identifier is linked to no person (``patient.person_fk`` is NULL) unless someone links it by hand.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from pacs.db.models import Base


class Person(Base):
    __tablename__ = "person"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # who made it: "ingest" (a new national identifier), or the operator of a manual link/unlink/merge
    created_by: Mapped[str] = mapped_column(String(128), default="")


class PersonIdentifier(Base):
    """One national identifier of a person: ``system`` is the configured issuer (e.g. CCCD, BHXH)."""

    __tablename__ = "person_identifier"
    __table_args__ = (UniqueConstraint("system", "value", name="uq_person_identifier"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    person_fk: Mapped[int] = mapped_column(ForeignKey("person.id"), index=True)
    system: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

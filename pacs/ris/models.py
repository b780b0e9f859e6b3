"""RIS tables: imaging orders (what the Modality Worklist offers) and Modality Performed Procedure Steps.

Unlike the image index, these rows are primary data: an order exists only here, so it cannot be
rebuilt by ``pacs reindex``. Each order owns the Study Instance UID its images will carry, which is
how images received later link back to it. One order has one Requested Procedure and one Scheduled
Procedure Step; the DICOM identifiers of both default to the accession number.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pacs.db.models import UID, Base

# Order states (``imaging_order.state``).
SCHEDULED = "scheduled"
IN_PROGRESS = "in-progress"
COMPLETED = "completed"
DISCONTINUED = "discontinued"
ORDER_STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED)

# Order priorities, most urgent first (``imaging_order.priority``); the reading list sorts by this rank.
STAT = "STAT"
URGENT = "URGENT"
ROUTINE = "ROUTINE"
PRIORITIES = (STAT, URGENT, ROUTINE)
PRIORITY_RANK = {STAT: 0, URGENT: 1, ROUTINE: 2}

# MPPS states (``performed_procedure_step.state``), spelled as DICOM's Performed Procedure Step Status.
STEP_IN_PROGRESS = "IN PROGRESS"
STEP_COMPLETED = "COMPLETED"
STEP_DISCONTINUED = "DISCONTINUED"
STEP_STATES = (STEP_IN_PROGRESS, STEP_COMPLETED, STEP_DISCONTINUED)
STEP_FINAL_STATES = (STEP_COMPLETED, STEP_DISCONTINUED)


class ImagingOrder(Base):
    """A requested imaging procedure with its one scheduled step: one Modality Worklist item."""

    __tablename__ = "imaging_order"
    __table_args__ = (Index("ix_imaging_order_worklist", "state", "scheduled_station_ae_title",
                            "scheduled_start_date"),
                      # the reading list's first walk: STAT and URGENT orders and the studies they link to
                      Index("ix_imaging_order_priority", "priority_rank", "linked_study_instance_uid"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(16), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_name_search: Mapped[str] = mapped_column(String(324), default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    requested_procedure_id: Mapped[str] = mapped_column(String(16), default="", index=True)
    requested_procedure_description: Mapped[str] = mapped_column(String(64), default="")
    scheduled_procedure_step_id: Mapped[str] = mapped_column(String(16), default="")
    scheduled_station_ae_title: Mapped[str] = mapped_column(String(16), default="")
    scheduled_start_date: Mapped[str] = mapped_column(String(8), default="")
    scheduled_start_time: Mapped[str] = mapped_column(String(16), default="")  # HHMMSS
    modality: Mapped[str] = mapped_column(String(16), default="")
    scheduled_performing_physician_name: Mapped[str] = mapped_column(String(324), default="")
    scheduled_performing_physician_name_search: Mapped[str] = mapped_column(String(324), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    state: Mapped[str] = mapped_column(String(16), default=SCHEDULED)
    # RIS fields (orders from the EMR: HTTP, FHIR ServiceRequest, HL7 ORM^O01)
    priority: Mapped[str] = mapped_column(String(8), default=ROUTINE)
    priority_rank: Mapped[int] = mapped_column(Integer, default=2)
    reason: Mapped[str] = mapped_column(Text, default="")
    facility: Mapped[str] = mapped_column(String(64), default="", index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    placer_order_number: Mapped[str] = mapped_column(String(64), default="")  # the EMR's own order id (ORC-2)
    source: Mapped[str] = mapped_column(String(16), default="")  # api, fhir, hl7, cli
    # the study its images actually arrived in (by accession number, else patient + modality + date)
    linked_study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    steps: Mapped[list[PerformedProcedureStep]] = relationship(back_populates="order")


class PerformedProcedureStep(Base):
    """One MPPS instance as a modality reported it (N-CREATE, then N-SETs).

    ``order_fk`` is empty for unscheduled work (a step whose Scheduled Step Attributes name no
    known order). ``n_create_json`` and ``n_set_json`` keep what was received, as DICOM JSON, for
    audit: the N-CREATE attribute list, and a JSON array of every N-SET modification list in order.
    """

    __tablename__ = "performed_procedure_step"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    order_fk: Mapped[int | None] = mapped_column(ForeignKey("imaging_order.id", ondelete="SET NULL"),
                                                 nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), default=STEP_IN_PROGRESS)
    performed_procedure_step_id: Mapped[str] = mapped_column(String(16), default="")
    performed_station_ae_title: Mapped[str] = mapped_column(String(16), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    start_date: Mapped[str] = mapped_column(String(8), default="")
    start_time: Mapped[str] = mapped_column(String(16), default="")
    end_date: Mapped[str] = mapped_column(String(8), default="")
    end_time: Mapped[str] = mapped_column(String(16), default="")
    n_create_json: Mapped[str] = mapped_column(Text, default="{}")
    n_set_json: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    order: Mapped[ImagingOrder | None] = relationship(back_populates="steps")
    series: Mapped[list[PerformedSeries]] = relationship(back_populates="step", cascade="all, delete-orphan",
                                                         order_by="PerformedSeries.id")


class PerformedSeries(Base):
    """A series the modality reported in the step's Performed Series Sequence."""

    __tablename__ = "performed_series"
    __table_args__ = (UniqueConstraint("step_fk", "series_instance_uid", name="uq_performed_series"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_fk: Mapped[int] = mapped_column(ForeignKey("performed_procedure_step.id", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    number_of_images: Mapped[int] = mapped_column(Integer, default=0)  # items in Referenced Image Sequence

    step: Mapped[PerformedProcedureStep] = relationship(back_populates="series")

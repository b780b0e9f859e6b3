"""Index schema: patient / study / series / instance, prior versions, AEs, the outbox, audit.

The index is derived data: every row here can be rebuilt from the object store
(``pacs reindex``). Column names follow DICOM's own words. ``*_search`` columns hold
text folded for matching (upper case, diacritics removed) so that "Nguyen" finds "Nguyễn".
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class Base(DeclarativeBase):
    pass


class QueuedJobColumns:
    """The columns every retried job table shares (forwarding, storage-commitment reports, HL7 results): its
    state in the :class:`pacs.jobs.JobState` vocabulary, the attempts so far, when it is due again (the backoff
    of :class:`pacs.jobs.RetryPolicy`), the latest error, and when it was made and last changed."""

    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (
        # A Patient ID is only unique within its issuer, and modalities often send no issuer: the facility
        # that first sent it is part of the identity, so one hospital's record number never shows another's
        # patient (name, birth date) on its studies (pacs.security).
        UniqueConstraint("patient_id", "issuer_of_patient_id", "facility", name="uq_patient_identity"),
        # PostgreSQL only (migration 0002): prefix LIKE (PatientID=ABC*, PatientName=NGUYEN*) under any collation.
        Index("ix_patient_patient_id_pattern", "patient_id",
              postgresql_ops={"patient_id": "text_pattern_ops"}).ddl_if(dialect="postgresql"),
        Index("ix_patient_patient_name_search_pattern", "patient_name_search",
              postgresql_ops={"patient_name_search": "text_pattern_ops"}).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    facility: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_name_search: Mapped[str] = mapped_column(String(324), default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # the person this record is one of (pacs.persons; migration 0011_persons), and the national identifiers
    # ("SYSTEM:value", sorted, backslash-joined) it was last linked with: unchanged ones cost ingest nothing
    person_fk: Mapped[int | None] = mapped_column(ForeignKey("person.id"), nullable=True, index=True)
    national_ids: Mapped[str] = mapped_column(String(512), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_accession_number_pattern", "accession_number",
              postgresql_ops={"accession_number": "text_pattern_ops"}).ddl_if(dialect="postgresql"),
        Index("ix_study_created_at", "created_at", "id"),  # the reading list walks studies in arrival order
        # PostgreSQL only (migration 0015): the studies a list shows (a study without images is hidden), narrow
        # enough to count them from the index alone — the study browser's X-Total-Count over the whole archive
        # or one facility's, a date range's, a name search's (bench/index_scale.py, 10^7 instances)
        *(Index(name, *columns, "facility", "id", postgresql_where=text("number_of_instances > 0"))
          .ddl_if(dialect="postgresql") for name, columns in (
              ("ix_study_listed", ()), ("ix_study_listed_date", ("study_date",)),
              ("ix_study_listed_patient", ("patient_fk",)))),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(256), default="")
    study_description_search: Mapped[str] = mapped_column(String(256), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    institution_name: Mapped[str] = mapped_column(String(256), default="")
    facility: Mapped[str] = mapped_column(String(64), default="", index=True)  # access scope (pacs.security)
    # created by an unregistered sender: a trusted exam with this UID claims it (pacs.ingest; 0009_reconciliation)
    provisional: Mapped[bool] = mapped_column(Boolean, default=False)
    modalities_in_study: Mapped[str] = mapped_column(String(128), default="", index=True)
    number_of_series: Mapped[int] = mapped_column(Integer, default=0)
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    thumbnail_key: Mapped[str | None] = mapped_column(String(400), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(256), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    series_date: Mapped[str] = mapped_column(String(8), default="")
    series_time: Mapped[str] = mapped_column(String(16), default="")
    station_name: Mapped[str] = mapped_column(String(64), default="")
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    thumbnail_key: Mapped[str | None] = mapped_column(String(400), nullable=True)
    metadata_key: Mapped[str | None] = mapped_column(String(400), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """The current version of one stored SOP instance."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    object_key: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(16), default="")  # dimse / stow / import / reindex
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    source_address: Mapped[str] = mapped_column(String(64), default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    thumbnail_key: Mapped[str | None] = mapped_column(String(400), nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceVersion(Base):
    """A prior version of an instance, replaced by a later object with the same SOP Instance UID."""

    __tablename__ = "instance_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    version: Mapped[int] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    replaced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source_ae: Mapped[str] = mapped_column(String(16), default="")


class ApplicationEntity(Base):
    """A registered DICOM peer: where it is and which services it may use."""

    __tablename__ = "application_entity"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[int] = mapped_column(Integer, default=104)
    description: Mapped[str] = mapped_column(String(255), default="")
    allow_store: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_query: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_retrieve: Mapped[bool] = mapped_column(Boolean, default=True)
    check_host: Mapped[bool] = mapped_column(Boolean, default=True)  # its title is believed only from host
    facility: Mapped[str] = mapped_column(String(64), default="")  # studies it sends belong there
    # the TLS client certificate (CN, DNS name or sha256:fingerprint) it must present; migration 0009_ae_identity
    tls_subject: Mapped[str] = mapped_column(String(255), default="")
    # queries and retrieves every facility's studies (pacs.ae_scope); migration 0009_dimse_scope
    archive_wide: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AESighting(Base):
    """A (registered AE title, peer address) pair seen calling (pacs.ae_sightings): the first time is audited."""

    __tablename__ = "ae_sighting"
    __table_args__ = (UniqueConstraint("ae_title", "address", name="uq_ae_sighting"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64))
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DerivedTask(Base):
    """Outbox row: derived work, written in the same transaction as the instance it derives from.

    ``subject_uid`` is a SOP Instance UID for instance-level work (``sha256`` names the content
    version it was armed for) or a Series Instance UID for series-level work (``sha256`` empty).
    A row is published to the task queue after commit; if the broker is down it stays
    ``pending`` and the relay publishes it later, so derived work is delayed, never lost.
    """

    __tablename__ = "derived_task"
    __table_args__ = (
        UniqueConstraint("kind", "subject_uid", "sha256", name="uq_derived_task"),
        Index("ix_derived_task_state", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject_uid: Mapped[str] = mapped_column(UID)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, queued, running, done, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runs started (a claim counts one: pacs.derived.lease)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    # the TaskOwner holding the row (queued in its in-process pool, or running); "" when none does
    owner: Mapped[str] = mapped_column(String(160), default="")
    crashes: Mapped[int] = mapped_column(Integer, default=0)  # runs whose owner died in them (0009_task_lease)


class TaskOwner(Base):
    """A process that holds derived tasks, and its heartbeat (pacs.derived.lease; migration 0009_task_lease)."""

    __tablename__ = "task_owner"

    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # host/pid/start
    host: Mapped[str] = mapped_column(String(128))  # host name and PID namespace: where the pid means something
    pid: Mapped[int] = mapped_column(Integer)
    started: Mapped[str] = mapped_column(String(32))  # the process's start time, so a reused pid is not taken for it
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ForwardRule(Base):
    """Send newly received instances that match to a registered DICOM node. Empty match fields match anything."""

    __tablename__ = "forward_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    destination_ae: Mapped[str] = mapped_column(String(16))
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ForwardJob(QueuedJobColumns, Base):
    """One instance waiting for (or done with) delivery to one destination: the per-destination queue."""

    __tablename__ = "forward_job"
    __table_args__ = (
        UniqueConstraint("destination_ae", "sop_instance_uid", "sha256", name="uq_forward_job"),
        Index("ix_forward_job_queue", "destination_ae", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int | None] = mapped_column(ForeignKey("forward_rule.id", ondelete="SET NULL"), nullable=True)
    destination_ae: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sha256: Mapped[str] = mapped_column(String(64))
    # state (pending, sent, failed), attempts, next_attempt_at, last_error, created_at, updated_at: QueuedJobColumns


class AuditEvent(Base):
    """Append-only audit trail of patient-data access and changes (no update path in the code)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(32), default="")
    source_address: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64), default="")  # entry_hash of the row before (pacs.audit)
    entry_hash: Mapped[str] = mapped_column(String(64), default="")
import pacs.commitment.models  # noqa: E402  (registers the storage_commitment table on Base)
import pacs.consults.models  # noqa: E402  (registers consults and their answers on Base)
import pacs.persons.models  # noqa: E402  (registers persons and their national identifiers on Base)
import pacs.reconciliation.models  # noqa: E402  (registers the reconciliation queue on Base)
import pacs.reports.models  # noqa: E402  (registers reports, claims, key images, HL7 outbound on Base)
import pacs.ris.models  # noqa: E402  (registers the RIS tables on Base)
import pacs.security.models  # noqa: E402  (registers users, tokens and shares on Base)
import pacs.sharing.models  # noqa: E402  (registers share links on Base)
import pacs.studies.models  # noqa: E402  (registers rejected instances and rejection notes on Base)
import pacs.studies.tombstones  # noqa: E402, F401  (registers the tombstones of deleted objects on Base)

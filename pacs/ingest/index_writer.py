"""Writes one received instance into the index, inside a transaction the caller owns.

Patient, study and series rows are created on first sight with insert-or-ignore, so
concurrent associations sending the same new study never race into a duplicate-key error.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs.db.models import Instance, InstanceVersion, Patient, Series, Study
from pacs.ingest.parsing import ReceivedObject
from pacs.persons.identifiers import NationalIdPolicy
from pacs.persons.linking import link_at_ingest

if TYPE_CHECKING:
    from pacs.ingest.source import Correction


def _insert_ignore(session: Session, model: type, values: dict[str, Any], keys: list[str]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(model).values(**values).on_conflict_do_nothing(index_elements=keys))
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(model).values(**values).on_conflict_do_nothing(index_elements=keys))
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"unsupported database dialect {dialect}")


def _get_or_create_patient(session: Session, values: dict[str, str], facility: str,
                           corrected: bool = False) -> Patient:
    ident = {**{k: values[k] for k in ("patient_id", "issuer_of_patient_id")}, "facility": facility[:64]}
    _insert_ignore(session, Patient, {**values, "facility": facility[:64]}, list(ident))
    patient = session.scalars(select(Patient).filter_by(**ident)).one()
    # First seen wins; later objects only fill what was blank (corrections are an explicit action: ``corrected``,
    # the values of a corrected version replace the record's).
    for field in ("patient_name", "patient_name_search", "patient_birth_date", "patient_sex"):
        if (corrected or not getattr(patient, field)) and values[field] != getattr(patient, field) \
                and (corrected or values[field]):
            setattr(patient, field, values[field])
    return patient


def _get_or_create_study(session: Session, obj: ReceivedObject, patient: Patient, facility: str,
                         provisional: bool) -> Study:
    values = {"study_instance_uid": obj.study_instance_uid, "patient_fk": patient.id, **obj.study,
              "facility": facility[:64], "provisional": provisional}  # first seen wins, like the other attributes
    _insert_ignore(session, Study, values, ["study_instance_uid"])
    return session.scalars(
        select(Study).where(Study.study_instance_uid == obj.study_instance_uid).with_for_update()
    ).one()


def _apply_correction(study: Study, patient: Patient, obj: ReceivedObject, correction: Correction) -> None:
    """A corrected version (pacs.studies.corrections): the study follows the patient the object now names and
    takes the corrected study attributes."""
    if study.patient_fk != patient.id:
        study.patient_fk = patient.id
    for field in correction.study_fields:
        setattr(study, field, obj.study[field])
        if field == "study_description":
            study.study_description_search = obj.study["study_description_search"]
    if correction.study_fields or study.specific_character_set != obj.study["specific_character_set"]:
        study.specific_character_set = obj.study["specific_character_set"]


def _move_series(session: Session, series: Series, study: Study) -> None:
    """A corrected version moves its whole series row to ``study`` (pacs.studies.corrections.move_series):
    the counts of both studies and the old study's modalities follow; an old study left with no instances keeps
    its row (with 0, hidden from queries)."""
    old = session.scalars(select(Study).where(Study.id == series.study_fk).with_for_update()).one()
    series.study_fk = study.id
    moved = series.number_of_instances
    old.number_of_series = max(0, old.number_of_series - 1)
    old.number_of_instances = max(0, old.number_of_instances - moved)
    session.flush()
    remaining = session.scalars(select(Series.modality).where(Series.study_fk == old.id)).all()
    old.modalities_in_study = "\\".join(dict.fromkeys(m for m in remaining if m))[:128]
    study.number_of_series += 1
    study.number_of_instances += moved
    _add_modality(study, series.modality)


def _get_or_create_series(session: Session, obj: ReceivedObject, study: Study,
                          moving: bool = False) -> tuple[Series, bool]:
    existing = session.scalars(
        select(Series).where(Series.series_instance_uid == obj.series_instance_uid)
    ).one_or_none()
    if existing is not None:
        if moving and existing.study_fk != study.id:
            _move_series(session, existing, study)
        return existing, False
    values = {"series_instance_uid": obj.series_instance_uid, "study_fk": study.id, **obj.series}
    _insert_ignore(session, Series, values, ["series_instance_uid"])
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == obj.series_instance_uid)
    ).one()
    return series, True  # the study row is locked, so no concurrent transaction created it


def _add_modality(study: Study, modality: str) -> None:
    present = [m for m in study.modalities_in_study.split("\\") if m]
    if modality and modality not in present:
        study.modalities_in_study = "\\".join([*present, modality])[:128]


def _count(session: Session, study_id: int, series_id: int, delta: int) -> None:
    session.execute(
        update(Study).where(Study.id == study_id)
        .values(number_of_instances=Study.number_of_instances + delta)
    )
    session.execute(
        update(Series).where(Series.id == series_id)
        .values(number_of_instances=Series.number_of_instances + delta)
    )


def index_instance(
    session: Session,
    obj: ReceivedObject,
    *,
    object_key: str,
    sha256: str,
    received_at: datetime,
    source: str,
    source_ae: str,
    source_address: str,
    replaces: Instance | None,
    facility: str = "",
    provisional: bool = False,
    study_patient: dict[str, str] | None = None,
    national_ids: NationalIdPolicy | None = None,
    correction: Correction | None = None,
) -> Instance:
    """Record ``obj`` as the current version of its SOP instance; keep ``replaces`` as a prior version.

    A new study is created for ``facility``, ``provisional`` when an unregistered sender creates it, and
    under ``study_patient`` when given (an order's patient, pacs.ingest.service) instead of the object's patient.
    ``national_ids``: link the patient record to its person by the national IDs the object carries (pacs.persons;
    not when the study is filed under an order's other patient: the object's identifiers are not that patient's).
    ``correction``: a corrected version (pacs.ingest.source.Correction): its patient and study values replace the
    index's, and its series row moves to its study when it was under another one."""
    corrected = correction is not None and correction.study_instance_uid == obj.study_instance_uid
    patient = _get_or_create_patient(session, study_patient or obj.patient, facility, corrected=corrected)
    if national_ids is not None and (study_patient is None or study_patient["patient_id"] == obj.patient["patient_id"]):
        # the dataset ingest already parsed (pacs.ingest.parsing); the bytes only for an object built elsewhere
        carried = national_ids.from_dataset(obj.dataset) if obj.dataset is not None else national_ids.read(obj.data)
        link_at_ingest(session, patient, carried)
    study = _get_or_create_study(session, obj, patient, facility, provisional)
    if corrected and correction is not None:
        _apply_correction(study, patient, obj, correction)
    series, new_series = _get_or_create_series(session, obj, study, moving=corrected)
    if new_series:
        study.number_of_series += 1
        _add_modality(study, series.modality)
    attrs = {
        "sop_class_uid": obj.sop_class_uid,
        "transfer_syntax_uid": obj.transfer_syntax_uid,
        "object_key": object_key,
        "size": len(obj.data),
        "sha256": sha256,
        "received_at": received_at,
        "source": source,
        "source_ae": source_ae[:16],
        "source_address": source_address[:64],
        "thumbnail_key": None,
        **obj.instance,
    }
    if replaces is None:
        instance = Instance(sop_instance_uid=obj.sop_instance_uid, series_fk=series.id, version=1, **attrs)
        session.add(instance)
        session.flush()  # raises IntegrityError now if a concurrent sender won the race
        _count(session, series.study_fk, series.id, +1)
        return instance

    session.add(InstanceVersion(
        sop_instance_uid=replaces.sop_instance_uid,
        version=replaces.version,
        object_key=replaces.object_key,
        size=replaces.size,
        sha256=replaces.sha256,
        transfer_syntax_uid=replaces.transfer_syntax_uid,
        received_at=replaces.received_at,
        replaced_at=received_at,
        source_ae=replaces.source_ae,
    ))
    if replaces.series_fk != series.id:  # the new version moved to another series/study
        old_series = session.get(Series, replaces.series_fk)
        if old_series is not None:
            _count(session, old_series.study_fk, old_series.id, -1)
        _count(session, series.study_fk, series.id, +1)
    for name, value in attrs.items():
        setattr(replaces, name, value)
    replaces.series_fk = series.id
    replaces.version += 1
    return replaces

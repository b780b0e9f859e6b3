"""Writes one received instance into the index, inside a transaction the caller owns.

Patient, study and series rows are created on first sight with insert-or-ignore, so
concurrent associations sending the same new study never race into a duplicate-key error.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from pacs.db.models import Instance, InstanceVersion, Patient, Series, Study
from pacs.db.prepared import Prepared
from pacs.ingest.parsing import ReceivedObject
from pacs.persons.identifiers import NationalIdPolicy
from pacs.persons.linking import link_at_ingest

if TYPE_CHECKING:
    from pacs.ingest.source import Correction


# The statements every received object runs, prebuilt on the tables with bound parameters: building an ORM
# statement per call cost several times running it (issue 13). ORM objects are loaded only on the rare paths
# (a new version, a correction, national identifiers to link), after these statements, so they are never stale.
_patient_t, _study_t, _series_t = (cast(Table, m.__table__) for m in (Patient, Study, Series))
_patient, _study, _series = _patient_t.c, _study_t.c, _series_t.c
_PATIENT_FIELDS = ("patient_name", "patient_name_search", "patient_birth_date", "patient_sex")
_PATIENT = (select(_patient.id, *(_patient[f] for f in _PATIENT_FIELDS))
            .where(_patient.patient_id == bindparam("patient_id"),
                   _patient.issuer_of_patient_id == bindparam("issuer_of_patient_id"),
                   _patient.facility == bindparam("facility")))
_STUDY_LOCKED = (select(_study.id, _study.patient_fk, _study.modalities_in_study)
                 .where(_study.study_instance_uid == bindparam("uid")).with_for_update())
_SERIES = (select(_series.id, _series.study_fk, _series.modality)
           .where(_series.series_instance_uid == bindparam("uid")))
# the two lookups of every object, on the driver's cursor (pacs.db.prepared)
_PATIENT_PREPARED = Prepared(_PATIENT)
_SERIES_IN_STUDY = Prepared(select(_series.id, _series.study_fk, _series.modality, _study.study_instance_uid)
                            .join_from(_series_t, _study_t, _study.id == _series.study_fk)
                            .where(_series.series_instance_uid == bindparam("uid")))
_NEW_SERIES_OF_STUDY = (update(_study_t).where(_study.id == bindparam("target_study"))
                        .values(number_of_series=_study.number_of_series + 1,
                                modalities_in_study=bindparam("new_modalities")))
_COUNT_STUDY = (update(_study_t).where(_study.id == bindparam("target_study"))
                .values(number_of_instances=_study.number_of_instances + bindparam("by")))
_COUNT_SERIES = (update(_series_t).where(_series.id == bindparam("target_series"))
                 .values(number_of_instances=_series.number_of_instances + bindparam("by")))
_INSERT_INSTANCE = insert(cast(Table, Instance.__table__))


class _Row(NamedTuple):
    """The ids a new instance's row needs, and what its study's counters need."""

    id: int
    parent_fk: int  # a study's patient, a series' study
    modalities: str  # a study's modalities in study, a series' modality


def _insert_ignore(connection: Connection, table: Table, values: dict[str, Any], keys: list[str]) -> None:
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        connection.execute(pg_insert(table).values(**values).on_conflict_do_nothing(index_elements=keys))
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        connection.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing(index_elements=keys))
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"unsupported database dialect {dialect}")


def _get_or_create_patient(connection: Connection, values: dict[str, str], facility: str,
                           corrected: bool = False) -> int:
    ident = {**{k: values[k] for k in ("patient_id", "issuer_of_patient_id")}, "facility": facility[:64]}
    row = _PATIENT_PREPARED.one_or_none(connection, ident)
    if row is None:
        _insert_ignore(connection, _patient_t, {**values, "facility": facility[:64]}, list(ident))
        row = connection.execute(_PATIENT, ident).one()
    # First seen wins; later objects only fill what was blank (corrections are an explicit action: ``corrected``,
    # the values of a corrected version replace the record's).
    changes = {field: values[field] for field, held in zip(_PATIENT_FIELDS, row[1:], strict=True)
               if (corrected or not held) and values[field] != held and (corrected or values[field])}
    if changes:
        connection.execute(update(_patient_t).where(_patient.id == row[0]).values(**changes))
    return int(row[0])


def _get_or_create_study(connection: Connection, obj: ReceivedObject, patient_id: int, facility: str,
                         provisional: bool) -> _Row:
    uid = {"uid": obj.study_instance_uid}
    row = connection.execute(_STUDY_LOCKED, uid).one_or_none()
    if row is None:
        values = {"study_instance_uid": obj.study_instance_uid, "patient_fk": patient_id, **obj.study,
                  "facility": facility[:64], "provisional": provisional}  # first seen wins, like the other attributes
        _insert_ignore(connection, _study_t, values, ["study_instance_uid"])
        row = connection.execute(_STUDY_LOCKED, uid).one()
    return _Row(*row)


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
    study.modalities_in_study = _with_modality(study.modalities_in_study, series.modality)


def _get_or_create_series(connection: Connection, obj: ReceivedObject, study: _Row,
                          known: tuple[Any, ...] | None = None) -> tuple[_Row, bool]:
    """The series row, and whether this call created it (then its study's series count and modalities follow).
    ``known``: the series' :data:`_SERIES_IN_STUDY` row read in this transaction, if it was found."""
    uid = {"uid": obj.series_instance_uid}
    existing = known or connection.execute(_SERIES, uid).one_or_none()
    if existing is not None:
        return _Row(*existing[:3]), False
    values = {"series_instance_uid": obj.series_instance_uid, "study_fk": study.id, **obj.series}
    _insert_ignore(connection, _series_t, values, ["series_instance_uid"])
    series = _Row(*connection.execute(_SERIES, uid).one())
    # the study row is locked, so no concurrent transaction created the series
    connection.execute(_NEW_SERIES_OF_STUDY, {"target_study": study.id,
                                              "new_modalities": _with_modality(study.modalities, series.modalities)})
    return series, True


def _with_modality(modalities: str, modality: str) -> str:
    present = [m for m in modalities.split("\\") if m]
    if modality and modality not in present:
        return "\\".join([*present, modality])[:128]
    return modalities


def _count(connection: Connection, study_id: int, series_id: int, delta: int) -> None:
    connection.execute(_COUNT_STUDY, {"target_study": study_id, "by": delta})
    connection.execute(_COUNT_SERIES, {"target_series": series_id, "by": delta})


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
) -> int:
    """Record ``obj`` as the current version of its SOP instance; keep ``replaces`` as a prior version. Returns the
    instance row's id.

    A new study is created for ``facility``, ``provisional`` when an unregistered sender creates it, and
    under ``study_patient`` when given (an order's patient, pacs.ingest.service) instead of the object's patient.
    ``national_ids``: link the patient record to its person by the national IDs the object carries (pacs.persons;
    not when the study is filed under an order's other patient: the object's identifiers are not that patient's).
    ``correction``: a corrected version (pacs.ingest.source.Correction): its patient and study values replace the
    index's, and its series row moves to its study when it was under another one."""
    session.flush()  # the caller's ORM changes first (e.g. a claim's removals): the statements below do not autoflush
    connection = session.connection()  # the statements every object runs go to it directly (no ORM, issue 13)
    corrected = correction is not None and correction.study_instance_uid == obj.study_instance_uid
    patient_id = _get_or_create_patient(connection, study_patient or obj.patient, facility, corrected=corrected)
    if national_ids is not None and (study_patient is None or study_patient["patient_id"] == obj.patient["patient_id"]):
        # the dataset ingest already parsed (pacs.ingest.parsing); the bytes only for an object built elsewhere
        carried = national_ids.from_dataset(obj.dataset) if obj.dataset is not None else national_ids.read(obj.data)
        if carried:
            link_at_ingest(session, session.get_one(Patient, patient_id, populate_existing=True), carried)
    known = None if corrected else _SERIES_IN_STUDY.one_or_none(connection, {"uid": obj.series_instance_uid})
    if known is not None and known[3] == obj.study_instance_uid:
        # the common case, a further instance of a known series: its study exists and needs no lock (its row's
        # counter update below locks it; a new series is what takes the study's lock, to count it once)
        series = _Row(*known[:3])
        return _write_instance(session, connection, obj, series, replaces, _attributes(
            obj, object_key, sha256, received_at, source, source_ae, source_address))
    study = _get_or_create_study(connection, obj, patient_id, facility, provisional)
    if corrected and correction is not None:
        study_orm = session.get_one(Study, study.id, populate_existing=True)
        _apply_correction(study_orm, session.get_one(Patient, patient_id, populate_existing=True), obj, correction)
        existing = session.execute(_SERIES, {"uid": obj.series_instance_uid}).one_or_none()
        if existing is not None and existing[1] != study.id:
            _move_series(session, session.get_one(Series, existing[0], populate_existing=True), study_orm)
        session.flush()
        study = _Row(*connection.execute(_STUDY_LOCKED, {"uid": obj.study_instance_uid}).one())
    # a series not found above is looked up again now that its study is locked (a concurrent sender may have
    # created it meanwhile)
    series, _new = _get_or_create_series(connection, obj, study, known)
    return _write_instance(session, connection, obj, series, replaces, _attributes(
        obj, object_key, sha256, received_at, source, source_ae, source_address))


def _attributes(obj: ReceivedObject, object_key: str, sha256: str, received_at: datetime, source: str,
                source_ae: str, source_address: str) -> dict[str, Any]:
    """The instance row's columns that every version sets."""
    return {
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


def _write_instance(session: Session, connection: Connection, obj: ReceivedObject, series: _Row,
                    replaces: Instance | None, attrs: dict[str, Any]) -> int:
    """The instance row (a new one, or ``replaces`` updated with its prior version kept) and the counters."""
    if replaces is None:
        # raises IntegrityError now if a concurrent sender won the race
        row = {"sop_instance_uid": obj.sop_instance_uid, "series_fk": series.id, "version": 1, **attrs}
        result = connection.execute(_INSERT_INSTANCE, row)
        _count(connection, series.parent_fk, series.id, +1)
        return int(result.inserted_primary_key[0])  # type: ignore[index]  # one row inserted: never None

    session.add(InstanceVersion(
        sop_instance_uid=replaces.sop_instance_uid,
        version=replaces.version,
        object_key=replaces.object_key,
        size=replaces.size,
        sha256=replaces.sha256,
        transfer_syntax_uid=replaces.transfer_syntax_uid,
        received_at=replaces.received_at,
        replaced_at=attrs["received_at"],
        source_ae=replaces.source_ae,
    ))
    if replaces.series_fk != series.id:  # the new version moved to another series/study
        old_series = session.get(Series, replaces.series_fk)
        if old_series is not None:
            _count(connection, old_series.study_fk, old_series.id, -1)
        _count(connection, series.parent_fk, series.id, +1)
    for name, value in attrs.items():
        setattr(replaces, name, value)
    replaces.series_fk = series.id
    replaces.version += 1
    session.flush()
    return replaces.id

"""Who may write a received object's study: what the index and the RIS hold now, put to the policy.

Reads only; :mod:`pacs.security.filing_rules` decides (pure), and :mod:`pacs.ingest.service` asks twice:
before the object is stored (step 2 of its order of writes, from :func:`snapshot`) and again with the rows locked
(step 4). Each time what the policy needs is read in one statement (:data:`_SNAPSHOT`), never from a cache: the
decision under the locks is the one that counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy import Connection, Table, bindparam, case, exists, false, literal_column, or_, select
from sqlalchemy.orm import Session

from pacs.db.models import Instance, Patient, Series, Study
from pacs.db.prepared import Prepared
from pacs.ingest.parsing import ReceivedObject
from pacs.ingest.source import IngestSource
from pacs.reconciliation import service as reconciliation
from pacs.reports.models import KeyImageSelection, Report, StudyClaim
from pacs.ris.models import ImagingOrder
from pacs.security import filing_rules
from pacs.studies.models import RejectedInstance


class StoredVersion(Protocol):
    """What the policy reads of the instance's current version: an :class:`Instance` or a row of its columns."""

    @property
    def series_fk(self) -> int: ...

    @property
    def source_ae(self) -> str: ...


class Current(NamedTuple):
    """The SOP instance's current version as the index holds it (a :class:`StoredVersion`)."""

    id: int
    sha256: str
    object_key: str
    series_fk: int
    source_ae: str


@dataclass(frozen=True)
class Snapshot:
    """What one statement reads for a received object: its current version, whether it was rejected (IOCM), and
    what the policy needs (:class:`filing_rules.Existing`, the current version's study only when there is one)."""

    current: Current | None
    rejected: bool
    existing: filing_rules.Existing


def snapshot(connection: Connection, obj: ReceivedObject) -> Snapshot:
    """Everything the early decision (step 2 of :mod:`pacs.ingest.service`) reads, in one statement."""
    row = _read(connection, obj)
    current = Current(*row[:5]) if row.id is not None else None
    return Snapshot(current, bool(row.rejected), _existing_of(row, current))


def decide(connection: Connection, obj: ReceivedObject, replaces: StoredVersion | None,
           source: IngestSource, known: Snapshot | None = None) -> filing_rules.Decision:
    """The policy's decision for ``obj`` against what the index (and the RIS) hold now; ``known``: what
    :func:`snapshot` read for it in the same transaction (otherwise read here, in one statement)."""
    correction = source.correction
    if correction is not None and correction.study_instance_uid == obj.study_instance_uid:
        # the archive's corrected version of its own object (pacs.studies.corrections, which checked who may):
        # filed into the study it corrects, whatever patient it now names; the study keeps its facility
        facility = connection.scalar(_STUDY_FACILITY, {"study_uid": obj.study_instance_uid})
        if facility is not None:
            return filing_rules.Decision(filing_rules.Verdict.FILE, facility=facility)
    existing = known.existing if known is not None else _existing(connection, obj, replaces)
    resolution = source.resolution
    # an impostor of a registered title is never "the AE that sent the current version" (AE spoofing)
    sender = filing_rules.Sender(source.facility, source.trusted, "" if source.impersonating else source.calling_ae,
                                  resolving=resolution is not None and resolution.action == reconciliation.FILE)
    patient_id, issuer = obj.patient["patient_id"], obj.patient["issuer_of_patient_id"]
    decision = filing_rules.decide(existing, obj.study_instance_uid, sender, patient_id, issuer,
                                    new_version=replaces is not None)
    accession = obj.study.get("accession_number", "").strip()
    if decision.verdict is filing_rules.Verdict.FILE and existing.order is None and existing.study_owner is None \
            and source.trusted and not source.facility and accession:
        # an unrestricted sender's new study with an order's accession number and patient: the order's facility
        order = connection.execute(_ORDER_BY_ACCESSION, {"accession": accession[:16]}).one_or_none()
        if order is not None and filing_rules.same_patient(filing_rules.Owner(*order), patient_id, issuer):
            decision = replace(decision, facility=order[0])
    return decision


# Prebuilt on the tables (not the ORM entities), run with bound parameters on the session's connection: the ingest
# path runs them for every received object, and building an ORM statement, or the ORM session's execution of a
# statement, costs several times running it (issue 13). One statement reads what used to take four to six: left
# joins from a one-row select on unique keys (the instance, its rejection, the study and its patient, the order,
# the series' study, the current version's study), so it returns exactly one row.
_study_t, _patient_t, _series_t, _order_t, _instance_t, _rejected_t = (
    cast(Table, m.__table__) for m in (Study, Patient, Series, ImagingOrder, Instance, RejectedInstance))
_study, _order = _study_t.c, _order_t.c
_one = select(literal_column("1").label("one")).subquery("one")
_s, _p, _o, _i, _r = (t.alias(n) for t, n in ((_study_t, "s"), (_patient_t, "p"), (_order_t, "o"),
                                                (_instance_t, "i"), (_rejected_t, "r")))
_se, _ss, _ise, _is = _series_t.alias("se"), _study_t.alias("ss"), _series_t.alias("ise"), _study_t.alias("istudy")
_HAS_READING = or_(*(exists().where(cast(Table, model.__table__).c.study_instance_uid == _s.c.study_instance_uid)
                     for model in (Report, KeyImageSelection, StudyClaim)))
_SNAPSHOT = (
    select(_i.c.id, _i.c.sha256, _i.c.object_key, _i.c.series_fk, _i.c.source_ae,
           (_r.c.id.is_not(None)).label("rejected"),
           _s.c.id.label("study_id"), _s.c.facility.label("study_facility"), _s.c.provisional, _p.c.patient_id,
           _p.c.issuer_of_patient_id,
           case((_s.c.provisional.is_(True), _HAS_READING), else_=false()).label("has_reading"),
           _o.c.id.label("order_id"), _o.c.facility.label("order_facility"), _o.c.patient_id.label("order_patient_id"),
           _o.c.issuer_of_patient_id.label("order_issuer"), _ss.c.study_instance_uid.label("series_study_uid"),
           _is.c.study_instance_uid.label("instance_study_uid"), _is.c.facility.label("instance_study_facility"))
    .select_from(
        _one.outerjoin(_i, _i.c.sop_instance_uid == bindparam("sop"))
        .outerjoin(_r, _r.c.sop_instance_uid == bindparam("sop"))
        .outerjoin(_s, _s.c.study_instance_uid == bindparam("study_uid"))
        .outerjoin(_p, _p.c.id == _s.c.patient_fk)
        .outerjoin(_o, _o.c.study_instance_uid == bindparam("study_uid"))
        .outerjoin(_se, _se.c.series_instance_uid == bindparam("series_uid"))
        .outerjoin(_ss, _ss.c.id == _se.c.study_fk)
        .outerjoin(_ise, _ise.c.id == _i.c.series_fk)
        .outerjoin(_is, _is.c.id == _ise.c.study_fk)))
_SNAPSHOT_PREPARED = Prepared(_SNAPSHOT)  # on the driver's cursor (pacs.db.prepared)
_STUDY_FACILITY = select(_study.facility).where(_study.study_instance_uid == bindparam("study_uid"))
_ORDER_BY_ACCESSION = (select(_order.facility, _order.patient_id, _order.issuer_of_patient_id)
                       .where(_order.accession_number == bindparam("accession")))


def _existing(connection: Connection, obj: ReceivedObject, replaces: StoredVersion | None) -> filing_rules.Existing:
    return _existing_of(_read(connection, obj), replaces)


class _Row(NamedTuple):
    """A :data:`_SNAPSHOT` row, its columns in order as the driver returns them (None: no such row; SQLite's
    booleans are integers)."""

    id: Any
    sha256: Any
    object_key: Any
    series_fk: Any
    source_ae: Any
    rejected: Any
    study_id: Any
    study_facility: Any
    provisional: Any
    patient_id: Any
    issuer_of_patient_id: Any
    has_reading: Any
    order_id: Any
    order_facility: Any
    order_patient_id: Any
    order_issuer: Any
    series_study_uid: Any
    instance_study_uid: Any
    instance_study_facility: Any


def _read(connection: Connection, obj: ReceivedObject) -> _Row:
    row = _SNAPSHOT_PREPARED.one_or_none(connection, {"sop": obj.sop_instance_uid,
                                                      "study_uid": obj.study_instance_uid,
                                                      "series_uid": obj.series_instance_uid})
    if row is None:  # pragma: no cover - left joins from a one-row select: always one row
        raise RuntimeError("the ownership snapshot returned no row")
    return _Row(*row)


def _existing_of(row: _Row, replaces: StoredVersion | None) -> filing_rules.Existing:
    """The policy's view of a :data:`_SNAPSHOT` row; the current version's study and sender only with
    ``replaces`` (the version the caller holds, read in the same transaction)."""
    study = row.study_id is not None
    return filing_rules.Existing(
        study_facility=row.study_facility, series_study_uid=row.series_study_uid,
        instance_study_uid=row.instance_study_uid if replaces is not None else None,
        instance_study_facility=row.instance_study_facility if replaces is not None else None,
        instance_source_ae=replaces.source_ae if replaces is not None else None,
        order=filing_rules.Owner(row.order_facility, row.order_patient_id, row.order_issuer)
        if row.order_id is not None else None,
        study_owner=filing_rules.Owner(row.study_facility, row.patient_id, row.issuer_of_patient_id)
        if study else None,
        # someone has read the study (a report, key images or a claim): it is no longer provisional, since a
        # claim would move its images away from the report written on them
        study_provisional=study and bool(row.provisional) and not row.has_reading)


def order_patient(session: Session, obj: ReceivedObject, source: IngestSource) -> dict[str, str] | None:
    """A held object filed as it is into an order's study not created yet: the study is created under the
    order's patient, not the object's (an order pins its study's patient)."""
    if source.resolution is None or source.resolution.action != reconciliation.FILE:
        return None
    order = session.scalars(select(ImagingOrder).where(
        ImagingOrder.study_instance_uid == obj.study_instance_uid)).one_or_none()
    if order is None:
        return None
    return {"patient_id": order.patient_id, "issuer_of_patient_id": order.issuer_of_patient_id,
            "patient_name": order.patient_name, "patient_name_search": order.patient_name_search,
            "patient_birth_date": order.patient_birth_date, "patient_sex": order.patient_sex}

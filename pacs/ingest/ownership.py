"""Who may write a received object's study: what the index and the RIS hold now, put to the policy.

Reads only; :mod:`pacs.security.filing_rules` decides (pure), and :mod:`pacs.ingest.service` asks twice:
before the object is stored (step 2 of its order of writes) and again with the rows locked (step 4).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol, cast

from sqlalchemy import Table, bindparam, exists, or_, select
from sqlalchemy.orm import Session

from pacs.db.models import Patient, Series, Study
from pacs.ingest.parsing import ReceivedObject
from pacs.ingest.source import IngestSource
from pacs.reconciliation import service as reconciliation
from pacs.reports.models import KeyImageSelection, Report, StudyClaim
from pacs.ris.models import ImagingOrder
from pacs.security import filing_rules


class StoredVersion(Protocol):
    """What the policy reads of the instance's current version: an :class:`Instance` or a row of its columns."""

    series_fk: int
    source_ae: str


def decide(session: Session, obj: ReceivedObject, replaces: StoredVersion | None,
           source: IngestSource) -> filing_rules.Decision:
    """The policy's decision for ``obj`` against what the index (and the RIS) hold now."""
    correction = source.correction
    if correction is not None and correction.study_instance_uid == obj.study_instance_uid:
        # the archive's corrected version of its own object (pacs.studies.corrections, which checked who may):
        # filed into the study it corrects, whatever patient it now names; the study keeps its facility
        facility = session.scalar(_STUDY_FACILITY, {"study_uid": obj.study_instance_uid})
        if facility is not None:
            return filing_rules.Decision(filing_rules.Verdict.FILE, facility=facility)
    existing = _existing(session, obj, replaces)
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
        order = session.execute(_ORDER_BY_ACCESSION, {"accession": accession[:16]}).one_or_none()
        if order is not None and filing_rules.same_patient(filing_rules.Owner(*order), patient_id, issuer):
            decision = replace(decision, facility=order[0])
    return decision


# Prebuilt on the tables (not the ORM entities), run with bound parameters: the ingest path runs them for every
# received object, and building and caching an ORM statement per call costs several times running it (issue 13).
_study_t, _patient_t, _series_t, _order_t = (cast(Table, m.__table__) for m in (Study, Patient, Series, ImagingOrder))
_study, _patient, _series, _order = _study_t.c, _patient_t.c, _series_t.c, _order_t.c
_STUDY_OWNER = (select(_study.facility, _study.provisional, _patient.patient_id, _patient.issuer_of_patient_id)
                .select_from(_study_t.join(_patient_t, _patient.id == _study.patient_fk))
                .where(_study.study_instance_uid == bindparam("study_uid")))
_STUDY_ORDER = (select(_order.facility, _order.patient_id, _order.issuer_of_patient_id)
                .where(_order.study_instance_uid == bindparam("study_uid")))
_SERIES_STUDY = (select(_study.study_instance_uid).select_from(_study_t.join(_series_t, _series.study_fk == _study.id))
                 .where(_series.series_instance_uid == bindparam("series_uid")))
_SERIES_ID_STUDY = (select(_study.study_instance_uid, _study.facility)
                    .select_from(_study_t.join(_series_t, _series.study_fk == _study.id))
                    .where(_series.id == bindparam("series_id")))
_HAS_READING = select(or_(*(exists().where(cast(Table, model.__table__).c.study_instance_uid == bindparam("study_uid"))
                            for model in (Report, KeyImageSelection, StudyClaim))))
_STUDY_FACILITY = select(_study.facility).where(_study.study_instance_uid == bindparam("study_uid"))
_ORDER_BY_ACCESSION = (select(_order.facility, _order.patient_id, _order.issuer_of_patient_id)
                       .where(_order.accession_number == bindparam("accession")))


def _existing(session: Session, obj: ReceivedObject, replaces: StoredVersion | None) -> filing_rules.Existing:
    uid = {"study_uid": obj.study_instance_uid}
    study = session.execute(_STUDY_OWNER, uid).one_or_none()
    order = session.execute(_STUDY_ORDER, uid).one_or_none()
    series_study = session.scalar(_SERIES_STUDY, {"series_uid": obj.series_instance_uid})
    instance_study = None
    if replaces is not None:
        instance_study = session.execute(_SERIES_ID_STUDY, {"series_id": replaces.series_fk}).one_or_none()
    return filing_rules.Existing(
        study_facility=study[0] if study else None, series_study_uid=series_study,
        instance_study_uid=instance_study[0] if instance_study else None,
        instance_study_facility=instance_study[1] if instance_study else None,
        instance_source_ae=replaces.source_ae if replaces is not None else None,
        order=filing_rules.Owner(*order) if order else None,
        study_owner=filing_rules.Owner(study[0], study[2], study[3]) if study else None,
        study_provisional=bool(study[1]) and not _has_reading(session, obj.study_instance_uid) if study else False)


def _has_reading(session: Session, study_uid: str) -> bool:
    """Someone has read the study (a report, key images or a claim): it is no longer provisional, since a
    claim would move its images away from the report written on them."""
    return bool(session.scalar(_HAS_READING, {"study_uid": study_uid}))


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

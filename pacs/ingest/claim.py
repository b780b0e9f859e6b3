"""A trusted exam claims a provisional study (rule 3 of :mod:`pacs.security.filing_rules`).

Runs inside the ingest's index transaction (step 4 of :mod:`pacs.ingest.service`): each object of the
provisional study is copied under ``reconciliation/`` and queued for the claiming facility before its rows are
removed; the caller deletes the old ``dicom/`` objects only after commit.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pacs.db.models import DerivedTask, ForwardJob, Instance, InstanceVersion, Patient, Series, Study
from pacs.ingest.parsing import ReceivedObject
from pacs.ingest.source import IngestSource, who
from pacs.reconciliation import service as reconciliation
from pacs.reconciliation.models import UNTRUSTED_FIRST
from pacs.security import filing_rules
from pacs.security.models import StudyShare
from storage import ObjectStore, StorageError
from storage.keys import reconciliation_key

log = logging.getLogger(__name__)


class ClaimStoreFailed(Exception):
    """The object store failed while a claimed study's objects were moved to the queue."""


def claim_provisional_study(session: Session, store: ObjectStore, obj: ReceivedObject, source: IngestSource,
                            decision: filing_rules.Decision) -> list[str]:
    """Move the provisional study ``obj`` names to the reconciliation queue, so the trusted object creates the
    study afresh. Each object of it (current and prior versions) is copied under ``reconciliation/`` and queued
    for the claiming facility, then its rows (and the study's) are removed.
    Returns the ``dicom/`` keys to delete after commit; raises ClaimStoreFailed when the store fails."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == obj.study_instance_uid)
                            .with_for_update()).one()
    patient = session.get(Patient, study.patient_fk)
    series = {s.id: s for s in session.scalars(select(Series).where(Series.study_fk == study.id))}
    instances = list(session.scalars(select(Instance).where(Instance.series_fk.in_(list(series)))))
    sops = [i.sop_instance_uid for i in instances]
    versions = list(session.scalars(select(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(sops))))
    by_sop = {i.sop_instance_uid: i for i in instances}
    queue = filing_rules.Decision(
        filing_rules.Verdict.HOLD, facility=decision.facility, reason=UNTRUSTED_FIRST,
        expected=filing_rules.Owner(decision.facility, obj.patient["patient_id"],
                                     obj.patient["issuer_of_patient_id"]),
        message=f"sent by an unregistered peer before a trusted exam ({who(source)}) claimed this study UID")
    entries = [(i, i.object_key, i.sha256, i.size, i.source_ae, i.source_address) for i in instances]
    entries += [(by_sop[v.sop_instance_uid], v.object_key, v.sha256, v.size, v.source_ae, "") for v in versions]
    moved: list[str] = []
    for inst, key, sha, size, ae, address in entries:
        held_key = reconciliation_key(sha)
        try:
            if not store.exists(held_key):
                data = store.get_bytes(key)
                store.put(held_key, data, length=len(data), content_type="application/dicom")
        except StorageError as exc:
            raise ClaimStoreFailed(str(exc)) from exc
        held = reconciliation.HeldObject(
            obj.study_instance_uid, series[inst.series_fk].series_instance_uid, inst.sop_instance_uid,
            inst.sop_class_uid, patient.patient_id if patient else "",
            patient.issuer_of_patient_id if patient else "", patient.patient_name if patient else "", size,
            inst.source, ae, address)
        reconciliation.hold(session, held, queue, key=held_key, sha256=sha)
        moved.append(key)
    subjects = sops + [s.series_instance_uid for s in series.values()]
    session.execute(delete(DerivedTask).where(DerivedTask.subject_uid.in_(subjects)))
    session.execute(delete(ForwardJob).where(ForwardJob.sop_instance_uid.in_(sops)))
    session.execute(delete(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(sops)))
    session.execute(delete(Instance).where(Instance.sop_instance_uid.in_(sops)))
    session.execute(delete(Series).where(Series.study_fk == study.id))
    session.execute(delete(StudyShare).where(StudyShare.study_fk == study.id))
    session.execute(delete(Study).where(Study.id == study.id))
    session.expunge_all()  # the rows above are gone; nothing stale may be flushed again
    log.warning("study %s: provisional (unregistered sender) claimed by %s; %d object(s) moved to "
                "reconciliation", obj.study_instance_uid, who(source), len(moved))
    return moved

"""What a signed report becomes in the archive: its DICOM SR (an outbox task) and key images (a KOS).

Both objects are built from the study's own instances (patient and study attributes come from the
evidence, never typed in again) and stored through the one ingest function, so they travel with
the images: C-FIND, QIDO-RS, WADO and C-MOVE find them like any other instance.

SR UIDs are derived from the report (study, report id and creation time, version), so a task that
runs again after a crash builds the same object with the same UIDs: ingest answers duplicate (or a
new version of the same instance), never a second SR.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs import audit
from pacs.context import AppContext
from pacs.db.models import Instance, Series, Study
from pacs.errors import InvalidInput, NotFound, PacsError
from pacs.ingest import IngestSource, IngestStatus
from pacs.reports.lifecycle import parse_version_subject, report_document
from pacs.reports.models import SIGNED_STATES, KeyImageSelection, Report, ReportVersion
from pacs.security.access import may_see_study
from pacs.security.principal import Principal
from storage import ObjectNotFound, StorageUnavailable

log = logging.getLogger(__name__)

MAX_EVIDENCE = 20  # instances read as evidence (one per series, first ones)
MAX_KEY_IMAGES = 500
_SPOOL_BYTES = 16 * 1024 * 1024
_NON_IMAGE_MODALITIES = ("SR", "KO", "PR", "DOC")


class PublishFailed(PacsError):
    """The object could not be stored for a reason that will not go away by retrying."""


def derived_uid(*parts: str) -> str:
    """A UID under 2.25 from a hash of ``parts`` (PS3.5 B.2): stable for the same parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


# -- the SR of a signed version (outbox kind "report-sr") ---------------------------------------------


def build_report_sr_task(ctx: AppContext, subject_uid: str, _sha256: str) -> str | None:
    """Build and store the SR of one signed report version; records its SOP Instance UID on the version.

    Returns a note for the outbox row; raises StorageUnavailable (transient: retried) when the store
    or the index is down, and PublishFailed when ingest refuses the object.
    """
    from pacs.reports.sr import build_report_sr

    report_id, version = parse_version_subject(subject_uid)
    with ctx.read_sessions() as session:
        doc = report_document(session, report_id, version, facility_name=facility_names(ctx))
        if doc.status not in SIGNED_STATES:
            return f"report {report_id} version {version} is {doc.status}: no SR"
        report = session.get(Report, report_id)
        assert report is not None  # report_document found it
        created = report.created_at.isoformat() if report.created_at else ""
        facility = _study_facility(session, doc.study_instance_uid)
        predecessor = _previous_sr(session, report_id, version)
        keys = evidence_keys(session, doc.study_instance_uid)
    if not keys:
        return "the study has no images to report on: no SR"
    evidence = read_evidence(ctx, keys)
    series_uid = derived_uid("report-sr-series", doc.study_instance_uid, str(report_id), created)
    sop_uid = derived_uid("report-sr", doc.study_instance_uid, str(report_id), created, str(version))
    dataset = build_report_sr(doc, evidence, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                              instance_number=version, institution_name=doc.facility_name,
                              predecessor=predecessor)
    _store(ctx, dataset, IngestSource(transport="report", user=doc.signed_by, role="radiologist",
                                      facility=facility))
    with ctx.sessions() as session, session.begin():
        row = session.scalars(select(ReportVersion).where(ReportVersion.report_fk == report_id,
                                                          ReportVersion.version == version)).one()
        row.sr_sop_instance_uid = sop_uid
    log.info("report %s version %s: SR %s stored", report_id, version, sop_uid)
    return None


def _previous_sr(session: Session, report_id: int, version: int) -> tuple[str, str, str] | None:
    """(series, SOP instance, SOP class) of the SR of the version this one amends, when it was stored."""
    previous = session.scalar(select(ReportVersion.sr_sop_instance_uid).where(
        ReportVersion.report_fk == report_id, ReportVersion.version < version,
        ReportVersion.status.in_(SIGNED_STATES), ReportVersion.sr_sop_instance_uid != "").order_by(
        ReportVersion.version.desc()).limit(1))
    if not previous:
        return None
    found = session.execute(select(Series.series_instance_uid, Instance.sop_class_uid)
                            .join(Instance, Instance.series_fk == Series.id)
                            .where(Instance.sop_instance_uid == previous)).one_or_none()
    return (found.series_instance_uid, previous, found.sop_class_uid) if found else None


# -- key images (a Key Object Selection document) -----------------------------------------------------


@dataclass(frozen=True)
class KeyImages:
    study_instance_uid: str
    kos_sop_instance_uid: str
    kos_series_instance_uid: str
    instances: tuple[tuple[str, str], ...]  # (series uid, sop uid)
    created_by: str


def mark_key_images(ctx: AppContext, principal: Principal, study_instance_uid: str,
                    sop_instance_uids: Sequence[str], description: str = "") -> KeyImages:
    """Store a KOS naming these instances of the study (each must be an image of it) and remember it."""
    from pacs.reports.key_images import build_key_object_selection

    uids = list(dict.fromkeys(u.strip() for u in sop_instance_uids if u.strip()))
    if not uids:
        raise InvalidInput("name at least one instance")
    if len(uids) > MAX_KEY_IMAGES:
        raise InvalidInput(f"at most {MAX_KEY_IMAGES} key images")
    with ctx.read_sessions() as session:
        # a change: a borrowed study (a person's prior, a consult's study) is read-only; key images show on
        # the owning facility's patient share page
        if not may_see_study(session, principal.scope, study_instance_uid, borrowed=False):
            raise NotFound(f"no study {study_instance_uid}")
        found = session.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.object_key,
                   Series.series_instance_uid)
            .join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
            .where(Study.study_instance_uid == study_instance_uid, Instance.sop_instance_uid.in_(uids))).all()
        facility = _study_facility(session, study_instance_uid)
    missing = sorted(set(uids) - {r.sop_instance_uid for r in found})
    if missing:
        raise InvalidInput(f"not instances of this study: {', '.join(missing[:5])}")
    by_uid = {r.sop_instance_uid: r for r in found}
    selected = [(by_uid[u].series_instance_uid, u, by_uid[u].sop_class_uid) for u in uids]
    evidence = read_evidence(ctx, [by_uid[u].object_key for u in uids[:MAX_EVIDENCE]])
    sop_uid = derived_uid("kos", study_instance_uid, principal.subject, *uids)
    series_uid = derived_uid("kos-series", study_instance_uid)
    dataset = build_key_object_selection(evidence, selected, series_instance_uid=series_uid,
                                         sop_instance_uid=sop_uid, description=description[:64])
    _store(ctx, dataset, IngestSource(transport="report", user=principal.subject, role=principal.role.value,
                                      address=principal.source_address, facility=facility))
    instances = tuple((s, u) for s, u, _ in selected)
    with ctx.sessions() as session, session.begin():
        existing = session.scalars(select(KeyImageSelection).where(
            KeyImageSelection.kos_sop_instance_uid == sop_uid)).one_or_none()
        if existing is None:
            session.add(KeyImageSelection(study_instance_uid=study_instance_uid, kos_sop_instance_uid=sop_uid,
                                          kos_series_instance_uid=series_uid,
                                          instances_json=json.dumps([list(i) for i in instances]),
                                          created_by=principal.subject[:128]))
        audit.append(session, action="study.key-images", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, study_instance_uid=study_instance_uid,
                     detail=f"KOS {sop_uid} with {len(uids)} instance(s)")
    return KeyImages(study_instance_uid, sop_uid, series_uid, instances, principal.subject)


def key_images(session: Session, principal: Principal, study_instance_uid: str) -> list[KeyImages]:
    if not may_see_study(session, principal.scope, study_instance_uid):
        raise NotFound(f"no study {study_instance_uid}")
    rows = session.scalars(select(KeyImageSelection).where(
        KeyImageSelection.study_instance_uid == study_instance_uid).order_by(KeyImageSelection.id))
    return [KeyImages(r.study_instance_uid, r.kos_sop_instance_uid, r.kos_series_instance_uid,
                      tuple((s, u) for s, u in json.loads(r.instances_json)), r.created_by) for r in rows]


# -- shared -------------------------------------------------------------------------------------------


def evidence_keys(session: Session, study_instance_uid: str) -> list[str]:
    """Object keys of the first instance of each image series of the study (at most MAX_EVIDENCE)."""
    rows = session.execute(
        select(Series.id, Series.modality, Instance.object_key)
        .join(Instance, Instance.series_fk == Series.id).join(Study, Study.id == Series.study_fk)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(Series.series_number.asc().nulls_last(), Series.id, Instance.instance_number.asc().nulls_last(),
                  Instance.id)).all()
    keys: list[str] = []
    seen: set[int] = set()
    for series_id, modality, key in rows:
        if series_id in seen or (modality or "").upper() in _NON_IMAGE_MODALITIES:
            continue
        seen.add(series_id)
        keys.append(key)
        if len(keys) >= MAX_EVIDENCE:
            break
    return keys


def read_evidence(ctx: AppContext, keys: Sequence[str]) -> list[Dataset]:
    """The stored objects' headers (pixel data never read), each from a bounded local copy."""
    datasets: list[Dataset] = []
    for key in keys:
        try:
            with ctx.store.open(key) as stream, tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as local:
                while chunk := stream.read(1024 * 1024):
                    local.write(chunk)
                local.seek(0)
                datasets.append(dcmread(local, stop_before_pixels=True))
        except ObjectNotFound:
            log.warning("evidence object %s is missing from the store", key)
    return datasets


def facility_names(ctx: AppContext) -> Callable[[str], str | None] | None:
    """The printed facility names (``PACS_FACILITY_NAMES``), as a lookup for report documents."""
    names: dict[str, str] = getattr(ctx.settings, "facility_names", None) or {}
    return names.get if names else None


def _study_facility(session: Session, study_instance_uid: str) -> str:
    return session.scalar(select(Study.facility).where(Study.study_instance_uid == study_instance_uid)) or ""


def _store(ctx: AppContext, dataset: Dataset, source: IngestSource) -> None:
    from pacs.runtime import make_ingestor

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    publisher = ctx.extras.get("ingest_notify")
    outcome = make_ingestor(ctx, notify=publisher if callable(publisher) else None).ingest(buffer.getvalue(),
                                                                                          source)
    if outcome.status in (IngestStatus.STORAGE_UNAVAILABLE, IngestStatus.INDEX_UNAVAILABLE):
        raise StorageUnavailable(outcome.message)
    if not outcome.ok:
        raise PublishFailed(f"the archive refused the object: {outcome.message}")

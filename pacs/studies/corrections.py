"""Correct a study's patient and study attributes, move a series to another study or a study to another patient.

Stored objects are never rewritten in place. For each current object of the studies concerned, a corrected copy
is made (:mod:`pacs.studies.rewrite`: same transfer syntax, pixel data untouched) and archived through the one
ingest function as a new version of the same SOP Instance UID, the prior kept in ``instance_version``. Its
:class:`pacs.ingest.source.Correction` marker lets the filing rules file it into the study it corrects and makes
the index writer apply its values (patient record, the study's patient, study attributes, a moved series row).
Ingest does the rest as for any new version: derived products are rebuilt, forwarding rules re-send, person
linking follows, one ``instance.store-new-version`` audit row per object. One ``study.correct`` (``series.move``)
row records who, why, and the values before and after; every refusal is audited with outcome ``failure``.

Patient-level facts: a new name, birth date or sex is a fact of the patient record (Patient ID + issuer, per
facility), not of one study, so every study of that record at the facility gets corrected versions too, and a
C-MOVE of any of them delivers the new name. A new Patient ID/issuer moves only this study to that record (created
when new); the record it leaves keeps its other studies unchanged.

Objects are handled one at a time (one object's bytes in memory). A crash half-way leaves every object either
in its old or in its corrected version, each consistent with the index; running the same correction again
finishes it: an object that already carries the corrected values is left as it is (no new version). Corrections
are serialised (a lock per process, and a PostgreSQL advisory lock across the processes of a scaled archive); one
that cannot get the lock within :data:`LOCK_WAIT_SECONDS` is refused (409, try again) rather than tying up a
request thread. Before each corrected version is ingested, a correction marker
(:func:`storage.keys.correction_marker_key`) is written to the store: ``pacs reindex`` applies a corrected version's
values only when its marker is there, so an Original Attributes item a sender forged is never taken for ours.

Refused while the study (or, for a patient-level change, any study of the patient record; for a series move, the
series) has rejected instances: they are out of the ``instance`` table, would not be rewritten and, restored, would
come back with the old values (restore or delete them first). Not corrected: the RIS order of the study (its
patient stays as ordered).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from pacs import audit
from pacs.context import AppContext
from pacs.db.models import Instance, InstanceVersion, Patient, Series, Study
from pacs.derived.outbox import SERIES_TASKS, arm_derived_tasks
from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound
from pacs.ingest.outcome import IngestStatus
from pacs.ingest.source import Correction, IngestSource
from pacs.reports.models import Report
from pacs.security.access import Forbidden, authorize, may_see_study, owned_study_condition
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies.common import check_reason, chunks, refusals_audited
from pacs.studies.models import RejectedInstance
from pacs.studies.rewrite import rewrite
from storage import StorageError
from storage.keys import correction_marker_key

if TYPE_CHECKING:
    from pacs.ingest.service import Ingestor

Progress = Callable[[int, int], None]  # (objects done, objects in all)

_LOCK = threading.Lock()  # one correction at a time per process (they are rare; two on one study must not mix)
_ADVISORY_KEY = 0x50414353_0F  # PostgreSQL: one correction at a time across the archive's processes
LOCK_WAIT_SECONDS = 5.0  # how long a correction waits for another one to finish before it is refused (409)
_BUSY = "another correction is running, try again in a moment"
_REJECTED = "restore or delete the rejected instances of this study first"

PATIENT_KEYWORDS = {"name": "PatientName", "id": "PatientID", "issuer": "IssuerOfPatientID",
                    "birth_date": "PatientBirthDate", "sex": "PatientSex"}
SEXES = ("M", "F", "O")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class PatientChanges:
    """New patient attributes; None: unchanged ('' empties issuer or birth date)."""

    name: str | None = None
    id: str | None = None
    issuer: str | None = None
    birth_date: str | None = None
    sex: str | None = None

    def given(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class StudyChanges:
    patient: PatientChanges = field(default_factory=PatientChanges)
    accession_number: str | None = None
    description: str | None = None

    def empty(self) -> bool:
        return not self.patient.given() and self.accession_number is None and self.description is None


@dataclass
class CorrectionResult:
    """What a correction (or move) did: the values before and after, and how many objects got a new version."""

    study_instance_uid: str
    before: dict[str, object]
    after: dict[str, object]
    objects_rewritten: int = 0
    objects_unchanged: int = 0  # already carried the corrected values (a correction run again)
    studies: list[str] = field(default_factory=list)  # every study whose objects were gone through

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    sha256: str
    size: int
    received_at: datetime
    replaced_at: datetime | None  # None: the current version
    source_ae: str
    transfer_syntax_uid: str
    object_key: str

    def as_json(self) -> dict[str, object]:
        return {"version": self.version, "sha256": self.sha256, "size": self.size,
                "received_at": self.received_at.isoformat(),
                "replaced_at": self.replaced_at.isoformat() if self.replaced_at else None,
                "current": self.replaced_at is None, "source_ae": self.source_ae,
                "transfer_syntax_uid": self.transfer_syntax_uid}


# ---------------------------------------------------------------------------------------------------- validation

def validate(changes: StudyChanges, reason: str) -> StudyChanges:
    """The changes, trimmed and checked against their VRs; InvalidInput says what is wrong."""
    check_reason(reason, "correction")
    if changes.empty():
        raise InvalidInput("nothing to correct: give at least one of patient name, id, issuer, birth_date, sex, "
                           "accession_number, description")
    p = changes.patient
    name = _text(p.name, "patient name", 64 * 3 + 2) if p.name is not None else None
    if name is not None:
        if not name:
            raise InvalidInput("patient name must not be empty")
        groups = name.split("=")
        if len(groups) > 3 or any(len(g) > 64 or len(g.split("^")) > 5 for g in groups):
            raise InvalidInput("patient name must be in DICOM PN form: family^given^middle^prefix^suffix "
                               "(at most 5 components, 64 characters), e.g. Nguyễn^Văn^An")
    pid = _text(p.id, "patient id", 64) if p.id is not None else None
    if pid is not None and not pid:
        raise InvalidInput("patient id must not be empty")
    issuer = _text(p.issuer, "issuer", 64) if p.issuer is not None else None
    birth = p.birth_date.strip() if p.birth_date is not None else None
    if birth:
        try:
            parsed = datetime.strptime(birth, "%Y%m%d").replace(tzinfo=UTC)
        except ValueError:
            raise InvalidInput(f"birth_date must be a date as YYYYMMDD, not {birth[:20]!r}") from None
        if len(birth) != 8 or parsed > datetime.now(UTC):
            raise InvalidInput(f"birth_date must be a past date as YYYYMMDD, not {birth[:20]!r}")
    sex = p.sex.strip().upper() if p.sex is not None else None
    if sex is not None and sex not in SEXES:
        raise InvalidInput("sex must be M, F or O")
    accession = _text(changes.accession_number, "accession_number", 16) \
        if changes.accession_number is not None else None
    description = _text(changes.description, "description", 64) if changes.description is not None else None
    return StudyChanges(PatientChanges(name, pid, issuer, birth, sex), accession, description)


def _text(value: str, what: str, limit: int) -> str:
    value = unicodedata.normalize("NFC", value.strip())  # one spelling of "Ấn" whatever the keyboard sent
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    if _CONTROL.search(value):
        raise InvalidInput(f"{what} must not contain a backslash or control characters")
    return value


# ---------------------------------------------------------------------------------------------------- correct

def correct_study(ctx: AppContext, principal: Principal, study_uid: str, changes: StudyChanges, reason: str,
                  *, progress: Progress | None = None) -> CorrectionResult:
    """Correct ``study_uid``'s patient and study attributes (see the module docstring); audited as
    ``study.correct``. NotFound when the study is unknown or out of the principal's scope."""
    with refusals_audited(ctx, principal, "study.correct", study_uid):
        authorize(principal, Capability.STUDY_CORRECT)
        changes = validate(changes, reason)
        with _exclusive(ctx):
            return _correct(ctx, principal, study_uid, changes, reason.strip(), progress)


def move_study(ctx: AppContext, principal: Principal, study_uid: str, patient_id: str, issuer: str, reason: str,
               *, progress: Progress | None = None) -> CorrectionResult:
    """Move a study to another, existing patient record of its facility (a correction of the patient identity:
    the objects take that patient's name, ID, issuer, birth date and sex)."""
    with refusals_audited(ctx, principal, "study.correct", study_uid):
        authorize(principal, Capability.STUDY_CORRECT)
        check_reason(reason, "correction")
        patient_id, issuer = _text(patient_id, "patient id", 64), _text(issuer, "issuer", 64)
        if not patient_id:
            raise InvalidInput("name the patient to move the study to (to_patient.id)")
        with ctx.read_sessions() as session:
            study = _visible_study(session, principal, study_uid)
            found = session.scalar(select(Patient.id).where(Patient.patient_id == patient_id,
                                                            Patient.issuer_of_patient_id == issuer,
                                                            Patient.facility == study.facility))
            if found is None:
                raise NotFound(f"no patient {patient_id} (issuer {issuer or '-'}) at the study's facility")
        changes = StudyChanges(PatientChanges(id=patient_id, issuer=issuer))
        with _exclusive(ctx):
            return _correct(ctx, principal, study_uid, changes, reason.strip(), progress)


def _correct(ctx: AppContext, principal: Principal, study_uid: str, changes: StudyChanges, reason: str,
             progress: Progress | None) -> CorrectionResult:
    with ctx.read_sessions() as session:
        study = _visible_study(session, principal, study_uid)
        current = study.patient
        before = _state(study)
        given = changes.patient.given()
        new_id = given.get("id", current.patient_id)
        new_issuer = given.get("issuer", current.issuer_of_patient_id)
        moving = (new_id, new_issuer) != (current.patient_id, current.issuer_of_patient_id)
        target = session.scalars(select(Patient).where(
            Patient.patient_id == new_id, Patient.issuer_of_patient_id == new_issuer,
            Patient.facility == study.facility)).one_or_none() if moving else current
        base = target if target is not None else current
        patient = {"name": base.patient_name, "id": new_id, "issuer": new_issuer,
                   "birth_date": base.patient_birth_date, "sex": base.patient_sex}
        patient.update({k: v for k, v in given.items() if k not in ("id", "issuer")})
        # a new name, birth date or sex is the patient record's: all its studies at the facility follow
        demographics = any(k in given for k in ("name", "birth_date", "sex"))
        studies = [study_uid]
        if demographics and target is not None:
            others = session.execute(select(Study.study_instance_uid, owned_study_condition(principal.scope),
                                            Study.number_of_instances)
                                     .where(Study.patient_fk == target.id, Study.study_instance_uid != study_uid,
                                            Study.facility == study.facility)
                                     .order_by(Study.id)).all()
            if any(not owned for _, owned, _ in others):
                raise Forbidden("this patient has studies outside your scope: ask an administrator to correct "
                                "the patient's name, birth date or sex")
            # an empty study has nothing to rewrite, but may have rejected instances (checked below)
            _refuse_if_rejected(session, [uid for uid, _, _ in others])
            studies += [uid for uid, _, count in others if count > 0]
        _refuse_if_rejected(session, [study_uid])
        facility = study.facility
    patient_values = {PATIENT_KEYWORDS[k]: v for k, v in patient.items()}
    study_values: dict[str, str] = {}
    study_fields: list[str] = []
    if changes.accession_number is not None:
        study_values["AccessionNumber"] = changes.accession_number
        study_fields.append("accession_number")
    if changes.description is not None:
        study_values["StudyDescription"] = changes.description
        study_fields.append("study_description")

    plan = [(uid, _study_objects(ctx, uid)) for uid in studies]
    total = sum(len(objects) for _, objects in plan)
    result = CorrectionResult(study_uid, before, {}, studies=studies)
    done = 0
    ingestor = _ingestor(ctx)
    for uid, objects in plan:
        values = {**patient_values, **(study_values if uid == study_uid else {})}
        correction = Correction(uid, principal.subject, tuple(study_fields) if uid == study_uid else ())
        for sop in objects:
            _correct_object(ctx, ingestor, principal, sop, values, correction, facility, result)
            done += 1
            if progress is not None:
                progress(done, total)
    with ctx.sessions() as session, session.begin():
        result.after = _state(_study(session, study_uid))
        # the study's reports keep copies of its Patient ID and accession number (the reading list, FHIR)
        session.execute(update(Report).where(Report.study_instance_uid == study_uid).values(
            patient_id=patient["id"], accession_number=result.after["accession_number"]))
    _audit_done(ctx, principal, "study.correct", study_uid, patient["id"], reason, result)
    return result


# ---------------------------------------------------------------------------------------------------- move series

def move_series(ctx: AppContext, principal: Principal, series_uid: str, to_study_uid: str, reason: str,
                *, progress: Progress | None = None) -> CorrectionResult:
    """Move a series to another study of the same facility (the right patient's): each object gets a new version
    with the target's Study Instance UID and its patient and study attributes. The series row (with every instance
    row of it) moves with the *first* corrected object (:mod:`pacs.ingest.index_writer`): interrupted, the series
    shows in the target study while its later objects still carry the old study's values; running the same move
    again finishes it (the series is then found in the target study and only those objects are rewritten). Audited
    as ``series.move``. NotFound when either is unknown or not the principal's to change; InvalidInput across
    facilities; Conflict while the series has rejected instances."""
    with refusals_audited(ctx, principal, "series.move", to_study_uid, f"series {series_uid}: "):
        authorize(principal, Capability.STUDY_CORRECT)
        reason = check_reason(reason, "move")
        with _exclusive(ctx):
            return _move_series(ctx, principal, series_uid, to_study_uid, reason, progress)


def _move_series(ctx: AppContext, principal: Principal, series_uid: str, to_study_uid: str, reason: str,
                 progress: Progress | None) -> CorrectionResult:
    with ctx.read_sessions() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one_or_none()
        source = session.get(Study, series.study_fk) if series is not None else None
        if series is None or source is None or not _owned(session, principal, source.study_instance_uid):
            raise NotFound(f"no series {series_uid}")
        target = _visible_study(session, principal, to_study_uid)
        if target.facility != source.facility:
            raise InvalidInput(f"the series is of facility {source.facility or '-'} and the study of facility "
                               f"{target.facility or '-'}: a series can only move within its facility")
        from_uid = source.study_instance_uid
        _refuse_if_rejected(session, [from_uid], series_uid=series_uid)
        before = {"study_instance_uid": from_uid, **_state(source)}
        p = target.patient
        values = {"StudyInstanceUID": target.study_instance_uid, "PatientName": p.patient_name,
                  "PatientID": p.patient_id, "IssuerOfPatientID": p.issuer_of_patient_id,
                  "PatientBirthDate": p.patient_birth_date, "PatientSex": p.patient_sex,
                  "AccessionNumber": target.accession_number, "StudyDate": target.study_date,
                  "StudyTime": target.study_time, "StudyID": target.study_id,
                  "StudyDescription": target.study_description}
        objects = list(session.scalars(select(Instance.sop_instance_uid).where(Instance.series_fk == series.id)
                                       .order_by(Instance.instance_number, Instance.id)))
        facility = target.facility
    result = CorrectionResult(to_study_uid, before, {}, studies=[to_study_uid])
    correction = Correction(to_study_uid, principal.subject)
    ingestor = _ingestor(ctx)
    for done, sop in enumerate(objects, start=1):
        _correct_object(ctx, ingestor, principal, sop, values, correction, facility, result)
        if progress is not None:
            progress(done, len(objects))
    with ctx.sessions() as session, session.begin():
        # the study the series left: its study thumbnail may have come from the series (pacs.derived.series)
        left = session.scalars(select(Series.series_instance_uid).join(Study, Study.id == Series.study_fk)
                               .where(Study.study_instance_uid == from_uid)).all()
        tasks = [t for uid in left for t in arm_derived_tasks(session, uid, "", SERIES_TASKS)]
        session.flush()
        task_ids = tasks
        result.after = {"study_instance_uid": to_study_uid, **_state(_study(session, to_study_uid))}
    notify = ctx.extras.get("ingest_notify")
    if task_ids and callable(notify):
        notify(task_ids)
    result.before["series_instance_uid"] = series_uid
    result.after["series_instance_uid"] = series_uid
    _audit_done(ctx, principal, "series.move", to_study_uid, values["PatientID"], reason, result)
    return result


# ---------------------------------------------------------------------------------------------------- versions

def list_versions(ctx: AppContext, principal: Principal, sop_uid: str) -> list[VersionInfo]:
    """Every stored version of an instance, the current one last; audited as ``instance.version-read``."""
    with refusals_audited(ctx, principal, "instance.version-read", "", f"instance {sop_uid}: "):
        versions, study_uid, patient_id = _versions(ctx, principal, sop_uid)
    _audit_read(ctx, principal, study_uid, patient_id, f"instance {sop_uid}: {len(versions)} version(s) listed")
    return versions


def read_version(ctx: AppContext, principal: Principal, sop_uid: str, version: int) -> VersionInfo:
    """One stored version of an instance (the caller streams ``object_key`` from the store); audited."""
    with refusals_audited(ctx, principal, "instance.version-read", "", f"instance {sop_uid} v{version}: "):
        versions, study_uid, patient_id = _versions(ctx, principal, sop_uid)
        found = next((v for v in versions if v.version == version), None)
        if found is None:
            raise NotFound(f"instance {sop_uid} has no version {version}")
    assert found is not None
    _audit_read(ctx, principal, study_uid, patient_id, f"instance {sop_uid} version {version} sha256={found.sha256}")
    return found


def _versions(ctx: AppContext, principal: Principal, sop_uid: str) -> tuple[list[VersionInfo], str, str]:
    with ctx.read_sessions() as session:
        current, study_uid, patient_id = _visible_instance(session, principal, sop_uid)
        prior = session.scalars(select(InstanceVersion).where(InstanceVersion.sop_instance_uid == sop_uid)
                                .order_by(InstanceVersion.version)).all()
        versions = [VersionInfo(v.version, v.sha256, v.size, v.received_at, v.replaced_at, v.source_ae,
                                v.transfer_syntax_uid, v.object_key) for v in prior]
        versions.append(VersionInfo(current.version, current.sha256, current.size, current.received_at, None,
                                    current.source_ae, current.transfer_syntax_uid, current.object_key))
    return versions, study_uid, patient_id


# ---------------------------------------------------------------------------------------------------- helpers

@contextmanager
def _exclusive(ctx: AppContext) -> Iterator[None]:
    """One correction at a time: in this process (a lock) and, on PostgreSQL, across the archive's processes (a
    session-level advisory lock on a connection of its own, released when the correction ends or the process dies).
    Serialised, a correction reads each object after the previous one has finished: no two versions are made of
    one correction. Neither lock is waited for longer than :data:`LOCK_WAIT_SECONDS` (a correction runs in an HTTP
    request's worker thread: waiting ones must not pile up): Conflict, try again."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    if not _LOCK.acquire(timeout=LOCK_WAIT_SECONDS):
        raise Conflict(_BUSY)
    try:
        with ctx.sessions() as session:
            engine = session.get_bind()
        if engine.dialect.name != "postgresql":
            yield
            return
        with engine.connect() as connection:  # type: ignore[union-attr]
            while not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": _ADVISORY_KEY}):
                connection.commit()
                if time.monotonic() >= deadline:
                    raise Conflict(_BUSY)
                time.sleep(0.2)
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_KEY})
                connection.commit()
    finally:
        _LOCK.release()


def _refuse_if_rejected(session: Session, study_uids: Iterable[str], *, series_uid: str | None = None) -> None:
    """Conflict when one of the studies (or, given ``series_uid``, that series) has rejected instances: a correction
    cannot rewrite them (they are out of ``instance``), so a restore would bring back the old values — or, for a
    moved series, fail (its series is elsewhere now)."""
    uids = list(dict.fromkeys(study_uids))
    for part in chunks(uids):
        query = select(RejectedInstance.study_instance_uid).where(RejectedInstance.study_instance_uid.in_(part))
        if series_uid is not None:
            query = query.where(RejectedInstance.series_instance_uid == series_uid)
        found = session.scalar(query.limit(1))
        if found is not None:
            where = f"series {series_uid}" if series_uid is not None else f"study {found}"
            raise Conflict(f"{where} has rejected instances: {_REJECTED}")


def _ingestor(ctx: AppContext) -> Ingestor:
    from pacs.runtime import make_ingestor  # the process's one ingest function (imports the whole runtime)

    notify = ctx.extras.get("ingest_notify")
    return make_ingestor(ctx, notify=notify if callable(notify) else None)


def _correct_object(ctx: AppContext, ingestor: Ingestor, principal: Principal, sop: str, values: dict[str, str],
                    correction: Correction, facility: str, result: CorrectionResult) -> None:
    """One object: read its current version, write the corrected copy through ingest (or nothing when it
    already carries the values)."""
    with ctx.read_sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one_or_none()
        if row is None:  # gone meanwhile (rejected, deleted): nothing to correct
            return
        key, source_ae = row.object_key, row.source_ae
    try:
        data = ctx.store.get_bytes(key)
    except StorageError as exc:
        raise IndexUnavailable(f"object store unavailable reading {sop}: {exc}"[:300]) from exc
    try:
        corrected = rewrite(data, values, assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1,
                            modifying_system=ctx.settings.ae_title)
    except Exception as exc:  # an object pydicom cannot write back: stop here, the rest stays as it is
        raise Conflict(f"object {sop} could not be rewritten ({type(exc).__name__}: {str(exc)[:200]}); "
                       f"{result.objects_rewritten} object(s) corrected so far, run again after fixing it") from exc
    if corrected is None:
        result.objects_unchanged += 1
        return
    _write_marker(ctx, sop, corrected, correction)
    source = IngestSource(transport="correction", calling_ae=source_ae, address=principal.source_address,
                          user=principal.subject, role=principal.role.value, facility=facility,
                          correction=correction)
    outcome = ingestor.ingest(corrected, source, expected_sop_instance_uid=sop)
    if outcome.status in (IngestStatus.STORAGE_UNAVAILABLE, IngestStatus.INDEX_UNAVAILABLE):
        raise IndexUnavailable(f"{outcome.message}; {result.objects_rewritten} object(s) corrected so far, "
                               "run the correction again to finish it")
    if not outcome.ok or outcome.status is IngestStatus.HELD:
        raise Conflict(f"the archive refused the corrected {sop}: {outcome.message or outcome.status}")
    if outcome.status is IngestStatus.DUPLICATE:
        result.objects_unchanged += 1
    else:
        result.objects_rewritten += 1


def _write_marker(ctx: AppContext, sop: str, corrected: bytes, correction: Correction) -> None:
    """The store's proof that this archive made this version (``pacs reindex`` applies a corrected version's values
    only when it is there): written before the version is ingested, so no indexed correction lacks one."""
    body = json.dumps({"sop_instance_uid": sop, "study_instance_uid": correction.study_instance_uid,
                       "study_fields": list(correction.study_fields), "by": correction.principal,
                       "at": datetime.now(UTC).isoformat()}, ensure_ascii=False).encode()
    try:
        ctx.store.put(correction_marker_key(sop, hashlib.sha256(corrected).hexdigest()), body,
                      length=len(body), content_type="application/json")
    except StorageError as exc:
        raise IndexUnavailable(f"object store unavailable writing the correction marker of {sop}: {exc}"[:300]) \
            from exc


def _study_objects(ctx: AppContext, study_uid: str) -> list[str]:
    with ctx.read_sessions() as session:
        return list(session.scalars(select(Instance.sop_instance_uid).join(Series, Series.id == Instance.series_fk)
                                    .join(Study, Study.id == Series.study_fk)
                                    .where(Study.study_instance_uid == study_uid)
                                    .order_by(Series.id, Instance.instance_number, Instance.id)))


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
    if study is None:
        raise NotFound(f"no study {study_uid}")
    return study


def _visible_study(session: Session, principal: Principal, study_uid: str) -> Study:
    """The study, if the principal may change it (its own facility's, not one it only borrows or is shared)."""
    if not _owned(session, principal, study_uid):
        raise NotFound(f"no study {study_uid}")
    return _study(session, study_uid)


def _owned(session: Session, principal: Principal, study_uid: str) -> bool:
    return session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid,
                                                 owned_study_condition(principal.scope)).limit(1)) is not None


def _visible_instance(session: Session, principal: Principal, sop_uid: str) -> tuple[Instance, str, str]:
    found = session.execute(select(Instance, Study.study_instance_uid, Patient.patient_id)
                            .join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
                            .join(Patient, Patient.id == Study.patient_fk)
                            .where(Instance.sop_instance_uid == sop_uid)).one_or_none()
    if found is None or not may_see_study(session, principal.scope, found[1]):
        raise NotFound(f"no instance {sop_uid}")
    return found[0], found[1], found[2]


def _state(study: Study) -> dict[str, object]:
    p = study.patient
    return {"patient": {"name": p.patient_name, "id": p.patient_id, "issuer": p.issuer_of_patient_id,
                        "birth_date": p.patient_birth_date, "sex": p.patient_sex},
            "accession_number": study.accession_number, "description": study.study_description}


def _audit_done(ctx: AppContext, principal: Principal, action: str, study_uid: str, patient_id: str, reason: str,
                result: CorrectionResult) -> None:
    detail: dict[str, Any] = {"reason": reason, "before": result.before, "after": result.after,
              "objects_rewritten": result.objects_rewritten, "objects_unchanged": result.objects_unchanged,
              "studies": result.studies[:10], "studies_count": len(result.studies)}
    text = json.dumps(detail, ensure_ascii=False, separators=(",", ":"))
    if len(text) > 2000:  # keep before/after whole: drop the reason's tail first
        detail["reason"] = reason[:max(0, 2000 - (len(text) - len(reason)) - 3)] + "..."
        detail["studies"] = []
        text = json.dumps(detail, ensure_ascii=False, separators=(",", ":"))
    audit.record(ctx.sessions, action=action, actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, patient_id=patient_id, study_instance_uid=study_uid,
                 detail=text)


def _audit_read(ctx: AppContext, principal: Principal, study_uid: str, patient_id: str, detail: str) -> None:
    audit.record(ctx.sessions, action="instance.version-read", actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, patient_id=patient_id, study_instance_uid=study_uid,
                 detail=detail)

"""The report lifecycle: draft → preliminary → final (signed) → amended, every version kept.

Services take a Session inside the caller's transaction and the :class:`Principal` acting; each
change appends its audit row to that same transaction, so a change and its audit commit together.

Order of writes when a report is signed (nothing signed is ever lost, nothing is published twice):

1. In one transaction: the version becomes ``final`` (or ``amended``) with signer and time; the
   report's status follows; the study's claim is released; an outbox row (``derived_task``, kind
   ``report-sr``) is armed for the DICOM SR; one ``hl7_outbound`` row per configured EMR endpoint
   holds the ORU^R01; the audit row. Only then does the API answer.
2. After commit, the outbox relay publishes the SR task; a worker builds the SR from this version
   (deterministic UIDs, so a re-run after a crash stores the same object, an idempotent duplicate)
   and stores it through the one ingest function; the HL7 delivery loop sends the ORU until the EMR
   acknowledges it. FHIR ``DiagnosticReport`` and the PDF are views of these rows, made on request.

The text of a final or amended version never changes: edits apply to draft and preliminary
versions only, and only their author may make them; a change after signing is an amendment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs import audit
from pacs.db.models import DerivedTask, Patient, Series, Study
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.persons.scope import without_priors
from pacs.reports.document import ReportDocument
from pacs.reports.models import (
    AMENDED,
    DRAFT,
    FINAL,
    PRELIMINARY,
    SIGNED_STATES,
    Report,
    ReportVersion,
    StudyClaim,
)
from pacs.ris.models import ImagingOrder
from pacs.security.access import Forbidden, may_see_study
from pacs.security.models import User
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Role

REPORT_SR_KIND = "report-sr"  # outbox kind: build and store the SR of one signed version
MAX_TEXT = 20_000  # characters of findings or impression
SIGNING_ROLES = frozenset({Role.RADIOLOGIST, Role.ADMIN})

#: Called in the signing transaction with the document of the version just signed (HL7 ORU enqueueing).
SignedHook = Callable[[Session, ReportDocument], None]


@dataclass(frozen=True)
class VersionView:
    version: int
    status: str
    findings: str
    impression: str
    language: str
    author: str
    amend_reason: str
    created_at: datetime | None
    updated_at: datetime | None
    preliminary_at: datetime | None
    signed_by: str
    signed_at: datetime | None
    sr_sop_instance_uid: str


@dataclass(frozen=True)
class ReportView:
    id: int
    study_instance_uid: str
    patient_id: str
    facility: str
    accession_number: str
    status: str
    version: int  # the newest version's number
    created_by: str
    created_at: datetime | None
    updated_at: datetime | None
    versions: tuple[VersionView, ...]

    @property
    def current(self) -> VersionView:
        return self.versions[-1]

    @property
    def findings(self) -> str:
        return self.current.findings

    @property
    def impression(self) -> str:
        return self.current.impression


# -- reads ----------------------------------------------------------------------------------------------


def get_report(session: Session, scope: AccessScope, report_id: int) -> ReportView:
    """One report with all its versions; NotFound when unknown or outside ``scope`` (the same answer)."""
    return _view(_visible_report(session, scope, report_id))


def study_reports(session: Session, scope: AccessScope, study_instance_uid: str) -> list[ReportView]:
    _require_study(session, scope, study_instance_uid)
    rows = session.scalars(select(Report).where(Report.study_instance_uid == study_instance_uid)
                           .order_by(Report.id))
    return [_view(r) for r in rows]


# -- changes --------------------------------------------------------------------------------------------


def create_draft(session: Session, principal: Principal, study_instance_uid: str, findings: str,
                 impression: str, language: str = "", *, scope: AccessScope | None = None) -> ReportView:
    """A new report on a study the principal may see, as version 1 in ``draft``; claims the study for its
    author when nobody has. Conflict when another radiologist holds the study's claim.

    ``scope`` (default: the principal's) is what the study is checked against, without what it only borrows
    (a consult's study, a person's prior). The one caller that passes its own is a consultant's answer
    ``as_report`` (:func:`pacs.consults.service.answer`): the consult's one study, checked there."""
    study = _require_study(session, scope or principal.scope, study_instance_uid, write=True)
    findings, impression, language = _text(findings, "findings"), _text(impression, "impression"), _lang(language)
    claim = _claim_row(session, study_instance_uid)
    if claim is not None and claim.claimed_by != principal.subject:
        raise Conflict(f"study is claimed by {claim.claimed_by}; ask them to release it first")
    if claim is None:
        _claim(session, principal, study_instance_uid)
    patient = session.get(Patient, study.patient_fk)
    report = Report(study_instance_uid=study_instance_uid, patient_id=patient.patient_id if patient else "",
                    facility=study.facility, accession_number=study.accession_number, status=DRAFT,
                    current_version=1, created_by=principal.subject[:128])
    report.versions.append(ReportVersion(version=1, status=DRAFT, findings=findings, impression=impression,
                                         language=language, author=principal.subject[:128],
                                         author_name=display_name(session, principal)))
    session.add(report)
    session.flush()
    _audit(session, principal, "report.create", report, f"report {report.id} version 1 draft")
    return _view(report)


def edit(session: Session, principal: Principal, report_id: int, findings: str, impression: str) -> ReportView:
    """Change the text of the newest version while it is a draft or preliminary; its author only."""
    report = _visible_report(session, principal.scope, report_id, for_update=True, author=principal.subject)
    version = report.versions[-1]
    _require_editable(principal, version)
    version.findings, version.impression = _text(findings, "findings"), _text(impression, "impression")
    version.updated_at = datetime.now(UTC)
    session.flush()
    _audit(session, principal, "report.edit", report, f"report {report.id} version {version.version} edited")
    return _view(report)


def make_preliminary(session: Session, principal: Principal, report_id: int) -> ReportView:
    """Draft → preliminary (readable by clinicians as preliminary); the author only."""
    report = _visible_report(session, principal.scope, report_id, for_update=True, author=principal.subject)
    version = report.versions[-1]
    _require_editable(principal, version)
    if version.status != DRAFT:
        raise Conflict(f"version {version.version} is {version.status}, not a draft")
    version.status = PRELIMINARY
    version.preliminary_at = datetime.now(UTC)
    if report.status not in SIGNED_STATES:
        report.status = PRELIMINARY
    session.flush()
    _audit(session, principal, "report.preliminary", report, f"report {report.id} version {version.version}")
    return _view(report)


def sign(session: Session, principal: Principal, report_id: int, on_signed: SignedHook | None = None,
         facility_name: Callable[[str], str | None] | None = None) -> ReportView:
    """Sign the newest version (draft or preliminary): final for version 1, amended after that.

    Only a radiologist (or an admin) signs. Arms the SR outbox row and calls ``on_signed`` (which
    enqueues the HL7 ORU) inside this transaction; see the module docstring for the order of writes.
    """
    if principal.role not in SIGNING_ROLES:
        raise Forbidden(f"role {principal.role.value} may not sign reports")
    report = _visible_report(session, principal.scope, report_id, for_update=True, author=principal.subject)
    version = report.versions[-1]
    if version.status in SIGNED_STATES:
        raise Conflict(f"version {version.version} is already signed ({version.status})")
    if not (version.findings.strip() or version.impression.strip()):
        raise InvalidInput("an empty report cannot be signed")
    now = datetime.now(UTC)
    version.status = FINAL if version.version == 1 else AMENDED
    version.signed_by = principal.subject[:128]
    version.signed_by_name = display_name(session, principal)
    version.signed_at = now
    report.status = version.status
    session.execute(delete(StudyClaim).where(StudyClaim.study_instance_uid == report.study_instance_uid))
    session.flush()
    session.add(DerivedTask(kind=REPORT_SR_KIND, subject_uid=version_subject(report.id, version.version),
                            sha256="", state="pending"))
    if on_signed is not None:
        on_signed(session, report_document(session, report.id, version.version, facility_name=facility_name))
    session.flush()
    _audit(session, principal, "report.sign", report, f"report {report.id} version {version.version} "
           f"{version.status}")
    return _view(report)


def amend(session: Session, principal: Principal, report_id: int, reason: str, findings: str,
          impression: str) -> ReportView:
    """A new draft version of a signed report, with the reason; signing it makes the report amended."""
    if principal.role not in SIGNING_ROLES:
        raise Forbidden(f"role {principal.role.value} may not amend reports")
    report = _visible_report(session, principal.scope, report_id, for_update=True, author=principal.subject)
    newest = report.versions[-1]
    if newest.status not in SIGNED_STATES:
        raise Conflict(f"only a signed report can be amended; version {newest.version} is {newest.status}"
                       + (" (an amendment in progress)" if newest.version > 1 else ""))
    reason = reason.strip()
    if not reason:
        raise InvalidInput("an amendment needs a reason")
    if len(reason) > 2000:
        raise InvalidInput("the reason must be at most 2000 characters")
    version = ReportVersion(version=newest.version + 1, status=DRAFT, findings=_text(findings, "findings"),
                            impression=_text(impression, "impression"), language=newest.language,
                            author=principal.subject[:128], author_name=display_name(session, principal),
                            amend_reason=reason)
    report.versions.append(version)
    report.current_version = version.version
    session.flush()
    _audit(session, principal, "report.amend", report, f"report {report.id} version {version.version} "
           f"drafted: {reason[:200]}")
    return _view(report)


# -- claims ---------------------------------------------------------------------------------------------


def claim(session: Session, principal: Principal, study_instance_uid: str) -> StudyClaim:
    """Claim a study for reading; Conflict when another radiologist has it (claiming it again is a no-op)."""
    _require_study(session, principal.scope, study_instance_uid, write=True)
    existing = _claim_row(session, study_instance_uid)
    if existing is not None:
        if existing.claimed_by != principal.subject:
            raise Conflict(f"study is already claimed by {existing.claimed_by}")
        return existing
    row = _claim(session, principal, study_instance_uid)
    audit.append(session, action="study.claim", actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, study_instance_uid=study_instance_uid,
                 patient_id=_patient_of(session, study_instance_uid))
    return row


def release(session: Session, principal: Principal, study_instance_uid: str) -> None:
    """Release a claim: its holder, or an admin (a radiologist who left for the day)."""
    _require_study(session, principal.scope, study_instance_uid, write=True)
    existing = _claim_row(session, study_instance_uid)
    if existing is None:
        raise NotFound("the study is not claimed")
    if existing.claimed_by != principal.subject and principal.role is not Role.ADMIN:
        raise Forbidden(f"the study is claimed by {existing.claimed_by}; only they or an admin may release it")
    session.delete(existing)
    session.flush()
    audit.append(session, action="study.release", actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, study_instance_uid=study_instance_uid,
                 patient_id=_patient_of(session, study_instance_uid),
                 detail=f"claim of {existing.claimed_by} released")


# -- the document of one version (SR, PDF, HL7, FHIR) --------------------------------------------------


def version_subject(report_id: int, version: int) -> str:
    """The outbox subject of one report version: ``{report id}.{version}`` (digits and a dot, like a UID)."""
    return f"{report_id}.{version}"


def parse_version_subject(subject: str) -> tuple[int, int]:
    report_id, _, version = subject.partition(".")
    if not (report_id.isdigit() and version.isdigit()):
        raise InvalidInput(f"not a report version subject: {subject!r}")
    return int(report_id), int(version)


def report_document(session: Session, report_id: int, version: int,
                    facility_name: Callable[[str], str | None] | None = None) -> ReportDocument:
    """Everything one version becomes, from the report, the study index and the order."""
    report = session.get(Report, report_id)
    if report is None:
        raise NotFound(f"no report {report_id}")
    row = next((v for v in report.versions if v.version == version), None)
    if row is None:
        raise NotFound(f"report {report_id} has no version {version}")
    study = session.scalars(select(Study).where(Study.study_instance_uid == report.study_instance_uid)).one_or_none()
    patient = session.get(Patient, study.patient_fk) if study is not None else None
    # the order the images were linked to (same patient and facility), never one found by accession alone
    order = session.scalars(select(ImagingOrder).where(
        ImagingOrder.linked_study_instance_uid == report.study_instance_uid).limit(1)).one_or_none()
    modalities: tuple[str, ...] = ()
    if study is not None:
        modalities = tuple(m for m in (study.modalities_in_study or "").split("\\") if m and m not in ("SR", "KO"))
        if not modalities:
            modalities = tuple(sorted({m for m in session.scalars(select(Series.modality).where(
                Series.study_fk == study.id)) if m}))
    facility = report.facility or (study.facility if study is not None else "")
    return ReportDocument(
        report_id=report.id, version=row.version, status=row.status, findings=row.findings,
        impression=row.impression, language=row.language, author=row.author, author_name=row.author_name,
        signed_by=row.signed_by, signed_by_name=row.signed_by_name, signed_at=_utc(row.signed_at),
        amend_reason=row.amend_reason, created_at=_utc(row.created_at),
        study_instance_uid=report.study_instance_uid,
        accession_number=(study.accession_number if study is not None else "") or report.accession_number,
        patient_id=patient.patient_id if patient else report.patient_id,
        issuer_of_patient_id=patient.issuer_of_patient_id if patient else "",
        patient_name=patient.patient_name if patient else (order.patient_name if order else ""),
        patient_birth_date=patient.patient_birth_date if patient else "",
        patient_sex=patient.patient_sex if patient else "",
        study_date=study.study_date if study is not None else "",
        study_time=study.study_time if study is not None else "",
        study_description=study.study_description if study is not None else "",
        modalities=modalities,
        referring_physician_name=(study.referring_physician_name if study is not None else "")
        or (order.referring_physician_name if order else ""),
        procedure=(order.requested_procedure_description if order else "")
        or (study.study_description if study is not None else ""),
        facility=facility, facility_name=(facility_name(facility) if facility_name else "") or facility,
        placer_order_number=order.placer_order_number if order else "",
        sr_sop_instance_uid=row.sr_sop_instance_uid,
    )


def signed_versions(session: Session, report_id: int) -> list[int]:
    return list(session.scalars(select(ReportVersion.version).where(
        ReportVersion.report_fk == report_id, ReportVersion.status.in_(SIGNED_STATES)).order_by(
        ReportVersion.version)))


# -- helpers --------------------------------------------------------------------------------------------


def display_name(session: Session, principal: Principal) -> str:
    """The acting user's full name when the account has one, else its user name."""
    if principal.kind in ("user", "session"):
        full = session.scalar(select(User.full_name).where(User.username == principal.subject))
        if full:
            return full[:128]
    return principal.subject[:128]


def _visible_report(session: Session, scope: AccessScope, report_id: int, for_update: bool = False,
                    author: str = "") -> Report:
    """The report, if its study is in ``scope``. A change (``for_update``) leaves out what the scope only borrows
    — another facility's study seen as a person's prior (pacs.persons) or under a consult (pacs.consults) — with
    one exception: ``author``'s own report on a study it sees through an open consult (the draft its answer
    ``as_report`` started) stays theirs to finish while the consult lasts. Never someone else's report."""
    stmt = select(Report).where(Report.id == report_id)
    report = session.scalars(stmt.with_for_update() if for_update else stmt).one_or_none()
    if report is None:
        raise NotFound(f"no report {report_id}")
    uid = report.study_instance_uid
    if may_see_study(session, scope, uid, borrowed=not for_update):
        return report
    if for_update and author and report.created_by == author[:128] \
            and may_see_study(session, without_priors(scope), uid):
        return report
    raise NotFound(f"no report {report_id}")


def _require_study(session: Session, scope: AccessScope, study_instance_uid: str, write: bool = False) -> Study:
    """The study, if in ``scope``; a change (``write``: a draft, a claim, its release) leaves out what the scope
    only borrows — a person's prior (pacs.persons), a consult's study (pacs.consults): 404 like an unknown study
    (a consultant's claim would outlive the consult and lock the owning facility's readers out)."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
    if study is None or not may_see_study(session, scope, study_instance_uid, borrowed=not write):
        raise NotFound(f"no study {study_instance_uid}")
    return study


def _require_editable(principal: Principal, version: ReportVersion) -> None:
    if version.status in SIGNED_STATES:
        raise Conflict(f"version {version.version} is {version.status}: signed text never changes "
                       "(amend the report instead)")
    if version.author != principal.subject:
        raise Forbidden(f"only the author ({version.author}) may change this version")


def _claim_row(session: Session, study_instance_uid: str) -> StudyClaim | None:
    return session.scalars(select(StudyClaim).where(StudyClaim.study_instance_uid == study_instance_uid)
                           .with_for_update()).one_or_none()


def _claim(session: Session, principal: Principal, study_instance_uid: str) -> StudyClaim:
    row = StudyClaim(study_instance_uid=study_instance_uid, claimed_by=principal.subject[:128],
                     claimed_at=datetime.now(UTC))
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:  # a concurrent claim won
        raise Conflict("study was claimed by someone else a moment ago") from exc
    return row


def _patient_of(session: Session, study_instance_uid: str) -> str:
    return session.scalar(select(Patient.patient_id).join(Study, Study.patient_fk == Patient.id).where(
        Study.study_instance_uid == study_instance_uid)) or ""


def _text(value: str, label: str) -> str:
    value = (value or "").replace("\r\n", "\n").replace("\r", "\n")
    if len(value) > MAX_TEXT:
        raise InvalidInput(f"the {label} must be at most {MAX_TEXT} characters")
    if any(not (c.isprintable() or c in "\n\t") for c in value):
        raise InvalidInput(f"the {label} contains control characters")
    return value


def _lang(value: str) -> str:
    value = (value or "").strip().lower()
    if value not in ("", "vi", "en"):
        raise InvalidInput("language is vi or en")
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _audit(session: Session, principal: Principal, action: str, report: Report, detail: str) -> None:
    audit.append(session, action=action, actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, patient_id=report.patient_id,
                 study_instance_uid=report.study_instance_uid, detail=detail)


def _view(report: Report) -> ReportView:
    versions = tuple(VersionView(
        v.version, v.status, v.findings, v.impression, v.language, v.author, v.amend_reason, _utc(v.created_at),
        _utc(v.updated_at), _utc(v.preliminary_at), v.signed_by, _utc(v.signed_at), v.sr_sop_instance_uid,
    ) for v in report.versions)
    return ReportView(report.id, report.study_instance_uid, report.patient_id, report.facility,
                      report.accession_number, report.status, report.versions[-1].version, report.created_by,
                      _utc(report.created_at), _utc(report.updated_at), versions)

"""Teleconsultation: request, inbox, open, answer, close, expire — each step audited (issue 14).

Rules (the product's, in one place):

- **Ask.** A clinician, radiologist or admin (``Capability.CONSULT``) who sees a study — through their own
  facility or a ``pacs share add``, not through another consult (a consulted facility cannot pass the study
  on) — asks one other known facility (``to_facility``), or an outside doctor through a share link of scope
  ``study`` (``external``), one question. The consult lives ``expires_in_days`` (default
  ``PACS_CONSULT_DEFAULT_DAYS``, at most ``PACS_CONSULT_MAX_DAYS``). A study the asker may not see is 404.
- **Scope.** While the consult is ``open`` or ``answered`` and not past ``expires_at``, the consulted
  facility's doctors — its principals of roles holding ``Capability.CONSULT`` (``AccessScope.consult_grants``),
  never its technologists, EMR accounts or DICOM AEs — see exactly that study on every read path
  (:mod:`pacs.consults.grants` inside :func:`pacs.security.access.study_condition`); after close or expiry,
  nothing. The study is theirs to read, not to change: no claim, no key images, no report of their own
  (:mod:`pacs.reports.lifecycle` leaves borrowed studies out of every write) — except the draft an answer
  ``as_report`` starts, which its author may finish while the consult lasts.
- **Sides.** The requesting facility (a principal without a facility: the requesting user) is one side, the
  consulted facility the other. Principals without a facility (archive-wide) may open and close any consult
  but answer none and have no inbox. Only the consulted side answers (an outside doctor through
  ``/s/{token}/consult``); a radiologist's answer may also start a draft report on the study.
- **Notices.** Each side's inbox flags what it has not opened yet (a new consult, an answer, the other
  side's close, the expiry); opening a consult marks it read for the caller's side.
- **Expiry.** Access ends at ``expires_at`` whatever else runs; :func:`expire_due` (run before every consult
  operation) marks such consults ``expired`` and writes their ``consult.expire`` audit rows.
- **Audit.** ``consult.request``, ``consult.open``, ``consult.answer``, ``consult.close``, ``consult.expire``,
  and the reads ``consult.list`` / ``consult.read``; an outside doctor's rows name the link's id, never its token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, false, func, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from pacs import audit
from pacs.consults.models import (
    ACTIVE_STATES,
    ANSWERED,
    CLOSED,
    CONSULT_STATES,
    EXPIRED,
    OPEN,
    Consult,
    ConsultAnswer,
)
from pacs.context import AppContext
from pacs.db.models import ApplicationEntity, Patient, Study
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.jobs import as_utc
from pacs.reports import lifecycle
from pacs.reports.models import StudyClaim
from pacs.security.access import Forbidden, may_see_study, study_condition
from pacs.security.models import ApiToken, StudyShare, User
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Capability

MAX_QUESTION = 4_000  # characters
MAX_ANSWER = 20_000  # characters (a report's findings may be as long)
MAX_NAME = 100  # characters of the name an outside doctor types
REQUESTER, CONSULTANT, OBSERVER = "requester", "consultant", "observer"
BOXES = ("inbox", "sent")


@dataclass(frozen=True)
class StudySummary:
    """What the caller may see of the consult's study (only while it may see the study at all)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: str
    facility: str


@dataclass(frozen=True)
class AnswerView:
    id: int
    text: str
    author: str
    author_name: str
    author_facility: str
    share_link_id: int | None
    report_id: int | None
    created_at: datetime | None


@dataclass(frozen=True)
class ConsultView:
    id: int
    study_instance_uid: str
    requested_by: str
    requested_by_name: str
    requesting_facility: str
    consulted_facility: str  # "" for an external consult
    external: bool
    share_link_id: int | None
    question: str
    state: str
    created_at: datetime | None
    answered_at: datetime | None
    closed_at: datetime | None
    closed_by: str
    expires_at: datetime | None
    side: str  # the caller's: requester, consultant or observer (archive-wide)
    unread: bool  # for the caller's side
    answers: tuple[AnswerView, ...]
    study: StudySummary | None


@dataclass(frozen=True)
class RequestedConsult:
    consult: ConsultView
    link_url: str | None  # an external consult's share link (shown once, to the requester only)
    link_expires_at: datetime | None


# -- asking ---------------------------------------------------------------------------------------------------


def request_consult(ctx: AppContext, principal: Principal, study_instance_uid: str, *, question: str,
                    to_facility: str | None = None, external: bool = False, expires_in_days: int | None = None,
                    birth_date_check: bool = False, base_url: str = "",
                    now: datetime | None = None) -> RequestedConsult:
    """Ask ``to_facility`` (or, ``external``, whoever gets the share link) about one study.

    The consult, its audit row and (external) its share link commit together, or none of them.
    """
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    question = _text(question, "question", MAX_QUESTION)
    days = _days(ctx, expires_in_days)
    target = (to_facility or "").strip()
    if external == bool(target):
        raise InvalidInput('name exactly one of "to_facility" (a facility code) or "external": true')
    with ctx.sessions() as session, session.begin():
        _expire_due(session, now)
        study, patient_id = _study_for_request(session, principal, study_instance_uid)
        if target:
            _check_target(ctx, session, principal, study, target)
        consult = Consult(study_instance_uid=study.study_instance_uid, patient_id=patient_id,
                          study_facility=study.facility, requested_by=principal.subject[:128],
                          requested_by_name=lifecycle.display_name(session, principal),
                          requesting_facility=principal.facility[:64], consulted_facility=target,
                          external=external, question=question, state=OPEN, created_at=now,
                          expires_at=now + timedelta(days=days), closed_by="", events_for_requester=0,
                          requester_seen=0, requester_read_at=now, events_for_consultant=1, consultant_seen=0)
        session.add(consult)
        session.flush()
        link_url, link_expires = None, None
        detail = f"consult {consult.id} to {target or 'an outside doctor (share link)'}; expires {_day(now, days)}"
        if external:
            from pacs.sharing.links import ShareScope, create_link

            link = create_link(session, principal, study.study_instance_uid, scope=ShareScope.STUDY,
                               expires_in_days=days, birth_date_check=birth_date_check, base_url=base_url,
                               purpose="consult", consult_id=consult.id)
            consult.share_link_id = link.id
            link_url, link_expires = link.url, link.expires_at
            detail += f"; share link {link.id}"
        _audit(session, principal, "consult.request", consult, detail)
        return RequestedConsult(_view(session, principal, consult, now), link_url, link_expires)


def known_facilities(ctx: AppContext, session: Session) -> set[str]:
    """Facilities this archive knows: named in ``PACS_FACILITY_NAMES``, or holding studies, users, tokens or
    registered AEs. A consult to any other code would grant nothing to anyone: refused as a typo."""
    known = set(ctx.settings.facility_names)
    for column in (Study.facility, User.facility, ApiToken.facility, ApplicationEntity.facility):
        known.update(session.scalars(select(column).where(column != "").distinct()))
    return known


# -- reading --------------------------------------------------------------------------------------------------


def list_consults(ctx: AppContext, principal: Principal, *, box: str = "inbox", state: str = "",
                  limit: int = 50, offset: int = 0, now: datetime | None = None) -> tuple[list[ConsultView], int]:
    """The caller's inbox (consults to its facility) or sent box (consults its facility — or, without a
    facility, the caller — asked), newest first, with the total count."""
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    if box not in BOXES:
        raise InvalidInput("box is inbox or sent")
    if state and state not in CONSULT_STATES:
        raise InvalidInput(f"state is one of {', '.join(CONSULT_STATES)}")
    _sweep(ctx, now)
    condition = _box_condition(principal, box)
    if state:
        condition = and_(condition, Consult.state == state)
    record = aliased(Patient)
    # one query for the page: each consult with its study and patient when the caller may see the study (the
    # scope's condition is part of the join; pacs.consults.grants aliases its consult table, so it does not
    # correlate with the listed rows)
    page = (select(Consult, Study, record).select_from(Consult)
            .outerjoin(Study, and_(Study.study_instance_uid == Consult.study_instance_uid,
                                   study_condition(principal.scope)))
            .outerjoin(record, record.id == Study.patient_fk)
            .where(condition).order_by(Consult.id.desc()).limit(limit).offset(offset))
    with ctx.sessions() as session, session.begin():
        total = session.scalar(select(func.count()).select_from(Consult).where(condition)) or 0
        views: list[ConsultView] = []
        # (patient ID, its facility) → the listed consults that show the patient: a Patient ID names a patient
        # only within its facility
        shown: dict[tuple[str, str], list[ConsultView]] = {}
        for consult, study, patient in session.execute(page):
            summary = _study_summary(study, patient) if study is not None and patient is not None else None
            side = _side(principal, consult) or OBSERVER
            views.append(_make_view(consult, now, side, _unread(consult, side), False, summary))
            if summary is not None:
                shown.setdefault((summary.patient_id, summary.facility), []).append(views[-1])
        # the list shows patients' names: one audit row per patient shown (a page of consults of one patient
        # is one row), in the list's own transaction
        for (patient_id, facility), listed in sorted(shown.items()):
            uids = sorted({v.study_instance_uid for v in listed})
            audit.append(session, action="consult.list", actor=principal.subject, role=principal.role.value,
                         source_address=principal.source_address, patient_id=patient_id,
                         study_instance_uid=uids[0] if len(uids) == 1 else "",
                         detail=f"{box}: patient of {facility} in consult(s) "
                                f"{', '.join(str(v.id) for v in listed)}; studies {', '.join(uids)}")
    return views, total


def unread_counts(ctx: AppContext, principal: Principal, now: datetime | None = None) -> dict[str, int]:
    """How many consults in each box have something the caller's side has not opened yet."""
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    _sweep(ctx, now)
    with ctx.read_sessions() as session:
        inbox = session.scalar(select(func.count()).select_from(Consult).where(
            _box_condition(principal, "inbox"), Consult.events_for_consultant > Consult.consultant_seen)) or 0
        sent = session.scalar(select(func.count()).select_from(Consult).where(
            _box_condition(principal, "sent"), Consult.events_for_requester > Consult.requester_seen)) or 0
    return {"inbox": inbox, "sent": sent}


def open_consult(ctx: AppContext, principal: Principal, consult_id: int, now: datetime | None = None) -> ConsultView:
    """One consult with its answers; marks it read for the caller's side (``consult.open``)."""
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    _sweep(ctx, now)
    with ctx.sessions() as session, session.begin():
        consult, side = _visible_consult(session, principal, consult_id, for_update=True)
        _mark_read(consult, side, now)
        _audit(session, principal, "consult.open", consult, f"consult {consult.id} opened by the {side} side")
        return _view(session, principal, consult, now)


def study_consults(ctx: AppContext, principal: Principal, study_instance_uid: str,
                   now: datetime | None = None) -> list[ConsultView]:
    """Every consult of a study, with its answers, for whoever may see the study (answers are kept with the
    study like addenda); audited as ``consult.read``."""
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    _sweep(ctx, now)
    with ctx.sessions() as session, session.begin():
        if not may_see_study(session, principal.scope, study_instance_uid):
            raise NotFound(f"no study {study_instance_uid}")
        rows = session.scalars(select(Consult).where(Consult.study_instance_uid == study_instance_uid)
                               .options(selectinload(Consult.answers)).order_by(Consult.id)).all()
        summary = _summary(session, study_instance_uid)  # the caller sees the study (checked above)
        views = []
        for consult in rows:
            side = _side(principal, consult) or OBSERVER
            views.append(_make_view(consult, now, side, _unread(consult, side), True, summary))
        audit.append(session, action="consult.read", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, study_instance_uid=study_instance_uid,
                     patient_id=_patient_of(session, study_instance_uid), detail=f"{len(views)} consult(s)")
    return views


# -- answering and closing ------------------------------------------------------------------------------------


def answer(ctx: AppContext, principal: Principal, consult_id: int, text: str, *, as_report: bool = False,
           now: datetime | None = None) -> tuple[ConsultView, AnswerView]:
    """An answer from the consulted side; ``as_report`` (radiologists) also starts a draft report on the study
    with the answer as its findings (:func:`pacs.reports.lifecycle.create_draft`: the same rules, e.g. 409 when
    another radiologist holds the study's claim). Everything commits together or not at all."""
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    text = _text(text, "answer", MAX_ANSWER)
    if as_report and not (principal.role in lifecycle.SIGNING_ROLES and principal.can(Capability.REPORT_WRITE)):
        raise Forbidden("only a radiologist may answer with a report")
    _sweep(ctx, now)
    with ctx.sessions() as session, session.begin():
        consult, side = _visible_consult(session, principal, consult_id, for_update=True)
        if side != CONSULTANT:
            raise Forbidden("only the consulted facility answers a consult")
        _require_active(consult, now)
        report_id = None
        if as_report:
            report_id = _draft_report(session, principal, consult.study_instance_uid, text)
        row = _add_answer(consult, text, author=principal.subject, author_name=lifecycle.display_name(
            session, principal), author_facility=principal.facility, share_link_id=None, report_id=report_id,
            now=now)
        session.flush()
        _mark_read(consult, CONSULTANT, now)
        _audit(session, principal, "consult.answer", consult, f"consult {consult.id} answer {row.id}"
               + (f"; draft report {report_id}" if report_id is not None else ""))
        return _view(session, principal, consult, now), _answer_view(row)


def close(ctx: AppContext, principal: Principal, consult_id: int, now: datetime | None = None) -> ConsultView:
    """Either side (or an archive-wide principal) closes; the consulted side loses the study at once and an
    external consult's share link is revoked."""
    now = now or datetime.now(UTC)
    _require(principal, Capability.CONSULT)
    _sweep(ctx, now)
    with ctx.sessions() as session, session.begin():
        consult, side = _visible_consult(session, principal, consult_id, for_update=True)
        _require_active(consult, now)
        consult.state, consult.closed_at, consult.closed_by = CLOSED, now, principal.subject[:128]
        if side != CONSULTANT:
            consult.events_for_consultant += 1
        if side != REQUESTER:
            consult.events_for_requester += 1
        _mark_read(consult, side, now)
        detail = f"consult {consult.id} closed by the {side} side"
        if consult.share_link_id is not None and _revoke_link(session, consult.share_link_id, principal):
            detail += f"; share link {consult.share_link_id} revoked"
        _audit(session, principal, "consult.close", consult, detail)
        return _view(session, principal, consult, now)


def expire_due(ctx: AppContext, now: datetime | None = None) -> int:
    """Mark consults past their expiry ``expired`` (one ``consult.expire`` audit row each); how many."""
    now = now or datetime.now(UTC)
    with ctx.sessions() as session, session.begin():
        return _expire_due(session, now)


# -- an outside doctor, through a share link ------------------------------------------------------------------


@dataclass(frozen=True)
class LinkGrant:
    """What an opened share link of purpose ``consult`` grants here (from ``pacs.sharing.links.OpenedLink``)."""

    link_id: int
    consult_id: int
    study_instance_uid: str


def external_consult(ctx: AppContext, grant: LinkGrant, address: str, now: datetime | None = None) -> ConsultView:
    """The consult an outside doctor's link belongs to, with its answers (``consult.open`` by ``share:<id>``)."""
    now = now or datetime.now(UTC)
    _sweep(ctx, now)
    with ctx.sessions() as session, session.begin():
        consult = _linked_consult(session, grant, for_update=True)
        _mark_read(consult, CONSULTANT, now)
        audit.append(session, action="consult.open", actor=f"share:{grant.link_id}", role="share-link",
                     source_address=address, patient_id=consult.patient_id,
                     study_instance_uid=consult.study_instance_uid,
                     detail=f"consult {consult.id} opened through share link {grant.link_id}")
        return _external_view(session, consult, now)


def answer_external(ctx: AppContext, grant: LinkGrant, name: str, text: str, address: str,
                    now: datetime | None = None) -> tuple[ConsultView, AnswerView]:
    """An outside doctor's answer: author ``"<name> (via share link <id>)"``, audited with the link's id."""
    now = now or datetime.now(UTC)
    name = " ".join(_text(name, "name", MAX_NAME).split())
    text = _text(text, "answer", MAX_ANSWER)
    _sweep(ctx, now)
    with ctx.sessions() as session, session.begin():
        consult = _linked_consult(session, grant, for_update=True)
        _require_active(consult, now)
        author = f"{name} (via share link {grant.link_id})"
        row = _add_answer(consult, text, author=author, author_name=author, author_facility="",
                          share_link_id=grant.link_id, report_id=None, now=now)
        session.flush()
        _mark_read(consult, CONSULTANT, now)
        audit.append(session, action="consult.answer", actor=f"share:{grant.link_id}", role="share-link",
                     source_address=address, patient_id=consult.patient_id,
                     study_instance_uid=consult.study_instance_uid,
                     detail=f"consult {consult.id} answer {row.id} through share link {grant.link_id}")
        return _external_view(session, consult, now), _answer_view(row)


# -- helpers --------------------------------------------------------------------------------------------------


def _require(principal: Principal, capability: Capability) -> None:
    if not principal.can(capability):
        raise Forbidden(f"role {principal.role.value} may not {capability.value}")


def _days(ctx: AppContext, value: int | None) -> int:
    if value is None:
        return min(ctx.settings.consult_default_days, ctx.settings.consult_max_days)
    if not 1 <= value <= ctx.settings.consult_max_days:
        raise InvalidInput(f"expires_in_days is 1 to {ctx.settings.consult_max_days}")
    return value


def _text(value: str, label: str, limit: int) -> str:
    value = (value or "").replace("\r\n", "\n").replace("\r", "\n").strip()
    if not value:
        raise InvalidInput(f"the {label} is empty")
    if len(value) > limit:
        raise InvalidInput(f"the {label} must be at most {limit} characters")
    if any(not (c.isprintable() or c in "\n\t") for c in value):
        raise InvalidInput(f"the {label} contains control characters")
    return value


def _study_for_request(session: Session, principal: Principal, uid: str) -> tuple[Study, str]:
    """The study, if the principal sees it other than through a consult (404 otherwise, like an unknown UID)."""
    row = session.execute(select(Study, Patient.patient_id).join(Patient, Patient.id == Study.patient_fk)
                          .where(Study.study_instance_uid == uid)).one_or_none()
    if row is None or not may_see_study(session, principal.scope, uid):
        raise NotFound(f"no study {uid}")
    study, patient_id = row
    if not may_see_study(session, principal.scope, uid, borrowed=False):
        # seen only through a consult (or as a linked prior): a consultant cannot pass the study on
        raise Forbidden("only a study of your facility (or shared with it) can be sent to a consult; one seen "
                        "through a consult or as a person's prior cannot be passed on")
    return study, patient_id or ""


def _check_target(ctx: AppContext, session: Session, principal: Principal, study: Study, target: str) -> None:
    if len(target) > 64:
        raise InvalidInput("to_facility is at most 64 characters")
    if target == principal.facility:
        raise InvalidInput("a consult goes to another facility than your own")
    if target == study.facility:
        raise InvalidInput(f"facility {target} already sees this study (it was acquired there)")
    if target not in known_facilities(ctx, session):
        raise InvalidInput(f"unknown facility {target!r}")
    if session.scalar(select(StudyShare.id).where(StudyShare.study_fk == study.id,
                                                  StudyShare.facility == target).limit(1)) is not None:
        raise InvalidInput(f"facility {target} already sees this study (shared with it)")


def _box_condition(principal: Principal, box: str) -> ColumnElement[bool]:
    if box == "inbox":
        if not principal.facility:
            return false()  # archive-wide principals are nobody's consultant
        return and_(Consult.consulted_facility == principal.facility, Consult.external.is_(False))
    if principal.facility:
        return Consult.requesting_facility == principal.facility
    return and_(Consult.requesting_facility == "", Consult.requested_by == principal.subject)


def _side(principal: Principal, consult: Consult) -> str | None:
    if principal.facility:
        if consult.requesting_facility == principal.facility:
            return REQUESTER
        if not consult.external and consult.consulted_facility == principal.facility:
            return CONSULTANT
        return None
    if consult.requesting_facility == "" and consult.requested_by == principal.subject:
        return REQUESTER
    if principal.scope.unrestricted:
        return OBSERVER
    return None


def _visible_consult(session: Session, principal: Principal, consult_id: int,
                     for_update: bool = False) -> tuple[Consult, str]:
    stmt = select(Consult).where(Consult.id == consult_id)
    consult = session.scalars(stmt.with_for_update() if for_update else stmt).one_or_none()
    side = _side(principal, consult) if consult is not None else None
    if consult is None or side is None:
        raise NotFound(f"no consult {consult_id}")
    return consult, side


def _linked_consult(session: Session, grant: LinkGrant, for_update: bool = False) -> Consult:
    stmt = select(Consult).where(Consult.id == grant.consult_id)
    consult = session.scalars(stmt.with_for_update() if for_update else stmt).one_or_none()
    if consult is None or not consult.external or consult.share_link_id != grant.link_id \
            or consult.study_instance_uid != grant.study_instance_uid:
        raise NotFound("this link belongs to no consult")
    return consult


def _require_active(consult: Consult, now: datetime) -> None:
    if consult.state == CLOSED:
        raise Conflict(f"consult {consult.id} is closed")
    if consult.state == EXPIRED or _past(consult, now):
        raise Conflict(f"consult {consult.id} has expired")


def _draft_report(session: Session, principal: Principal, uid: str, text: str) -> int:
    """A draft report with the answer as its findings. Starting a draft claims an unclaimed study for its
    author (pacs.reports.lifecycle); a consultant is not the study's reader, and loses sight of it when the
    consult ends, so that claim is dropped again: the owning facility's reading list is left as it was."""
    claimed_before = session.scalar(select(StudyClaim.id).where(StudyClaim.study_instance_uid == uid))
    # the one write a consult allows: checked against the consult's one study, not the principal's scope
    # (whose writes never reach a borrowed study: no claim, no key images, no report of its own)
    report_id = lifecycle.create_draft(session, principal, uid, text, "",
                                       scope=AccessScope(study_uids=frozenset({uid}))).id
    if claimed_before is None:
        session.execute(delete(StudyClaim).where(StudyClaim.study_instance_uid == uid,
                                                 StudyClaim.claimed_by == principal.subject[:128]))
    return report_id


def _add_answer(consult: Consult, text: str, *, author: str, author_name: str, author_facility: str,
                share_link_id: int | None, report_id: int | None, now: datetime) -> ConsultAnswer:
    row = ConsultAnswer(text=text, author=author[:256], author_name=author_name[:256],
                        author_facility=author_facility[:64], share_link_id=share_link_id, report_id=report_id,
                        created_at=now)
    consult.answers.append(row)
    if consult.state == OPEN:
        consult.state, consult.answered_at = ANSWERED, now
    consult.events_for_requester += 1
    return row


def _mark_read(consult: Consult, side: str, now: datetime) -> None:
    if side == REQUESTER:
        consult.requester_seen, consult.requester_read_at = consult.events_for_requester, now
    elif side == CONSULTANT:
        consult.consultant_seen, consult.consultant_read_at = consult.events_for_consultant, now


def _sweep(ctx: AppContext, now: datetime) -> None:
    """Expire what is due; a read first, so that the common case takes no write lock."""
    with ctx.read_sessions() as session:
        due = session.scalar(select(Consult.id).where(Consult.state.in_(ACTIVE_STATES),
                                                      Consult.expires_at <= now).limit(1))
    if due is not None:
        expire_due(ctx, now)


def _expire_due(session: Session, now: datetime) -> int:
    """One conditional UPDATE (still active and due), audited for exactly the rows it changed: two sweeps at
    once (two requests, two processes) expire each consult once — SQLite has no row locks, and PostgreSQL
    re-checks the condition of a row another transaction changed, so the later sweep changes (and audits)
    nothing."""
    changed = session.execute(
        update(Consult).where(Consult.state.in_(ACTIVE_STATES), Consult.expires_at <= now)
        .values(state=EXPIRED, events_for_requester=Consult.events_for_requester + 1,
                events_for_consultant=Consult.events_for_consultant + 1)
        .returning(Consult.id, Consult.patient_id, Consult.study_instance_uid, Consult.expires_at)
        .execution_options(synchronize_session=False)).all()
    for consult_id, patient_id, uid, expires_at in sorted(changed):
        expired = as_utc(expires_at)
        audit.append(session, action="consult.expire", actor="system", patient_id=patient_id,
                     study_instance_uid=uid,
                     detail=f"consult {consult_id} expired at {expired.isoformat() if expired else '?'}")
    return len(changed)


def _revoke_link(session: Session, link_id: int, principal: Principal) -> bool:
    """Revoke an external consult's share link with the consult (the outside doctor's access ends too);
    ``share.revoke`` is audited by :func:`pacs.sharing.links.revoke_link`. Whoever may close the consult may
    manage the link (its facility's sharers, or an archive-wide principal)."""
    from pacs.sharing.links import revoke_link

    return revoke_link(session, principal, link_id).revoked_at is not None


def _patient_of(session: Session, uid: str) -> str:
    return session.scalar(select(Patient.patient_id).join(Study, Study.patient_fk == Patient.id)
                          .where(Study.study_instance_uid == uid)) or ""


def _summary(session: Session, uid: str) -> StudySummary | None:
    row = session.execute(select(Study, Patient).join(Patient, Patient.id == Study.patient_fk)
                          .where(Study.study_instance_uid == uid)).one_or_none()
    return None if row is None else _study_summary(*row)


def _study_summary(study: Study, patient: Patient) -> StudySummary:
    return StudySummary(patient.patient_name, patient.patient_id, patient.patient_birth_date,
                        study.accession_number, study.study_date, study.study_description,
                        study.modalities_in_study, study.facility)


def _view(session: Session, principal: Principal, consult: Consult, now: datetime,
          with_answers: bool = True) -> ConsultView:
    side = _side(principal, consult) or OBSERVER
    visible = may_see_study(session, principal.scope, consult.study_instance_uid)
    return _make_view(consult, now, side, _unread(consult, side), with_answers,
                      _summary(session, consult.study_instance_uid) if visible else None)


def _external_view(session: Session, consult: Consult, now: datetime) -> ConsultView:
    """The outside doctor's view: the link (scope "study") shows this study, so its summary too."""
    return _make_view(consult, now, CONSULTANT, False, True, _summary(session, consult.study_instance_uid))


def _make_view(consult: Consult, now: datetime, side: str, unread: bool, with_answers: bool,
               study: StudySummary | None) -> ConsultView:
    state = consult.state
    if state in ACTIVE_STATES and _past(consult, now):
        state = EXPIRED  # past its time, not yet swept
    answers = tuple(_answer_view(a) for a in consult.answers) if with_answers else ()
    return ConsultView(consult.id, consult.study_instance_uid, consult.requested_by, consult.requested_by_name,
                       consult.requesting_facility, consult.consulted_facility, consult.external,
                       consult.share_link_id, consult.question, state, as_utc(consult.created_at),
                       as_utc(consult.answered_at), as_utc(consult.closed_at), consult.closed_by,
                       as_utc(consult.expires_at), side, unread, answers, study)


def _unread(consult: Consult, side: str) -> bool:
    if side == REQUESTER:
        return consult.events_for_requester > consult.requester_seen
    if side == CONSULTANT:
        return consult.events_for_consultant > consult.consultant_seen
    return False


def _answer_view(row: ConsultAnswer) -> AnswerView:
    return AnswerView(row.id, row.text, row.author, row.author_name, row.author_facility, row.share_link_id,
                      row.report_id, as_utc(row.created_at))


def _audit(session: Session, principal: Principal, action: str, consult: Consult, detail: str) -> None:
    audit.append(session, action=action, actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, patient_id=consult.patient_id,
                 study_instance_uid=consult.study_instance_uid, detail=detail)


def _past(consult: Consult, now: datetime) -> bool:
    """Whether the consult's time is up (whatever its stored state says)."""
    expires = as_utc(consult.expires_at)
    return expires is not None and expires <= now


def _day(now: datetime, days: int) -> str:
    return (now + timedelta(days=days)).isoformat(timespec="seconds")

"""Searching the audit trail: one filter type for ``GET /api/audit``, its FHIR export and ``pacs audit list|export``.

Filters (all optional, combined with AND):

=============  ===================================================================================
actor          exact
action         exact; a value ending in ``.`` or ``*`` matches as a prefix (``dimse.``, ``config.*``)
outcome        exact (``success``, ``warning``, ``partial``, ``failure``)
patient_id     exact
study          exact Study Instance UID (must be a UID)
since / until  ISO 8601 date or date-time (naive means UTC); ``since`` inclusive, ``until``
               inclusive; a bare date as ``until`` covers that whole day
=============  ===================================================================================

Rows come back in id order (the chain's order). Bad values raise :class:`~pacs.errors.InvalidInput`
naming the parameter.

**Who sees which rows** (issue 12, finding 6). An archive-wide administrator sees every row. An
administrator of a facility (``--facility``) sees, through :func:`visible_to`:

- rows about a study acquired at that facility (whoever acted, including refusals of other facilities);
- rows naming a patient but no study when only that facility holds a patient with that ID (a Patient ID
  that several facilities use is ambiguous without a study: such rows stay with the archive-wide admin);
- their own actions that name no patient or study (their logins, their reads of the trail).

Nothing else: logins and refusals of others, configuration changes, other facilities' rows. The chain
check (``/api/audit/verify``) spans every facility and is for archive-wide administrators only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, false, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import AuditEvent, Patient, Study
from pacs.errors import InvalidInput
from pacs.security.principal import AccessScope
from storage.keys import is_valid_uid

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
EXPORT_BATCH = 500

_OUTCOME_RE = re.compile(r"^[a-z][a-z-]{0,15}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    action_prefix: bool = False
    outcome: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    since: datetime | None = None  # aware, UTC
    until: datetime | None = None  # aware, UTC, inclusive
    # Set by visible_to(), never from request parameters: the facilities whose rows a facility admin sees,
    # and that admin's own actor name.
    facilities: frozenset[str] | None = None
    own_actor: str = ""

    def describe(self) -> str:
        """The filter as ``k=v`` fields (for the audit row of the read itself)."""
        fields = []
        for name in ("actor", "action", "outcome", "patient_id", "study_instance_uid"):
            value = getattr(self, name)
            if value:
                fields.append(f"{name}={value}{'*' if name == 'action' and self.action_prefix else ''}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                fields.append(f"{name}={value.isoformat()}")
        return " ".join(fields)


def visible_to(flt: AuditFilter, scope: AccessScope, actor: str) -> AuditFilter:
    """``flt`` narrowed to the rows a principal with ``scope`` may read (see the module docstring)."""
    if scope.unrestricted:
        return flt
    return replace(flt, facilities=scope.facilities if scope.facilities is not None else frozenset(),
                   own_actor=actor)


def _visible(facilities: frozenset[str], own_actor: str) -> ColumnElement[bool]:
    if not facilities:
        return false()
    codes = sorted(facilities)
    about_study = and_(AuditEvent.study_instance_uid != "", exists().where(
        Study.study_instance_uid == AuditEvent.study_instance_uid, Study.facility.in_(codes)))
    about_patient = and_(
        AuditEvent.study_instance_uid == "", AuditEvent.patient_id != "",
        exists().where(Patient.patient_id == AuditEvent.patient_id, Patient.facility.in_(codes)),
        ~exists().where(Patient.patient_id == AuditEvent.patient_id, Patient.facility.not_in(codes)))
    parts = [about_study, about_patient]
    if own_actor:
        parts.append(and_(AuditEvent.actor == own_actor, AuditEvent.study_instance_uid == "",
                          AuditEvent.patient_id == ""))
    return or_(*parts)


def make_filter(*, actor: str | None = None, action: str | None = None, outcome: str | None = None,
                patient_id: str | None = None, study: str | None = None, since: str | None = None,
                until: str | None = None) -> AuditFilter:
    """Validate raw parameter values (empty means absent) into an :class:`AuditFilter`."""
    actor = _text("actor", actor, 128)
    action = _text("action", action, 64)
    prefix = False
    if action and action[-1] in ".*":
        action, prefix = action.rstrip("*"), True
        if not action:
            action, prefix = None, False  # "*": every action
    outcome = _text("outcome", outcome, 16)
    if outcome and not _OUTCOME_RE.match(outcome):
        raise InvalidInput(f"outcome: {outcome[:20]!r} is not an outcome (success, warning, partial, failure)")
    patient_id = _text("patient_id", patient_id, 64)
    study = _text("study", study, 64)
    if study and not is_valid_uid(study):
        raise InvalidInput(f"study: {study[:70]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    start = parse_instant("since", since) if since else None
    end = parse_instant("until", until, end_of_day=True) if until else None
    if start is not None and end is not None and start > end:
        raise InvalidInput("since is after until")
    return AuditFilter(actor, action, prefix, outcome, patient_id, study, start, end)


def parse_instant(name: str, value: str, *, end_of_day: bool = False) -> datetime:
    """An ISO 8601 date or date-time as an aware UTC datetime (naive means UTC).

    A bare date is its midnight, or with ``end_of_day`` the last microsecond of that day.
    """
    text = value.strip()
    try:
        if _DATE_RE.match(text):
            day = date.fromisoformat(text)
            at = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return at + timedelta(days=1) - timedelta(microseconds=1) if end_of_day else at
        at = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidInput(f"{name}: {text[:40]!r} is not an ISO 8601 date or date-time "
                           "(e.g. 2026-11-28 or 2026-11-28T09:30:00+07:00)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
    if offset < 0:
        raise InvalidInput("offset must not be negative")


def count(session: Session, flt: AuditFilter) -> int:
    return int(session.scalar(_where(select(func.count()).select_from(AuditEvent), flt)) or 0)


def search(session: Session, flt: AuditFilter, limit: int = DEFAULT_LIMIT, offset: int = 0) -> list[dict[str, Any]]:
    """One page of matching events, in id order, as :func:`as_dict` dictionaries."""
    check_page(limit, offset)
    stmt = _where(select(AuditEvent), flt).order_by(AuditEvent.id).limit(limit).offset(offset)
    return [as_dict(e) for e in session.scalars(stmt)]


def iter_events(sessions: sessionmaker[Session], flt: AuditFilter, *, limit: int | None = None,
                batch_size: int = EXPORT_BATCH) -> Iterator[dict[str, Any]]:
    """Every matching event in id order (at most ``limit``), read in short transactions (keyset on id)."""
    last_id, sent = 0, 0
    while limit is None or sent < limit:
        size = batch_size if limit is None else min(batch_size, limit - sent)
        with sessions() as session:
            batch = [as_dict(e) for e in session.scalars(
                _where(select(AuditEvent), flt).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(size))]
        if not batch:
            return
        yield from batch
        sent += len(batch)
        last_id = batch[-1]["id"]


def as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id, "at": utc_iso(event.at), "actor": event.actor or "", "role": event.role or "",
        "source_address": event.source_address or "", "action": event.action or "",
        "outcome": event.outcome or "", "patient_id": event.patient_id or "",
        "study_instance_uid": event.study_instance_uid or "", "detail": event.detail or "",
        "entry_hash": event.entry_hash or "",
    }


def utc_iso(at: datetime | None) -> str:
    """ISO 8601 in UTC with a ``Z`` (SQLite hands back naive UTC datetimes)."""
    if at is None:
        return ""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _where(stmt: Select, flt: AuditFilter) -> Select:
    if flt.facilities is not None:
        stmt = stmt.where(_visible(flt.facilities, flt.own_actor))
    if flt.actor:
        stmt = stmt.where(AuditEvent.actor == flt.actor)
    if flt.action:
        stmt = stmt.where(AuditEvent.action.startswith(flt.action, autoescape=True) if flt.action_prefix
                          else AuditEvent.action == flt.action)
    if flt.outcome:
        stmt = stmt.where(AuditEvent.outcome == flt.outcome)
    if flt.patient_id:
        stmt = stmt.where(AuditEvent.patient_id == flt.patient_id)
    if flt.study_instance_uid:
        stmt = stmt.where(AuditEvent.study_instance_uid == flt.study_instance_uid)
    if flt.since is not None:
        stmt = stmt.where(AuditEvent.at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(AuditEvent.at <= flt.until)
    return stmt


def _text(name: str, value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        raise InvalidInput(f"{name} is longer than {limit} characters")
    if any(ord(c) < 32 for c in value):
        raise InvalidInput(f"{name} contains control characters")
    return value

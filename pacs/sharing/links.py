"""Create, list, revoke and open share links.

A token is 24 random bytes in URL-safe base64 (32 characters, 192 bits: short enough for a small QR code).
Only its SHA-256 is stored, and a link is looked up by that hash, so neither the database nor a timing of the
look-up tells anything about other tokens. The token is shown once, to its creator; it is never logged or
audited (audit rows name the link's id).

Opening (:func:`open_link`) checks, in this order: the address throttle (no database work when it refuses),
the token's form and its hash, revocation, the lock, expiry, and — when the link asks for it — the patient's
birth date, compared in constant time with the study's Patient's Birth Date. Every typed date first reserves
an attempt on the link (one conditional UPDATE below the limit), and only a right date gives it back, so
``failed_attempts`` counts the link's wrong dates over its life, parallel guesses included; at
``settings.share_link_max_failures`` the link locks until it is revoked and made again, and its creator sees
``locked`` in ``GET /api/shares``. Opening with the birth-date cookie, or a sub-page, never touches the count.
Every open is audited, success or not; repeated failed opens of one link (expired, revoked, locked, the
birth-date form) share a row a minute and count as failures for the address throttle.

:func:`open_link` commits its own writes (counters, lock, audit rows) also when it raises: call it with a
session that is not inside a ``session.begin()`` block. :func:`create_link` and :func:`revoke_link` write in
the caller's transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NoReturn

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs import audit
from pacs.db.models import Patient, Study
from pacs.errors import InvalidInput, NotFound, PacsError
from pacs.jobs import as_utc, utcnow
from pacs.security.access import authorize, may_see_study
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Capability, Role
from pacs.settings import Settings
from pacs.sharing.models import CONSULT, PATIENT, ShareLink
from pacs.sharing.throttle import ShareThrottle, Throttled

__all__ = [
    "BirthDateRequired", "CreatedLink", "LinkGone", "LinkInfo", "LinkLocked", "LinkNotFound", "OpenedLink",
    "ShareScope", "Throttled", "WrongBirthDate", "birth_date_cookie", "check_birth_date_cookie", "create_link",
    "hash_token", "lifetime_days", "link_url", "list_links", "normalize_birth_date", "open_link",
    "revoke_link", "session_principal", "well_formed",
]

MIN_DAYS, MAX_DAYS = 1, 365
TOKEN_BYTES = 24
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() also takes "²" and "١", which int() refuses
PURPOSES = (PATIENT, CONSULT)


class ShareScope(StrEnum):
    REPORT = "report"
    REPORT_KEY_IMAGES = "report+key-images"
    STUDY = "study"


class LinkNotFound(NotFound):
    """No link has this token (also a malformed token): HTTP 404."""


class LinkGone(PacsError):
    """The link expired or was revoked: HTTP 410."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"this link {reason}")
        self.reason = reason  # "expired" or "revoked"


class BirthDateRequired(PacsError):
    """The link asks for the patient's birth date first (the page shows the form)."""


class WrongBirthDate(PacsError):
    """A wrong birth date (counted): HTTP 403. ``remaining`` tries are left before the link locks."""

    def __init__(self, remaining: int) -> None:
        super().__init__(f"the birth date does not match; {remaining} tries left")
        self.remaining = remaining


class LinkLocked(PacsError):
    """Too many wrong birth dates: the link is locked until its creator revokes it and makes another: 423."""


@dataclass(frozen=True)
class CreatedLink:
    id: int
    token: str  # shown once, to the creator only
    url: str
    expires_at: datetime
    scope: ShareScope


@dataclass(frozen=True)
class LinkInfo:
    """A link as its creator's facility sees it in ``GET /api/shares`` (never the token)."""

    id: int
    study_instance_uid: str
    scope: str
    purpose: str
    consult_id: int | None
    birth_date_check: bool
    state: str  # active, expired, revoked, locked
    failed_attempts: int
    locked_at: datetime | None
    created_by: str
    created_by_facility: str
    created_at: datetime | None
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str
    last_opened_at: datetime | None
    open_count: int


@dataclass(frozen=True)
class OpenedLink:
    """What a valid token (and, when asked, the right birth date) opens."""

    link_id: int
    study_instance_uid: str
    scope: ShareScope
    purpose: str
    consult_id: int | None
    facility: str
    facility_name: str
    expires_at: datetime
    birth_date_check: bool
    principal: Principal


# -- tokens ---------------------------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def well_formed(token: str) -> bool:
    return bool(_TOKEN.match(token))


def link_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/s/{token}"


# -- create, list, revoke -------------------------------------------------------------------------------


def lifetime_days(requested: int | None, settings: Settings) -> int:
    """A new link's lifetime: the days asked for, else ``settings.share_link_default_days``."""
    return requested or settings.share_link_default_days


def create_link(session: Session, principal: Principal, study_instance_uid: str, *, scope: ShareScope,
                expires_in_days: int, birth_date_check: bool, base_url: str, purpose: str = PATIENT,
                consult_id: int | None = None) -> CreatedLink:
    """A new link to a study the principal may see (NotFound otherwise), in the caller's transaction; audited."""
    authorize(principal, Capability.SHARE_CREATE)
    try:
        scope = ShareScope(scope)
    except ValueError:
        raise InvalidInput(f"scope is one of: {', '.join(s.value for s in ShareScope)}") from None
    if not isinstance(expires_in_days, int) or not MIN_DAYS <= expires_in_days <= MAX_DAYS:
        raise InvalidInput(f"expires_in_days is {MIN_DAYS} to {MAX_DAYS}")
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose is one of: {', '.join(PURPOSES)}")
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
    # a study seen only through a consult or as a person's prior from another facility is not this
    # facility's to hand out: like an unknown study
    if study is None or not may_see_study(session, principal.scope, study_instance_uid, borrowed=False):
        raise NotFound(f"no study {study_instance_uid}")
    patient = session.get(Patient, study.patient_fk) if study.patient_fk is not None else None
    if birth_date_check and normalize_birth_date(patient.patient_birth_date if patient else "") is None:
        raise InvalidInput("the study's patient has no birth date on record: make the link without the "
                           "birth-date check")
    token = new_token()
    now = utcnow()
    expires_at = now + timedelta(days=expires_in_days)
    row = ShareLink(study_fk=study.id, token_sha256=hash_token(token), scope=scope.value, purpose=purpose,
                    consult_id=consult_id, birth_date_check=bool(birth_date_check), failed_attempts=0,
                    created_by=principal.subject[:128],
                    created_by_facility=(principal.facility or study.facility or "")[:64], created_at=now,
                    expires_at=expires_at, revoked_by="", open_count=0)
    session.add(row)
    session.flush()
    audit.append(session, action="share.create", actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, patient_id=patient.patient_id if patient else "",
                 study_instance_uid=study_instance_uid,
                 detail=f"link {row.id} scope {scope.value} expires {expires_at.date().isoformat()}"
                 f"{' birth-date check' if birth_date_check else ''}{f' consult {consult_id}' if consult_id else ''}")
    return CreatedLink(row.id, token, link_url(base_url, token), expires_at, scope)


def list_links(session: Session, principal: Principal, study_instance_uid: str = "") -> list[LinkInfo]:
    """The links of the caller's facility (every link for a principal of every facility), newest first."""
    authorize(principal, Capability.SHARE_CREATE)
    stmt = select(ShareLink, Study.study_instance_uid).join(Study, Study.id == ShareLink.study_fk)
    if principal.facility:
        stmt = stmt.where(ShareLink.created_by_facility == principal.facility)
    if study_instance_uid:
        stmt = stmt.where(Study.study_instance_uid == study_instance_uid)
    now = utcnow()
    return [_info(row, uid, now) for row, uid in session.execute(stmt.order_by(ShareLink.id.desc()).limit(1000))]


def revoke_link(session: Session, principal: Principal, link_id: int) -> LinkInfo:
    """Revoke a link (its creator, an admin, or a user of the creator's facility who may share); audited.
    NotFound for a link the caller may not manage (the same answer as for an unknown id)."""
    authorize(principal, Capability.SHARE_CREATE)
    found = session.execute(select(ShareLink, Study.study_instance_uid, Study.patient_fk)
                            .join(Study, Study.id == ShareLink.study_fk)
                            .where(ShareLink.id == link_id).with_for_update(of=ShareLink)).one_or_none()
    if found is None or not _may_manage(principal, found[0]):
        raise NotFound(f"no share link {link_id}")
    row, uid, patient_fk = found
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        row.revoked_by = principal.subject[:128]
        patient = session.get(Patient, patient_fk) if patient_fk is not None else None
        audit.append(session, action="share.revoke", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, patient_id=patient.patient_id if patient else "",
                     study_instance_uid=uid, detail=f"link {row.id}")
    session.flush()
    return _info(row, uid, utcnow())


def _may_manage(principal: Principal, row: ShareLink) -> bool:
    if row.created_by == principal.subject or not principal.facility:
        return True
    return principal.facility == row.created_by_facility and (
        principal.can(Capability.ADMIN) or principal.can(Capability.SHARE_CREATE))


def _state(row: ShareLink, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.locked_at is not None:
        return "locked"
    if _expires(row) <= now:
        return "expired"
    return "active"


def _info(row: ShareLink, uid: str, now: datetime) -> LinkInfo:
    return LinkInfo(row.id, uid, row.scope, row.purpose, row.consult_id, row.birth_date_check, _state(row, now),
                    row.failed_attempts, as_utc(row.locked_at), row.created_by, row.created_by_facility,
                    as_utc(row.created_at), _expires(row), as_utc(row.revoked_at), row.revoked_by,
                    as_utc(row.last_opened_at), row.open_count)


# -- open -----------------------------------------------------------------------------------------------


def open_link(session: Session, token: str, *, address: str, throttle: ShareThrottle,
              birth_date: str | None = None, birth_date_verified: bool = False, action: str = "share.open",
              settings: Settings | None = None) -> OpenedLink:
    """What ``token`` opens, or the reason it does not (see the module docstring); audited as ``action``.

    ``address``: the client's host (``request.client.host``, without the port): the throttle's key and the
    audit rows' source address. ``throttle``: the app's (one per app). ``birth_date_verified``: the caller
    already holds proof of a correct birth date for this link (the signed cookie of :func:`birth_date_cookie`).
    """
    settings = settings or Settings()
    throttle.check(address)  # before any database work
    row = None
    if well_formed(token):
        row = session.scalars(select(ShareLink).where(ShareLink.token_sha256 == hash_token(token))).one_or_none()
    if row is None:
        throttle.failed(address)
        _audit_open(session, action, "failure", address, None, "unknown link")
        raise LinkNotFound("no such link")
    study = session.get(Study, row.study_fk)
    assert study is not None  # the foreign key cascades
    patient = session.get(Patient, study.patient_fk) if study.patient_fk is not None else None
    now = utcnow()
    state = _state(row, now)
    if state in ("revoked", "expired", "locked"):
        _refuse_gone(session, action, address, throttle, row, state, study, patient)
    if row.birth_date_check and not birth_date_verified:
        if birth_date is None:
            if throttle.link_to_audit(row.id, "birth date asked"):
                _audit_open(session, action, "failure", address, row, "birth date asked (repeats within a "
                            "minute covered by this row)", study, patient)
            raise BirthDateRequired("this link asks for the patient's birth date")
        given = normalize_birth_date(birth_date)
        if given is None:
            raise InvalidInput("enter the birth date as dd/mm/yyyy")
        _check_birth_date(session, row, given, address, throttle, settings, study, patient)
    if action == "share.open":
        session.execute(update(ShareLink).where(ShareLink.id == row.id)
                        .values(open_count=ShareLink.open_count + 1, last_opened_at=now))
    _audit_open(session, action, "success", address, row, "", study, patient)
    facility = study.facility or ""
    return OpenedLink(row.id, study.study_instance_uid, ShareScope(row.scope), row.purpose, row.consult_id,
                      facility, settings.facility_names.get(facility, "") or facility, _expires(row),
                      row.birth_date_check, _principal(row, study, address))


def session_principal(session: Session, link_id: int, address: str) -> Principal | None:
    """The principal of a viewer session opened through link ``link_id`` (pacs.security.authenticate), or None
    once the link is revoked, locked, expired or gone: checked on every request, so revocation bites at once."""
    row = session.get(ShareLink, link_id)
    if row is None or _state(row, utcnow()) != "active":
        return None
    study = session.get(Study, row.study_fk)
    return _principal(row, study, address) if study is not None else None


def _principal(row: ShareLink, study: Study, address: str) -> Principal:
    """Exactly one study: its report (REPORT_READ); the whole study for scope "study" (key images of scope
    "report+key-images" are served by the share routes themselves, not through DICOMweb)."""
    caps = {Capability.REPORT_READ}
    if row.scope == ShareScope.STUDY.value:
        caps |= {Capability.STUDY_READ, Capability.STUDY_SEARCH}
    return Principal(subject=f"share:{row.id}", role=Role.PATIENT, capabilities=frozenset(caps),
                     scope=AccessScope(study_uids=frozenset({study.study_instance_uid})), kind="share",
                     facility=study.facility or "", source_address=address)


def _refuse_gone(session: Session, action: str, address: str, throttle: ShareThrottle, row: ShareLink,
                 state: str, study: Study, patient: Patient | None) -> NoReturn:
    """Refuse an open of an expired, revoked or locked link: a failure for the address throttle, audited once
    per link, kind and minute (a flood of opens of a dead link writes no flood of hash-chained rows)."""
    throttle.failed(address)
    if throttle.link_to_audit(row.id, state):
        _audit_open(session, action, "failure", address, row, f"{state} (repeats within a minute covered by this "
                    "row)", study, patient)
    if state == "locked":
        raise LinkLocked("this link is locked after too many wrong birth dates")
    raise LinkGone(state)


def _check_birth_date(session: Session, row: ShareLink, given: str, address: str, throttle: ShareThrottle,
                      settings: Settings, study: Study, patient: Patient | None) -> None:
    """Compare a typed birth date, race-free: the attempt is reserved on the link first, in one conditional
    UPDATE that only succeeds below the limit on an unlocked link (so N parallel guesses can never compare
    more than the limit allows), and given back only when the date is right. Raises for a wrong date (and locks
    the link when that was the last attempt) or when no attempt is left."""
    limit = settings.share_link_max_failures
    attempt = session.scalars(
        update(ShareLink).where(ShareLink.id == row.id, ShareLink.locked_at.is_(None),
                                ShareLink.revoked_at.is_(None), ShareLink.failed_attempts < limit)
        .values(failed_attempts=ShareLink.failed_attempts + 1).returning(ShareLink.failed_attempts)).one_or_none()
    session.commit()
    if attempt is None:  # no attempt left (or revoked meanwhile)
        session.refresh(row)
        if row.revoked_at is None:
            _lock(session, row.id)
        _refuse_gone(session, "share.open", address, throttle, row,
                     "revoked" if row.revoked_at is not None else "locked", study, patient)
    expected = normalize_birth_date(patient.patient_birth_date if patient else "") or ""
    if expected and hmac.compare_digest(given.encode(), expected.encode()):
        session.execute(update(ShareLink).where(ShareLink.id == row.id, ShareLink.failed_attempts > 0)
                        .values(failed_attempts=ShareLink.failed_attempts - 1))  # the attempt given back
        session.commit()
        return
    throttle.failed(address)
    if attempt >= limit:  # this wrong date used the last attempt (counted by the reservation, not re-read)
        _lock(session, row.id)
        _audit_open(session, "share.open", "failure", address, row,
                    f"wrong birth date ({attempt} of {limit}): locked", study, patient)
        raise LinkLocked("this link is locked after too many wrong birth dates")
    _audit_open(session, "share.open", "failure", address, row, f"wrong birth date ({attempt} of {limit})",
                study, patient)
    raise WrongBirthDate(limit - attempt)


def _lock(session: Session, link_id: int) -> None:
    session.execute(update(ShareLink).where(ShareLink.id == link_id, ShareLink.locked_at.is_(None))
                    .values(locked_at=utcnow()))
    session.commit()


def _audit_open(session: Session, action: str, outcome: str, address: str, row: ShareLink | None, note: str,
                study: Study | None = None, patient: Patient | None = None) -> None:
    """One audit row, committed now (also for a failure the caller turns into an error page)."""
    what = f"link {row.id}" if row is not None else ""
    detail = ": ".join(p for p in (what, note) if p)
    audit.append(session, action=action, actor=f"share:{row.id}" if row is not None else "share:unknown",
                 role="share", outcome=outcome, source_address=address,
                 patient_id=patient.patient_id if patient is not None else "",
                 study_instance_uid=study.study_instance_uid if study is not None else "", detail=detail)
    session.commit()


# -- birth dates ----------------------------------------------------------------------------------------

_DATE_FORMATS = (
    re.compile(r"^(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})$"),  # an HTML date input
    re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})$"),  # DICOM DA
    re.compile(r"^(?P<d>\d{1,2})[/.\-](?P<m>\d{1,2})[/.\-](?P<y>\d{4})$"),  # dd/mm/yyyy, as written in Vietnam
)


def normalize_birth_date(value: str) -> str | None:
    """``YYYYMMDD`` of a date written as yyyy-mm-dd, yyyymmdd or dd/mm/yyyy (also with '.' or '-'); None when
    it is not a real date."""
    text = (value or "").strip()
    for pattern in _DATE_FORMATS:
        match = pattern.match(text)
        if match:
            try:
                day = datetime(int(match["y"]), int(match["m"]), int(match["d"]))
            except ValueError:
                return None
            return day.strftime("%Y%m%d")
    return None


def birth_date_cookie(secret: bytes, token: str, ttl_s: int) -> str:
    """The value of the cookie that remembers a correct birth date for this link: its expiry and an HMAC of
    the token's hash and the expiry under the archive's secret."""
    expires = int(time.time()) + ttl_s
    return f"{expires}.{_cookie_mac(secret, token, expires)}"


def check_birth_date_cookie(secret: bytes, token: str, value: str | None) -> bool:
    expires_text, _, mac = (value or "").partition(".")
    if not _DIGITS.fullmatch(expires_text) or int(expires_text) < time.time():
        return False
    return hmac.compare_digest(mac, _cookie_mac(secret, token, int(expires_text)))


def _cookie_mac(secret: bytes, token: str, expires: int) -> str:
    message = f"share-birth-date|{hash_token(token)}|{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _expires(row: ShareLink) -> datetime:
    expires = as_utc(row.expires_at)
    assert expires is not None  # the column is NOT NULL
    return expires

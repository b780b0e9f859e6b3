"""Local users and API tokens: create, list, disable, revoke (the `pacs user` / `pacs token` commands)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs.db.models import Patient
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.security.models import ApiToken, User
from pacs.security.passwords import hash_password, verify_password
from pacs.security.roles import Role, parse_role

TOKEN_PREFIX = "pacs_"


@dataclass(frozen=True)
class NewToken:
    id: int
    name: str
    secret: str  # shown once; only its SHA-256 is stored
    expires_at: datetime


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _role(value: str | Role) -> Role:
    try:
        return parse_role(str(value))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def _check_patient(session: Session, role: Role, patient_id: str, facility: str, issuer: str) -> None:
    """A patient account or token names exactly one patient record: Patient ID, issuer and facility.

    The same local ID names different people at different hospitals, so the facility is required; when
    that facility already holds the ID under some issuer(s), the issuer must be one of them (an issuer
    that matches no record would show nothing, silently). A patient not yet in the archive may be named
    ahead of their images: the token then shows studies as they arrive under exactly that identity.
    """
    patient_id, facility, issuer = patient_id.strip(), facility.strip(), issuer.strip()
    if role is not Role.PATIENT:
        if patient_id or issuer:
            raise InvalidInput("--patient-id and --issuer are only for the patient role")
        return
    if not patient_id:
        raise InvalidInput("the patient role needs --patient-id (the patient whose studies it may see)")
    if not facility:
        raise InvalidInput("the patient role needs --facility: a Patient ID is only unique within the facility "
                           "(and issuer) that assigned it, so a patient token is bound to one facility's patient")
    if facility == "*" or len(facility) > 64 or len(patient_id) > 64 or len(issuer) > 64:
        raise InvalidInput("a patient token names one facility, one Patient ID and one issuer (64 characters each)")
    issuers = set(session.scalars(select(Patient.issuer_of_patient_id).where(Patient.patient_id == patient_id,
                                                                             Patient.facility == facility)))
    if issuers and issuer not in issuers:
        known = ", ".join(repr(i) if i else "(none)" for i in sorted(issuers))
        raise InvalidInput(f"patient {patient_id} of facility {facility} is recorded with issuer {known}: "
                           "give --issuer (empty for none) to say which patient record the token is for")


def create_user(session: Session, username: str, password: str, role: str | Role, *, facility: str = "",
                patient_id: str = "", issuer: str = "", full_name: str = "") -> User:
    username = username.strip()
    if not 1 <= len(username) <= 64 or not username.isprintable():
        raise InvalidInput("a user name has 1-64 printable characters")
    parsed = _role(role)
    _check_patient(session, parsed, patient_id, facility, issuer)
    try:
        digest = hash_password(password)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    user = User(username=username, password_hash=digest, role=parsed.value, facility=facility.strip(),
                patient_id=patient_id.strip(), patient_issuer=issuer.strip(), full_name=full_name, active=True)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"user {username} already exists") from exc
    return user


def check_password(session: Session, username: str, password: str) -> User | None:
    """The active user with this password, else None (same work whether or not the user exists)."""
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    ok = verify_password(user.password_hash if user else None, password)
    return user if ok and user is not None and user.active else None


def set_active(session: Session, username: str, active: bool) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise NotFound(f"no user {username}")
    user.active = active
    return user


def set_password(session: Session, username: str, password: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise NotFound(f"no user {username}")
    try:
        user.password_hash = hash_password(password)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def has_admin(session: Session) -> bool:
    return session.scalar(select(User.id).where(User.role == Role.ADMIN.value, User.active).limit(1)) is not None


def create_token(session: Session, name: str, role: str | Role, *, days: int, facility: str = "",
                 patient_id: str = "", issuer: str = "", images: bool = False, created_by: str = "") -> NewToken:
    name = name.strip()
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise InvalidInput("a token name has 1-64 printable characters")
    if not 1 <= days <= 3650:
        raise InvalidInput("a token lives 1 to 3650 days")
    parsed = _role(role)
    _check_patient(session, parsed, patient_id, facility, issuer)
    if images and parsed is not Role.PATIENT:
        raise InvalidInput("--images only applies to patient tokens (other roles' rights come from the role)")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + timedelta(days=days)
    row = ApiToken(name=name, secret_sha256=token_digest(secret), role=parsed.value, facility=facility.strip(),
                   patient_id=patient_id.strip(), patient_issuer=issuer.strip(), images_granted=images,
                   created_by=created_by, expires_at=expires)
    session.add(row)
    session.flush()
    return NewToken(row.id, name, secret, expires)


def find_token(session: Session, secret: str) -> ApiToken | None:
    """The token with this secret if it is neither revoked nor expired."""
    row = session.scalars(select(ApiToken).where(ApiToken.secret_sha256 == token_digest(secret))).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
    return row if expires > datetime.now(UTC) else None


def revoke_token(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))

"""Turning a bearer token into a :class:`Principal`.

Four kinds of bearer token are accepted:

- ``pacs_…``: an API token (`pacs token create`); looked up by the SHA-256 of its secret;
- a session token issued by ``POST /api/auth/login``: a JWT (HS256) signed with the archive's
  ``auth_secret``, short-lived (``session_token_ttl_s``); the user is re-read on every request,
  so disabling a user takes effect at once;
- a share-link viewer session (audience ``filmless-pacs-share``, HS256 with the same secret): issued by
  ``GET /s/{token}/viewer`` for a link of scope "study"; its principal sees that one study, and the link is
  re-checked on every request;
- a JWT from the configured OIDC issuer (RS256/ES256, keys from its JWKS URL), with the role
  taken from ``oidc_role_claim`` and the facility from ``oidc_facility_claim``; a patient's JWT also
  carries ``patient_id`` (and ``patient_id_issuer`` when the patient's ID has an issuer) and names its
  own facility (``*`` is refused for patients).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

import jwt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs.errors import PacsError
from pacs.persons.scope import priors_allowed
from pacs.security.accounts import TOKEN_PREFIX, find_token, token_digest
from pacs.security.models import User
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.security.token_cache import VERIFIED
from pacs.settings import Settings

SESSION_ISSUER = "filmless-pacs"
SESSION_AUDIENCE = "filmless-pacs-session"
SHARE_AUDIENCE = "filmless-pacs-share"  # a viewer session opened through a share link (pacs.sharing)
_SECRET_FILE = "auth-secret"


class AuthenticationError(PacsError):
    """No valid credential: HTTP 401. The message is safe to show the client."""


def load_or_create_secret(settings: Settings) -> bytes:
    """``auth_secret`` if configured, else a random key kept in the data folder (mode 0600)."""
    if settings.auth_secret:
        return settings.auth_secret.encode("utf-8")
    path = Path(settings.data_dir) / _SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_urlsafe(48).encode("ascii"))
    return path.read_bytes().strip()


class Authenticator:
    """One per process; thread-safe."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._secret = load_or_create_secret(settings)

    # -- issuing ---------------------------------------------------------------------------------
    def issue_session_token(self, user: User) -> tuple[str, int]:
        ttl = self._settings.session_token_ttl_s
        now = datetime.now(UTC)
        claims = {"iss": SESSION_ISSUER, "aud": SESSION_AUDIENCE, "sub": user.username, "uid": user.id,
                  "pwd": password_fingerprint(user.password_hash), "iat": now, "exp": now + timedelta(seconds=ttl)}
        return jwt.encode(claims, self._secret, algorithm="HS256"), ttl

    def issue_share_token(self, link_id: int, ttl_s: int) -> tuple[str, int]:
        """A short-lived viewer session for share link ``link_id`` (scope "study"): the link is re-checked on
        every request (:func:`pacs.sharing.links.session_principal`), so revoking it ends the session at once."""
        now = datetime.now(UTC)
        claims = {"iss": SESSION_ISSUER, "aud": SHARE_AUDIENCE, "sub": f"share:{link_id}", "lnk": link_id,
                  "iat": now, "exp": now + timedelta(seconds=ttl_s)}
        return jwt.encode(claims, self._secret, algorithm="HS256"), ttl_s

    # -- checking --------------------------------------------------------------------------------
    def _priors(self, role: Role, facility: str) -> bool:
        """Whether this role sees a person's studies of other facilities (pacs.persons.scope)."""
        return priors_allowed(self._settings.priors_across_facilities, role, facility)

    def authenticate(self, token: str, source_address: str = "", *, cached: bool = False) -> Principal:
        """The principal of ``token``. ``cached=True`` (the DICOMweb read path only) may answer an API token from
        what was verified less than a second ago (:mod:`pacs.security.token_cache`: revocation then takes effect
        within that second); every other kind of token is checked in full every time."""
        token = token.strip()
        if not token or len(token) > 8192:
            raise AuthenticationError("missing or malformed bearer token")
        if token.startswith(TOKEN_PREFIX):
            return self._api_token(token, source_address, cached)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed bearer token") from None
        if header.get("alg") == "HS256":
            if _unverified_audience(token) == SHARE_AUDIENCE:
                return self._share_token(token, source_address)
            return self._session_token(token, source_address)
        if self._settings.oidc_issuer:
            return self._oidc_token(token, source_address)
        raise AuthenticationError("unsupported token")

    def _api_token(self, token: str, source_address: str, cached: bool = False) -> Principal:
        digest = f"{id(self)}:{token_digest(token)}" if cached else ""  # this authenticator's (settings, index)
        if cached and (known := VERIFIED.get(digest, source_address)) is not None:
            return known
        started = VERIFIED.started()  # before the statement: bounds how long a revocation can go unseen
        with self._sessions() as session:
            row = find_token(session, token)
        if row is None:
            raise AuthenticationError("unknown, revoked or expired token")
        role = Role(row.role)
        principal = Principal(subject=f"token:{row.name}", role=role,
                              capabilities=capabilities_of(role, images_granted=row.images_granted),
                              scope=scope_for(role, row.facility, row.patient_id, row.patient_issuer,
                                              linked_priors=self._priors(role, row.facility)), kind="token",
                              facility=row.facility, source_address=source_address, token_id=row.id)
        if cached:
            VERIFIED.put(digest, principal, row.expires_at, started)
        return principal

    def _session_token(self, token: str, source_address: str) -> Principal:
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], audience=SESSION_AUDIENCE,
                                issuer=SESSION_ISSUER, options={"require": ["exp", "sub", "uid", "pwd"]})
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("session expired: log in again") from None
        except jwt.PyJWTError:
            raise AuthenticationError("invalid session token") from None
        with self._sessions() as session:
            user = session.scalars(select(User).where(User.id == claims["uid"])).one_or_none()
        if user is None or not user.active or user.username != claims["sub"]:
            raise AuthenticationError("user disabled or removed")
        if not hmac.compare_digest(str(claims.get("pwd") or ""), password_fingerprint(user.password_hash)):
            raise AuthenticationError("password changed: log in again")
        role = Role(user.role)
        return Principal(subject=user.username, role=role, capabilities=capabilities_of(role),
                         scope=scope_for(role, user.facility, user.patient_id, user.patient_issuer,
                                         linked_priors=self._priors(role, user.facility)), kind="session",
                         facility=user.facility, source_address=source_address)

    def _share_token(self, token: str, source_address: str) -> Principal:
        from pacs.sharing.links import session_principal

        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], audience=SHARE_AUDIENCE,
                                issuer=SESSION_ISSUER, options={"require": ["exp", "sub", "lnk"]})
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("share session expired: open the link again") from None
        except jwt.PyJWTError:
            raise AuthenticationError("invalid share session token") from None
        if not isinstance(claims["lnk"], int):
            raise AuthenticationError("invalid share session token")
        with self._sessions() as session:
            principal = session_principal(session, claims["lnk"], source_address)
        if principal is None:
            raise AuthenticationError("the share link was revoked, expired or locked")
        return principal

    @cached_property
    def _jwks(self) -> jwt.PyJWKClient:
        return jwt.PyJWKClient(self._settings.oidc_jwks_url, cache_keys=True, lifespan=600, timeout=10)

    def _oidc_token(self, token: str, source_address: str) -> Principal:
        settings = self._settings
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"],
                                audience=settings.oidc_audience, issuer=settings.oidc_issuer,
                                options={"require": ["exp", "iss", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired") from None
        except (jwt.PyJWTError, jwt.PyJWKClientError):
            raise AuthenticationError("invalid token") from None
        role = oidc_role(claims.get(settings.oidc_role_claim))
        if role is None:
            raise AuthenticationError(f"token has no known role in claim {settings.oidc_role_claim!r}")
        # Fail closed: a token without a facility claim is refused; "*" is the explicit "every facility".
        facility_claim = claims.get(settings.oidc_facility_claim)
        if not isinstance(facility_claim, str) or not facility_claim.strip():
            raise AuthenticationError(f"token has no {settings.oidc_facility_claim!r} claim ('*' for every facility)")
        facility = "" if facility_claim.strip() == "*" else facility_claim.strip()[:64]
        patient_id = str(claims.get("patient_id") or "")[:64]
        issuer = claims.get("patient_id_issuer") or ""
        if role is Role.PATIENT:
            # One patient record (issue 12, finding 5): a facility — never "*" — and an ID; the issuer when given.
            if not patient_id:
                raise AuthenticationError("a patient token needs a patient_id claim")
            if not facility:
                raise AuthenticationError(f"a patient token needs its own facility in {settings.oidc_facility_claim!r}"
                                          " ('*' is refused: a Patient ID names one facility's patient)")
            if not isinstance(issuer, str) or len(issuer) > 64:
                raise AuthenticationError("patient_id_issuer must be a string of at most 64 characters")
        return Principal(subject=f"oidc:{str(claims['sub'])[:100]}", role=role, capabilities=capabilities_of(role),
                         scope=scope_for(role, facility, patient_id, str(issuer).strip(),
                                         linked_priors=self._priors(role, facility)), kind="oidc",
                         facility=facility, source_address=source_address)


def _unverified_audience(token: str) -> object:
    """The ``aud`` claim before the signature is checked (only to pick the checker; each checker verifies)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("aud")
    except jwt.PyJWTError:
        return None


def password_fingerprint(password_hash: str) -> str:
    """A short digest of the stored hash, carried in session tokens: changing the password ends them."""
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()[:16]


def oidc_role(claim: object) -> Role | None:
    """The most privileged known role among the claim's values (a string or a list of strings)."""
    values = [claim] if isinstance(claim, str) else list(claim) if isinstance(claim, list | tuple) else []
    known = {r.value: r for r in Role}
    found = [known[str(v).lower()] for v in values if str(v).lower() in known]
    order = list(Role)
    return min(found, key=order.index) if found else None

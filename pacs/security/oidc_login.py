"""Browser sign-in with the configured OIDC provider: the authorization-code flow with PKCE (issue 16).

The archive already accepts the provider's JWTs as bearer tokens (:mod:`pacs.security.authenticate`); this module
adds what a browser needs to get one:

- :class:`Provider`: the provider's endpoints, from ``{issuer}/.well-known/openid-configuration`` (fetched with a
  short timeout, kept for an hour) with the ``oidc_authorization_url`` / ``oidc_token_url`` /
  ``oidc_end_session_url`` settings as overrides (a provider without discovery works from the settings alone);
- :func:`start`: a fresh :class:`PendingLogin` (state, nonce, PKCE verifier, the local page to return to) and the
  authorization URL (``response_type=code``, S256 code challenge); the pending login travels in a signed,
  short-lived cookie (:func:`seal` / :func:`unseal`), so it is bound to the browser that started it;
- :meth:`Provider.exchange`: the code for tokens at the token endpoint (``client_secret_basic`` when a secret is
  configured, else a public client proven by PKCE alone);
- :func:`validate_id_token`: the ID token's signature (the issuer's JWKS, ``oidc_jwks_url``), ``iss``,
  ``aud`` = client id (``azp`` when there are several audiences), ``exp`` and the ``nonce`` of this login.

No client library: the flow is a few requests, and the JWT checks are PyJWT's, as for bearer tokens.

Which token becomes the page session is the caller's choice through :func:`session_candidates`: the access token
first, then the ID token; each is resolved by the same :class:`~pacs.security.authenticate.Authenticator` as a
bearer token (issuer, ``oidc_audience``, role and facility claims), so a page session of an OIDC user has exactly
the rights of that user's API calls.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt

from pacs.settings import Settings

log = logging.getLogger("pacs.security")

STATE_AUDIENCE = "filmless-pacs-oidc-login"
STATE_TTL_S = 600  # the user has ten minutes at the provider
DISCOVERY_TTL_S = 3600
DISCOVERY_RETRY_S = 60  # after a failed discovery, pages do not wait on the provider again for a minute
HTTP_TIMEOUT_S = 5.0
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
CLOCK_SKEW_S = 60


class OidcLoginFailed(Exception):
    """The sign-in did not complete. ``reason`` is for the audit row and the log (never shown as is);
    ``kind`` picks the message the user sees: ``denied`` (refused or cancelled at the provider), ``unavailable``
    (the provider could not be reached), ``failed`` (anything else)."""

    def __init__(self, reason: str, kind: str = "failed", actor: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.actor = actor  # the verified user, once the ID token is checked (the audit row's actor)


def browser_flow_enabled(settings: Settings) -> bool:
    """Whether the sign-in page offers the provider: an issuer and a client id are configured."""
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def provider_name(settings: Settings) -> str:
    """The name on the sign-in button: ``oidc_provider_name``, else the issuer's host."""
    return settings.oidc_provider_name or urlsplit(settings.oidc_issuer).hostname or settings.oidc_issuer


# -- the pending login (state cookie) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingLogin:
    state: str
    nonce: str
    verifier: str
    next: str


def _state_key(secret: bytes) -> bytes:
    return hashlib.sha256(b"oidc-login-state|" + secret).digest()


def seal(login: PendingLogin, secret: bytes) -> str:
    """The cookie value of ``login``: signed with (a key derived from) the archive's secret, valid ten minutes."""
    now = datetime.now(UTC)
    claims = {"aud": STATE_AUDIENCE, "st": login.state, "nn": login.nonce, "cv": login.verifier, "nx": login.next,
              "iat": now, "exp": now + timedelta(seconds=STATE_TTL_S)}
    return jwt.encode(claims, _state_key(secret), algorithm="HS256")


def unseal(value: str, secret: bytes) -> PendingLogin:
    """The pending login of a cookie value (:class:`OidcLoginFailed` when missing, forged or expired)."""
    if not value:
        raise OidcLoginFailed("no sign-in in progress in this browser (state cookie missing)")
    try:
        claims = jwt.decode(value, _state_key(secret), algorithms=["HS256"], audience=STATE_AUDIENCE,
                            options={"require": ["exp", "st", "nn", "cv"]})
    except jwt.ExpiredSignatureError:
        raise OidcLoginFailed("the sign-in took too long (state cookie expired)") from None
    except jwt.PyJWTError:
        raise OidcLoginFailed("invalid state cookie") from None
    return PendingLogin(str(claims["st"]), str(claims["nn"]), str(claims["cv"]), str(claims.get("nx") or ""))


def code_challenge(verifier: str) -> str:
    """The PKCE S256 challenge of ``verifier`` (RFC 7636)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def start(settings: Settings, authorization_url: str, redirect_uri: str, next_path: str) -> tuple[PendingLogin, str]:
    """A new pending login and the provider's authorization URL for it."""
    login = PendingLogin(state=secrets.token_urlsafe(24), nonce=secrets.token_urlsafe(24),
                         verifier=secrets.token_urlsafe(48), next=next_path)
    query = urlencode({"response_type": "code", "client_id": settings.oidc_client_id, "redirect_uri": redirect_uri,
                       "scope": settings.oidc_scopes, "state": login.state, "nonce": login.nonce,
                       "code_challenge": code_challenge(login.verifier), "code_challenge_method": "S256"})
    separator = "&" if urlsplit(authorization_url).query else "?"
    return login, f"{authorization_url}{separator}{query}"


def check_callback(login: PendingLogin, params: dict[str, str]) -> str:
    """The authorization code of the callback's query ``params``, after checking they answer ``login``."""
    if not secrets.compare_digest(params.get("state", ""), login.state):
        raise OidcLoginFailed("state mismatch (the answer is not for the sign-in this browser started)")
    if error := params.get("error"):
        text = params.get("error_description", "")[:200]
        kind = "denied" if error in ("access_denied", "login_required", "consent_required") else "failed"
        raise OidcLoginFailed(f"the provider answered {error[:64]}" + (f": {text}" if text else ""), kind)
    code = params.get("code", "")
    if not code or len(code) > 4096:
        raise OidcLoginFailed("the provider's answer has no code")
    return code


# -- the ID token ------------------------------------------------------------------------------------------------


def validate_id_token(id_token: str, settings: Settings, jwks: jwt.PyJWKClient, nonce: str) -> dict[str, Any]:
    """The claims of ``id_token`` when it is the provider's answer to this login (OIDC Core 3.1.3.7)."""
    try:
        key = jwks.get_signing_key_from_jwt(id_token)
        claims: dict[str, Any] = jwt.decode(
            id_token, key.key, algorithms=ID_TOKEN_ALGORITHMS, audience=settings.oidc_client_id,
            issuer=settings.oidc_issuer, leeway=CLOCK_SKEW_S, options={"require": ["exp", "iat", "iss", "sub", "aud"]})
    except jwt.ExpiredSignatureError:
        raise OidcLoginFailed("the ID token has expired") from None
    except (jwt.PyJWTError, jwt.PyJWKClientError) as exc:
        raise OidcLoginFailed(f"invalid ID token ({type(exc).__name__}: {exc})"[:300]) from None
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if len(audiences) > 1 and claims.get("azp") != settings.oidc_client_id:
        raise OidcLoginFailed("the ID token names several audiences but another authorized party")
    if not secrets.compare_digest(str(claims.get("nonce") or ""), nonce):
        raise OidcLoginFailed("the ID token's nonce is not this sign-in's (replayed or forged)")
    return claims


def display_name(claims: dict[str, Any]) -> str:
    """Who signed in, for the audit row's detail: ``preferred_username``, else ``email``, else ``sub``."""
    for claim in ("preferred_username", "email", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            return "".join(c if c.isprintable() else "?" for c in value.strip())[:100]
    return ""


def session_candidates(tokens: dict[str, Any]) -> list[str]:
    """The tokens that may become the page session, in order of preference: the access token (minted for the
    archive's ``oidc_audience``: the token API calls carry) when it is a JWT, then the ID token (accepted when the
    client id is the archive's audience). The Authenticator decides which one is valid."""
    found = []
    for name in ("access_token", "id_token"):
        value = tokens.get(name)
        if isinstance(value, str) and value.count(".") == 2 and value not in found:
            found.append(value)
    return found


# -- the provider --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    authorization: str
    token: str
    end_session: str


class Provider:
    """The configured provider's endpoints and JWKS, and the code exchange. One per app; thread-safe."""

    def __init__(self, settings: Settings, *, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self._settings = settings
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._discovered: dict[str, Any] = {}
        self._discovered_at = float("-inf")
        self._failed_at = float("-inf")
        self.jwks = jwt.PyJWKClient(settings.oidc_jwks_url, cache_keys=True, lifespan=600, timeout=int(timeout_s))

    def _discovery(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if now - self._discovered_at < DISCOVERY_TTL_S or now - self._failed_at < DISCOVERY_RETRY_S:
                return self._discovered
        url = self._settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
        import httpx  # only a process that signs people in through a provider loads the HTTP client

        try:
            answer = httpx.get(url, timeout=self._timeout, follow_redirects=False)
            answer.raise_for_status()
            document = answer.json()
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("OIDC discovery at %s failed: %s", url, exc)
            with self._lock:
                self._failed_at = time.monotonic()
            return self._discovered  # the last good document (or none): the settings may be enough
        with self._lock:
            self._discovered, self._discovered_at = document, time.monotonic()
        return document

    def endpoints(self) -> Endpoints:
        """The settings' URLs, else the discovered ones (:class:`OidcLoginFailed` "unavailable" when the
        authorization or token endpoint is known from neither)."""
        settings = self._settings
        needs_discovery = not (settings.oidc_authorization_url and settings.oidc_token_url
                               and settings.oidc_end_session_url)
        document = self._discovery() if needs_discovery else {}

        def pick(configured: str, key: str) -> str:
            value = configured or document.get(key) or ""
            return value if isinstance(value, str) and value.startswith(("https://", "http://")) else ""

        found = Endpoints(pick(settings.oidc_authorization_url, "authorization_endpoint"),
                          pick(settings.oidc_token_url, "token_endpoint"),
                          pick(settings.oidc_end_session_url, "end_session_endpoint"))
        if not (found.authorization and found.token):
            raise OidcLoginFailed("the provider's endpoints are unknown (discovery failed and "
                                  "oidc_authorization_url / oidc_token_url are not set)", "unavailable")
        return found

    def exchange(self, code: str, redirect_uri: str, verifier: str) -> dict[str, Any]:
        """The token endpoint's answer for ``code`` (RFC 6749 4.1.3 with the PKCE verifier)."""
        import httpx

        settings = self._settings
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier}
        auth: httpx.BasicAuth | None = None
        if settings.oidc_client_secret:
            auth = httpx.BasicAuth(settings.oidc_client_id, settings.oidc_client_secret)  # client_secret_basic
        else:
            form["client_id"] = settings.oidc_client_id  # a public client
        try:
            answer = httpx.post(self.endpoints().token, data=form, auth=auth, timeout=self._timeout,
                                headers={"Accept": "application/json"}, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise OidcLoginFailed(f"the token endpoint could not be reached: {exc}"[:300], "unavailable") from None
        try:
            body = answer.json()
        except ValueError:
            body = {}
        if answer.status_code >= 500:
            raise OidcLoginFailed(f"the token endpoint answered {answer.status_code}", "unavailable")
        if answer.status_code != 200 or not isinstance(body, dict):
            error = body.get("error", "") if isinstance(body, dict) else ""
            raise OidcLoginFailed(f"the token endpoint refused the code: {answer.status_code} {error}"[:300])
        if not isinstance(body.get("id_token"), str):
            raise OidcLoginFailed("the token endpoint returned no ID token (is 'openid' in oidc_scopes?)")
        return body

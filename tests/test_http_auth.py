"""Identities on the HTTP API against a real `pacs serve`: the first admin credential, login and its rate
limit, API tokens (revoked, expired), disabled users, OIDC JWTs from a JWKS endpoint, CORS preflight,
security headers, request size limits and JSON errors."""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import update

from pacs.security.models import ApiToken
from tests.support.net import free_port
from tests.support.pacs_process import invoke_pacs
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

ISSUER = "https://idp.example.test/realms/province"
AUDIENCE = "filmless-pacs"
ORIGIN = "https://emr.example.test"


class _Jwks:
    """A JWKS endpoint on loopback serving one RSA public key (an identity provider's keys)."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": "test-key", "use": "sig", "alg": "RS256"})
        body = json.dumps({"keys": [jwk]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/certs"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, *, key: rsa.RSAPrivateKey | None = None, **claims: object) -> str:
        now = datetime.now(UTC)
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-42", "iat": now, "exp": now + timedelta(minutes=5),
                   "roles": ["clinician"], "facility": "HOSP-A", **claims}
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": "test-key"})


@pytest.fixture(scope="module")
def jwks() -> Iterator[_Jwks]:
    server = _Jwks()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, jwks: _Jwks) -> Iterator[EmbeddedPacs]:
    env = {"PACS_OIDC_ISSUER": ISSUER, "PACS_OIDC_AUDIENCE": AUDIENCE, "PACS_OIDC_JWKS_URL": jwks.url,
           "PACS_CORS_ORIGINS": json.dumps([ORIGIN]), "PACS_LOGIN_ATTEMPTS_PER_MINUTE": "5",
           "PACS_MAX_REQUEST_BYTES": str(1024 * 1024)}
    server = EmbeddedPacs(tmp_path_factory.mktemp("auth"), env)
    try:
        yield server
    finally:
        server.close()


def _me(pacs: EmbeddedPacs, token: str) -> httpx.Response:
    return httpx.get(f"{pacs.http_url}/api/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _login(pacs: EmbeddedPacs, username: str, password: str) -> httpx.Response:
    return httpx.post(f"{pacs.http_url}/api/auth/login", json={"username": username, "password": password},
                      timeout=30)


def _add_user(pacs: EmbeddedPacs, username: str, password: str, role: str, *extra: str) -> None:
    result = _run_with_stdin(pacs, ["user", "add", username, "--role", role, "--password-stdin", *extra], password)
    assert result.returncode == 0, result.stderr


def _run_with_stdin(pacs: EmbeddedPacs, args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    """The `pacs user` command in-process (its logic; tests/test_audit.py runs `pacs user add` as a process)."""
    return invoke_pacs(args, pacs.env, input=stdin + "\n")


def test_first_start_creates_an_admin_credential_once(pacs: EmbeddedPacs) -> None:
    path = pacs.root / "data" / "initial-admin-credential.txt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = dict(line.split(": ", 1) for line in path.read_text().splitlines())
    assert lines["username"] == "admin" and len(lines["password"]) >= 20
    log = (pacs.root / "serve.log").read_text()
    assert str(path) in log and lines["password"] not in log  # says where it is, never prints the secret
    response = _login(pacs, "admin", lines["password"])
    assert response.status_code == 200, response.text
    me = _me(pacs, response.json()["access_token"]).json()
    assert me["role"] == "admin" and me["kind"] == "session"
    pacs.restart()
    assert (pacs.root / "serve.log").read_text().count("first start: created the administrator") == 1
    assert dict(line.split(": ", 1) for line in path.read_text().splitlines()) == lines  # not rewritten


def test_login_wrong_password_and_disabled_user(pacs: EmbeddedPacs) -> None:
    _add_user(pacs, "dr.lan", "correct horse battery", "radiologist", "--facility", "HOSP-A")
    ok = _login(pacs, "dr.lan", "correct horse battery")
    assert ok.status_code == 200 and ok.json()["token_type"] == "bearer" and ok.json()["expires_in"] == 3600
    token = ok.json()["access_token"]
    assert _me(pacs, token).json() | {"capabilities": None} == {
        "subject": "dr.lan", "role": "radiologist", "kind": "session", "facility": "HOSP-A", "capabilities": None}
    wrong = _login(pacs, "dr.lan", "wrong horse battery")
    assert wrong.status_code == 401 and wrong.json()["code"] == "unauthenticated"
    assert _login(pacs, "nobody", "whatever-password").status_code == 401  # same answer for an unknown user
    assert invoke_pacs(["user", "disable", "dr.lan"], pacs.env).returncode == 0
    assert _me(pacs, token).status_code == 401  # a disabled user's session stops at once
    assert _login(pacs, "dr.lan", "correct horse battery").status_code == 401
    assert _run_with_stdin(pacs, ["user", "add", "short", "--role", "clinician", "--password-stdin"],
                           "short").returncode == 1  # passwords under 10 characters are refused


def test_changing_the_password_ends_existing_sessions(pacs: EmbeddedPacs) -> None:
    _add_user(pacs, "dr.hoa", "first long password", "clinician")
    token = _login(pacs, "dr.hoa", "first long password").json()["access_token"]
    assert _me(pacs, token).status_code == 200
    assert _run_with_stdin(pacs, ["user", "passwd", "dr.hoa", "--password-stdin"], "second long password") \
        .returncode == 0
    assert _me(pacs, token).status_code == 401
    assert _login(pacs, "dr.hoa", "second long password").status_code == 200


def test_login_attempts_are_rate_limited(pacs: EmbeddedPacs) -> None:
    _add_user(pacs, "tech.minh", "another long password", "technologist")
    codes = [_login(pacs, "tech.minh", f"bad password {i}").status_code for i in range(5)]  # 5 per minute
    assert codes == [401] * 5
    limited = _login(pacs, "tech.minh", "another long password")  # even the right password now waits
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert _login(pacs, "dr.other", "whatever-password").status_code == 401  # other users are not locked out


def test_api_tokens_revoked_expired_and_garbage(pacs: EmbeddedPacs) -> None:
    token = pacs.token("emr", name="his-gateway", facility="HOSP-A")
    assert token.startswith("pacs_") and _me(pacs, token).json()["subject"] == "token:his-gateway"
    listing = json.loads(invoke_pacs(["token", "list", "--json"], pacs.env).stdout)
    row = next(t for t in listing if t["name"] == "his-gateway")
    assert token not in json.dumps(listing)  # only the hash is stored
    assert invoke_pacs(["token", "revoke", str(row["id"])], pacs.env).returncode == 0
    assert _me(pacs, token).status_code == 401
    expiring = pacs.token("clinician", name="short-lived")
    with pacs.ctx.sessions() as session, session.begin():
        session.execute(update(ApiToken).where(ApiToken.name == "short-lived")
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert _me(pacs, expiring).status_code == 401
    for garbage in ("pacs_" + "A" * 43, "not-a-jwt", "a.b.c", "x" * 9000):
        response = _me(pacs, garbage)
        assert response.status_code == 401 and "Traceback" not in response.text
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{pacs.http_url}/api/auth/me", headers={"Authorization": "Basic YWRtaW46YWRtaW4="},
                     timeout=30).status_code == 401


def test_oidc_tokens_from_the_configured_issuer(pacs: EmbeddedPacs, jwks: _Jwks) -> None:
    me = _me(pacs, jwks.token())
    assert me.status_code == 200, me.text
    assert me.json()["role"] == "clinician" and me.json()["facility"] == "HOSP-A" and me.json()["kind"] == "oidc"
    assert _me(pacs, jwks.token(roles=["radiologist", "clinician"])).json()["role"] == "radiologist"
    assert _me(pacs, jwks.token(facility="*")).json()["facility"] == ""  # "*": every facility, said explicitly
    patient = _me(pacs, jwks.token(roles=["patient"], patient_id="P1", patient_id_issuer="1.2.3"))
    assert patient.status_code == 200 and patient.json()["facility"] == "HOSP-A"
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        "expired": jwks.token(exp=datetime.now(UTC) - timedelta(minutes=1)),
        "wrong audience": jwks.token(aud="another-app"),
        "wrong issuer": jwks.token(iss="https://evil.example.test"),
        "no known role": jwks.token(roles=["superuser"]),
        "signed by another key": jwks.token(key=other_key),
        "no facility claim": jwks.token(facility=None),
        "empty facility claim": jwks.token(facility=""),
        "patient without patient_id": jwks.token(roles=["patient"]),
        # issue 12, finding 5: a patient is one facility's patient record, never "every facility"
        "patient of every facility": jwks.token(roles=["patient"], patient_id="P1", facility="*"),
        "patient with a non-string issuer": jwks.token(roles=["patient"], patient_id="P1", patient_id_issuer=[1]),
    }
    for why, token in refused.items():
        assert _me(pacs, token).status_code == 401, why
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "roles": ["admin"],
                           "exp": datetime.now(UTC) + timedelta(minutes=5)}, key=None, algorithm="none")
    assert _me(pacs, unsigned).status_code == 401


def test_cors_preflight_only_for_configured_origins(pacs: EmbeddedPacs) -> None:
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{pacs.http_url}/dicom-web/studies", headers={"Origin": ORIGIN, **preflight},
                            timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{pacs.http_url}/dicom-web/studies",
                          headers={"Origin": "https://evil.example.test", **preflight}, timeout=30)
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.get(f"{pacs.http_url}/health", headers={"Origin": ORIGIN}, timeout=30)
    assert plain.headers["access-control-allow-origin"] == ORIGIN
    assert "x-total-count" in plain.headers.get("access-control-expose-headers", "").lower()


def test_security_headers_and_json_errors(pacs: EmbeddedPacs) -> None:
    response = httpx.get(f"{pacs.http_url}/api/auth/me", timeout=30)
    assert response.status_code == 401
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    missing = httpx.get(f"{pacs.http_url}/no/such/route", timeout=30)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    bad = httpx.post(f"{pacs.http_url}/api/auth/login", content=b"{not json", timeout=30,
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request" and "Traceback" not in bad.text


def test_oversized_requests_are_refused_before_the_body_is_read(pacs: EmbeddedPacs) -> None:
    def endless() -> Iterator[bytes]:
        chunk = b"\0" * 65536
        for _ in range(32 * 1024):  # 2 GiB if the server kept reading
            yield chunk

    started = time.monotonic()
    response = httpx.post(f"{pacs.http_url}/api/auth/login", content=endless(), timeout=60,
                          headers={"Content-Type": "application/json", "Content-Length": str(2 * 1024**3)})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert time.monotonic() - started < 30
    # Only STOW-RS takes large bodies: a 100 KB login is refused although it is under PACS_MAX_REQUEST_BYTES.
    big_login = httpx.post(f"{pacs.http_url}/api/auth/login", timeout=60,
                           json={"username": "x" * 100_000, "password": "y"})
    assert big_login.status_code == 413


@pytest.mark.parametrize(("settings", "message"), [
    ({"oidc_issuer": ISSUER, "oidc_jwks_url": "http://127.0.0.1:1/certs"}, "oidc_audience"),
    ({"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE}, "oidc_jwks_url"),
    ({"auth_secret": "too-short"}, "at least 32 bytes"),
])
def test_weak_or_incomplete_auth_settings_are_refused(settings: dict, message: str) -> None:
    from pydantic import ValidationError

    from pacs.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings(**settings)

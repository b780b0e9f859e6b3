"""A tiny but real OIDC provider on a loopback port, for the web pages' OIDC sign-in tests (tests/test_ui_oidc.py).

It speaks the authorization-code flow the way Keycloak and friends do, with the checks a provider makes:

- ``GET /.well-known/openid-configuration`` (discovery) and ``GET /certs`` (JWKS: an RSA key made at start);
- ``GET /authorize``: the registered client and redirect URI, ``response_type=code``, an S256 challenge; then it
  consents at once for :attr:`OidcProvider.user` and redirects back with a one-time code and the state
  (``deny = True``: with ``error=access_denied`` instead);
- ``POST /token``: client authentication (``client_secret_basic``), the code (once), the same redirect URI, the
  PKCE verifier against the challenge; answers an access token (``aud`` = the archive's ``oidc_audience``, the role
  and facility claims) and an ID token (``aud`` = the client id, the nonce). ``tamper`` spoils the ID token
  (``"nonce"``: another nonce; ``"signature"``: signed by another key); ``token_status`` makes it fail (503);
- ``GET /logout`` (end session): back to ``post_logout_redirect_uri``.

:attr:`OidcProvider.events` lists what happened ("token refused: …", "logout"), for the tests' assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.net import free_port

KID = "test-oidc-key"


class OidcProvider:
    def __init__(self, *, client_id: str, client_secret: str, audience: str) -> None:
        self.client_id, self.client_secret, self.audience = client_id, client_secret, audience
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.jwks_url = self.issuer + "/certs"
        self.redirect_uris: set[str] = set()
        self.user: dict[str, Any] = {}
        self.deny = False
        self.tamper = ""
        self.token_status = 200
        self.events: list[str] = []
        self._codes: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- documents -------------------------------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token", "jwks_uri": self.jwks_url,
                "end_session_endpoint": self.issuer + "/logout", "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"], "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"]}

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": KID, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def _sign(self, claims: dict[str, Any], key: rsa.RSAPrivateKey | None = None) -> str:
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": KID})

    def _tokens(self, grant: dict[str, str]) -> dict[str, Any]:
        now = datetime.now(UTC)
        base = {"iss": self.issuer, "iat": now, "exp": now + timedelta(minutes=10), **self.user}
        access = self._sign({**base, "aud": self.audience, "azp": self.client_id, "typ": "Bearer"})
        nonce = "not-the-nonce" if self.tamper == "nonce" else grant["nonce"]
        id_claims = {**base, "aud": self.client_id, "nonce": nonce, "typ": "ID"}
        id_token = self._sign(id_claims, self.other_key if self.tamper == "signature" else None)
        return {"access_token": access, "id_token": id_token, "token_type": "Bearer", "expires_in": 600}

    # -- the flow --------------------------------------------------------------------------------------------------

    def _authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], dict[str, Any]]:
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id or redirect_uri not in self.redirect_uris:
            return 400, {}, {"error": "invalid_request", "error_description": "unknown client or redirect_uri"}
        back: dict[str, str] = {"state": query.get("state", "")}
        if self.deny:
            back["error"] = "access_denied"
        elif (query.get("response_type") != "code" or query.get("code_challenge_method") != "S256"
              or not query.get("code_challenge") or "openid" not in query.get("scope", "").split()):
            back["error"] = "invalid_request"
        else:
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = {"redirect_uri": redirect_uri, "challenge": query["code_challenge"],
                                     "nonce": query.get("nonce", "")}
            back["code"] = code
        return 302, {"Location": f"{redirect_uri}?{urlencode(back)}"}, {}

    def _token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        def refused(status: int, error: str, why: str) -> tuple[int, dict[str, Any]]:
            self.events.append(f"token refused: {why}")
            return status, {"error": error, "error_description": why}

        if self.token_status != 200:
            return refused(self.token_status, "temporarily_unavailable", "the provider is down")
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if not secrets.compare_digest(authorization, expected):
            return refused(401, "invalid_client", "client authentication failed")
        with self._lock:
            grant = self._codes.pop(form.get("code", ""), None)
        if form.get("grant_type") != "authorization_code" or grant is None:
            return refused(400, "invalid_grant", "unknown or used code")
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return refused(400, "invalid_grant", "redirect_uri differs")
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or not secrets.compare_digest(challenge, grant["challenge"]):
            return refused(400, "invalid_grant", "PKCE verification failed")
        self.events.append("token issued")
        return 200, self._tokens(grant)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if parts.path == "/.well-known/openid-configuration":
                    self._send(200, provider.discovery())
                elif parts.path == "/certs":
                    self._send(200, provider.jwks())
                elif parts.path == "/authorize":
                    status, headers, body = provider._authorize(query)
                    self._send(status, body, headers)
                elif parts.path == "/logout":
                    provider.events.append("logout")
                    target = query.get("post_logout_redirect_uri", "")
                    if query.get("client_id") == provider.client_id and target:
                        self._send(302, {}, {"Location": target})
                    else:
                        self._send(400, {"error": "invalid_request"})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                form = {k: v[0] for k, v in parse_qs(raw).items()}
                if urlsplit(self.path).path == "/token":
                    status, body = provider._token(form, self.headers.get("Authorization", ""))
                    self._send(status, body)
                else:
                    self._send(404, {"error": "not found"})

            def log_message(self, *args: object) -> None:
                pass

        return Handler

"""Authentication and authorization for HTTP routes: one dependency, ``require(capability)``.

Every route that shows or changes patient data declares ``principal: Principal = require(...)``.
The dependency reads the bearer token, asks ``pacs.security`` who it is and whether the role may
do this, and audits what it refuses (401 and 403). What a route then reads it audits itself with
:func:`audit_access`, naming the patient and study.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from pacs import audit
from pacs.context import AppContext
from pacs.errors import PacsError
from pacs.security.access import Forbidden, authorize
from pacs.security.authenticate import AuthenticationError, Authenticator
from pacs.security.principal import Principal
from pacs.security.roles import Capability

log = logging.getLogger("viewer_api")

# Reads a viewer makes by the hundred per study: audited once per principal, study and window.
COALESCED_READS = frozenset({"dicomweb.frames", "dicomweb.rendered", "dicomweb.thumbnail", "dicomweb.bulkdata"})
# Reads of the DICOMweb path, audited on the read path's connections in one round trip (pacs.audit.trail.record,
# pipelined=True): the row is committed, as durably as any other, before the answer goes out.
FAST_AUDITED_READS = COALESCED_READS | {"dicomweb.search", "dicomweb.count", "dicomweb.retrieve",
                                        "dicomweb.metadata", "wado-uri.retrieve"}


def client_address(request: Request) -> str:
    """'host:port' of the client; behind a proxy in PACS_TRUSTED_PROXIES, the one it names (viewer_api.http_server)."""
    client = request.client
    return f"{client.host}:{client.port}" if client else ""


def context(request: Request) -> AppContext:
    return request.app.state.ctx


def authenticator(request: Request) -> Authenticator:
    return request.app.state.authenticator


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthenticationError("missing bearer token (Authorization: Bearer …)")
    return value.strip()


# Declares the bearer scheme in the OpenAPI document; each operation lists the capability it
# needs as the scheme's scope, which is what tests/test_route_matrix.py reads.
BEARER_SCHEME = HTTPBearer(auto_error=False, scheme_name="bearer",
                           description="An API token (`pacs token create`), a session token from "
                           "POST /api/auth/login, or a JWT of the configured OIDC issuer")


# Each dependency :func:`require` made, and the capability it checks (read by viewer_api.dicomweb.fastpath).
REQUIREMENTS: dict[Callable[..., Any], Capability | None] = {}


def require(capability: Capability | None) -> Any:
    """A FastAPI dependency: the authenticated :class:`Principal` allowed to ``capability``
    (``None``: any authenticated principal).

    Raises AuthenticationError (401) or Forbidden (403); both are audited.
    """

    async def dependency(request: Request,
                         _credentials: HTTPAuthorizationCredentials | None = Depends(BEARER_SCHEME),  # noqa: B008
                         ) -> Principal:
        return await run_in_threadpool(authenticate_request, request, capability)

    REQUIREMENTS[dependency] = capability
    return Security(dependency, scopes=[capability.value] if capability is not None else [])


def authenticate_request(request: Request, capability: Capability | None, *, cached: bool = False) -> Principal:
    """What :func:`require`'s dependency does (call from a worker thread): the request's bearer token checked,
    the principal allowed to ``capability``, refusals audited; the principal is kept in ``request.state``.
    ``cached``: an API token verified less than a second ago is not looked up again (the DICOMweb reads only,
    :mod:`pacs.security.token_cache`)."""
    address = client_address(request)
    try:
        token = bearer_token(request)
        principal = authenticator(request).authenticate(token, address, cached=cached)
    except AuthenticationError as exc:
        _audit_denied(request, "", "", "auth.denied", str(exc), address)
        raise
    try:
        if capability is not None:
            authorize(principal, capability)
    except Forbidden as exc:
        _audit_denied(request, principal.subject, principal.role.value, "access.denied", str(exc), address)
        raise
    request.state.principal = principal
    return principal


def _audit_denied(request: Request, actor: str, role: str, action: str, reason: str, address: str) -> None:
    """Audit a refused request; a burst of refusals from one address for one path shares a row per
    10 s, so that unauthenticated traffic cannot flood the trail (and its write lock)."""
    host = request.client.host if request.client else ""
    coalescer: audit.ReadCoalescer = request.app.state.denial_coalescer
    if not coalescer.should_record(f"{host}|{actor}", action, request.url.path):
        return
    try:
        audit.record(context(request).sessions, action=action, actor=actor, role=role, outcome="failure",
                     source_address=address, detail=f"{request.method} {request.url.path} {reason}")
    except Exception as exc:  # auditing a refusal must not turn it into a 500
        log.error("audit write failed: %s", exc)


def audit_access(request: Request, principal: Principal, action: str, *, study_instance_uid: str = "",
                 patient_id: str = "", outcome: str = "success", detail: str = "") -> None:
    """Audit one read or change of patient data by ``principal`` (call from a worker thread).

    Successful high-volume reads (frames, rendered images, thumbnails, bulk data) of one study by
    one principal are coalesced: one row per ``PACS_AUDIT_COALESCE_S`` window (pacs.audit.ReadCoalescer).
    """
    coalescer: audit.ReadCoalescer | None = None
    # the coalescing key: the credential (a token's id, else the subject) and the client's address
    host = request.client.host if request.client else ""
    who = f"{principal.subject}#{principal.token_id or ''}@{host}"
    if outcome == "success" and action in COALESCED_READS:
        coalescer = request.app.state.read_coalescer
        if not coalescer.should_record(who, action, study_instance_uid):
            return
        window = context(request).settings.audit_coalesce_s
        detail = f"{detail} (repeats within {window:g} s covered by this row)".strip()
    query = f"?{request.url.query}" if request.url.query else ""
    try:
        audit.record(context(request).sessions, pipelined=action in FAST_AUDITED_READS, action=action,
                     actor=principal.subject, role=principal.role.value, outcome=outcome,
                     source_address=principal.source_address or client_address(request),
                     patient_id=patient_id, study_instance_uid=study_instance_uid,
                     detail=(f"{request.method} {request.url.path}{query} {detail}").strip())
    except Exception:
        if coalescer is not None:
            coalescer.forget(who, action, study_instance_uid)
        raise


@contextmanager
def audited(request: Request, principal: Principal, action: str, study: str = "",
            report_id: int | None = None) -> Iterator[None]:
    """Audit a refusal from the core (404, 409, 400, 403) before it becomes the route's JSON error."""
    try:
        yield
    except PacsError as exc:
        what = f"report {report_id}: " if report_id is not None else ""
        audit_access(request, principal, action, outcome="failure", study_instance_uid=study,
                     detail=f"{what}{type(exc).__name__}: {str(exc)[:300]}")
        raise

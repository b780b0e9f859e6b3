"""FastAPI application factory: DICOMweb, FHIR, auth, audit and the OHIF viewer on one app."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy import text

import pacs
from pacs import audit
from pacs.context import AppContext
from pacs.ingest import Ingestor
from pacs.query.engine import QueryEngine
from pacs.runtime import make_ingestor
from pacs.security.authenticate import Authenticator
from pacs.security.login_guard import LoginGuard
from pacs.security.redaction import install_log_redaction
from viewer_api import errors
from viewer_api.hardening import RequestLimits, SecurityHeaders, TrustedHosts, trusted_host_names

EXPOSED_HEADERS = ["X-Total-Count", "Content-Location", "Warning"]


def create_app(ctx: AppContext, ingestor: Ingestor | None = None) -> FastAPI:
    """The HTTP API of one process. ``ingestor`` is the process's ingest service (STOW-RS); without
    one (a read-only API process) STOW-RS builds its own on the same context."""
    from viewer_api import (
        audit_routes,
        auth_routes,
        consult_routes,
        correction_routes,
        deletion_routes,
        fhir,
        ohif,
        orders,
        reconciliation,
        rejection_routes,
        reports,
        share_routes,
        slip_routes,
        transfer_routes,
    )
    from viewer_api.dicomweb import qido, stow, wado, wado_uri

    settings = ctx.settings
    install_log_redaction()  # the access log prints request URLs: no ?access_token= values in it
    app = FastAPI(title="Filmless PACS", version=pacs.__version__,
                  description="DICOMweb (QIDO-RS, WADO-RS, STOW-RS, WADO-URI), FHIR R4 and the audit trail. "
                  "Every route but /health and the viewer's static files needs `Authorization: Bearer <token>`.")
    app.state.ctx = ctx
    app.state.ingestor = ingestor or make_ingestor(ctx)
    app.state.authenticator = Authenticator(settings, ctx.sessions)
    app.state.query_engine = QueryEngine(ctx.read_sessions)
    # failed logins per user name and address / per user name / per client address, reserved before the
    # password is hashed, and a cap on concurrent argon2 checks (auth_routes.login)
    app.state.login_guard = LoginGuard(settings.login_attempts_per_minute,
                                       settings.login_max_concurrent_verifications)
    # a burst of refusals from one address for one path shares an audit row per 10 s (0: a row per refusal)
    app.state.denial_coalescer = audit.ReadCoalescer(10.0 if settings.audit_coalesce_s > 0 else 0.0)
    app.state.read_coalescer = audit.ReadCoalescer(settings.audit_coalesce_s)
    errors.install(app)

    @app.get("/health", tags=["health"], summary="Liveness and dependency health (no patient data)")
    def health() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            with ctx.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["index"] = "ok"
        except Exception as exc:
            checks["index"] = f"unavailable: {type(exc).__name__}"
        try:
            ctx.store.ping()
            checks["storage"] = "ok"
        except Exception as exc:
            checks["storage"] = f"unavailable: {type(exc).__name__}"
        healthy = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", "checks": checks},
                            status_code=200 if healthy else 503)

    # Starlette tries routes in order: the viewers' busiest paths (DICOMweb) first; OHIF's catch-all last.
    for module in (qido, wado, wado_uri, stow, fhir, auth_routes, audit_routes, orders, reports, reconciliation,
                   slip_routes, consult_routes, share_routes, correction_routes, rejection_routes, deletion_routes,
                   transfer_routes, ohif):
        app.include_router(module.router)

    # Outermost first: CORS answers preflights before anything else; limits before routing.
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestLimits, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=EXPOSED_HEADERS, max_age=600)
    # outermost: a request for another Host is refused before anything builds a URL from it
    app.add_middleware(TrustedHosts, allowed=trusted_host_names(settings.trusted_hosts, settings.public_url,
                                                                settings.http_host))
    return app

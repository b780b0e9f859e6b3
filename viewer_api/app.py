"""FastAPI application factory: DICOMweb, FHIR, auth, audit and the OHIF viewer on one app."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

import pacs
from pacs import audit, metrics
from pacs.context import AppContext
from pacs.ingest import Ingestor
from pacs.logging_setup import current_role
from pacs.query.engine import QueryEngine
from pacs.query.sessions import read_path_sessions
from pacs.runtime import make_ingestor
from pacs.security.authenticate import Authenticator
from pacs.security.login_guard import LoginGuard
from pacs.security.redaction import install_log_redaction
from viewer_api import errors
from viewer_api.compression import GzipText
from viewer_api.hardening import RequestLimits, SecurityHeaders, TrustedHosts, trusted_host_names

EXPOSED_HEADERS = ["X-Total-Count", "Content-Location", "Warning"]
DOCS_STATIC = "/docs/static"  # Swagger UI and ReDoc files (the fastapi-offline package)


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
        ops_routes,
        orders,
        reconciliation,
        rejection_routes,
        reports,
        share_routes,
        slip_routes,
        transfer_routes,
    )
    from viewer_api.dicomweb import qido, stow, wado, wado_uri
    from viewer_api.dicomweb.fastpath import DicomwebReads
    from viewer_api.ui import router as ui_router

    settings = ctx.settings
    install_log_redaction()  # the access log prints request URLs: no ?access_token= values in it
    # /docs and /redoc load Swagger UI / ReDoc from this server (/docs/static), not from a CDN: they work on a
    # hospital network without internet (and under /docs the hardening leaves their inline scripts alone)
    app = FastAPIOffline(
        static_url=DOCS_STATIC, title="Filmless PACS", version=pacs.__version__,
        # no OpenTelemetry here (pacs.metrics is the process's metrics): FastAPI's own would look for a provider
        # on every request
        telemetry={"tracing": False, "metrics": False, "logs": False},
        description="DICOMweb (QIDO-RS, WADO-RS, STOW-RS, WADO-URI), FHIR R4 and the audit trail. "
        "Every route but /health, /metrics (from allowed addresses) and the viewer's static files needs "
        "`Authorization: Bearer <token>`.")
    app.state.ctx = ctx
    app.state.ingestor = ingestor or make_ingestor(ctx)
    # the bearer token is looked up on every request: one statement on the read path's connections (autocommit)
    app.state.authenticator = Authenticator(settings, read_path_sessions(ctx.sessions))
    app.state.query_engine = QueryEngine(ctx.read_sessions)
    # failed logins per user name and address / per user name / per client address, reserved before the
    # password is hashed, and a cap on concurrent argon2 checks (auth_routes.login)
    app.state.login_guard = LoginGuard(settings.login_attempts_per_minute,
                                       settings.login_max_concurrent_verifications)
    # a burst of refusals from one address for one path shares an audit row per 10 s (0: a row per refusal)
    app.state.denial_coalescer = audit.ReadCoalescer(10.0 if settings.audit_coalesce_s > 0 else 0.0)
    app.state.read_coalescer = audit.ReadCoalescer(settings.audit_coalesce_s)
    errors.install(app)
    ui_router.install(app)  # HTML error pages and sign-in redirects for the web pages (viewer_api.ui)

    # /health/live, /health/ready (and /health), /metrics: no patient data (viewer_api.ops_routes)
    app.state.metrics_allow = metrics.parse_allow_list(settings.metrics_allow)
    metrics.install(ctx, current_role())

    # Starlette tries routes in order: the viewers' busiest paths (DICOMweb) first; OHIF's catch-all last.
    for module in (ops_routes, qido, wado, wado_uri, stow, fhir, auth_routes, audit_routes, orders, reports,
                   reconciliation, slip_routes, consult_routes, share_routes, correction_routes, rejection_routes,
                   deletion_routes, transfer_routes, ui_router, ohif):
        app.include_router(module.router)

    # Outermost first: CORS answers preflights before anything else; limits before routing.
    # the DICOMweb reads (QIDO-RS, WADO-RS GETs) answered without FastAPI's per-request machinery, with the same
    # checks, audit and error handlers (viewer_api.dicomweb.fastpath)
    app.add_middleware(DicomwebReads, routes=[*qido.router.routes, *wado.router.routes])
    app.add_middleware(GzipText)  # gzip for JSON/text answers and raw frames, fast path's too (viewer_api.compression)
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

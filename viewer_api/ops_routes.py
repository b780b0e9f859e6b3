"""Operations endpoints: ``/health/live``, ``/health/ready`` (and ``/health``, its older name), ``/metrics``.

None of them shows patient data. The health probes need no token (load balancers and orchestrators call them).
``/metrics`` answers peers in ``PACS_METRICS_ALLOW`` (the scraper's network; loopback by default) and anyone
else with a bearer token carrying ``ops.metrics``: the figures name no patient, but they tell how busy the
archive and its queues are, which is nobody else's business.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pacs import health, metrics
from pacs.security.access import Forbidden, authorize
from pacs.security.authenticate import AuthenticationError
from pacs.security.roles import Capability
from viewer_api.errors import error_response
from viewer_api.security import authenticator, bearer_token, client_address, context

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="Liveness: the process answers (checks nothing else)")
def live() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _ready(request: Request) -> JSONResponse:
    ok, checks = health.readiness(context(request))
    if ok:
        return JSONResponse({"status": "ok", "checks": checks})
    failed = "; ".join(f"{name}: {state}" for name, state in checks.items() if state != "ok")
    # the error shape every route answers ({"code", "message"}), with the checks
    return JSONResponse({"status": "degraded", "code": "not_ready", "message": failed, "checks": checks},
                        status_code=503)


@router.get("/health/ready", summary="Readiness: index, object store and (scaled mode) broker reachable; "
            "503 names the failed check (no patient data)")
def ready(request: Request) -> JSONResponse:
    return _ready(request)


@router.get("/health", summary="Readiness (the older name of /health/ready)")
def health_alias(request: Request) -> JSONResponse:
    return _ready(request)


@router.get("/metrics", summary="Prometheus metrics (no patient data): PACS_METRICS_ALLOW peers, or a token "
            "with ops.metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    host = request.client.host if request.client else ""
    if not metrics.peer_allowed(host, request.app.state.metrics_allow):
        try:
            principal = await run_in_threadpool(authenticator(request).authenticate, bearer_token(request),
                                                client_address(request))
            authorize(principal, Capability.OPS_METRICS)
        except AuthenticationError as exc:
            return error_response(401, "unauthenticated", str(exc)[:200], {"WWW-Authenticate": "Bearer"})
        except Forbidden as exc:
            return error_response(403, "forbidden", str(exc)[:200])
        except Exception:  # a token is checked against the index: down, no answer (allowed addresses need none)
            metrics.index_error("http")
            return error_response(503, "index_unavailable", "the token cannot be checked now; scrape from an "
                                  "address in PACS_METRICS_ALLOW")
    body, content_type = await run_in_threadpool(metrics.exposition)
    return Response(body, media_type=content_type)

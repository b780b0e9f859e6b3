"""FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

import pacs
from pacs.context import AppContext


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(title="Filmless PACS", version=pacs.__version__)

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

    return app

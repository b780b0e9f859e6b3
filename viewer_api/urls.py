"""Absolute URLs this server hands out (Retrieve URL, Bulk Data URIs, FHIR links)."""

from __future__ import annotations

from fastapi import Request


def public_base(request: Request) -> str:
    """``PACS_PUBLIC_URL`` when set (behind a proxy, or for clients that send ``Host`` without the port),
    else the request's own base URL; never with a trailing slash."""
    configured = request.app.state.ctx.settings.public_url
    return (configured or str(request.base_url)).rstrip("/")

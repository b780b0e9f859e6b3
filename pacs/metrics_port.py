"""The metrics port of the processes without an HTTP API (`pacs scp`, `pacs worker`, `pacs hl7 listen`).

``PACS_METRICS_PORT`` (0: off) on ``PACS_METRICS_HOST`` (loopback by default) serves ``GET /metrics`` in the
Prometheus text format, to peers in ``PACS_METRICS_ALLOW`` only (others get 403): the same allow list as the
API's ``/metrics``, which also takes an ops token — this port has no accounts, so addresses are all it checks.
A small threaded WSGI server from the standard library, as prometheus-client's own ``start_http_server`` is,
plus that check.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from pacs.metrics import parse_allow_list, peer_allowed
from pacs.settings import Settings

log = logging.getLogger("pacs.metrics")

StartResponse = Callable[..., Any]


MAX_SCRAPES = 8  # connections served at once; more are closed at once (a scraper needs one)


class _QuietHandler(WSGIRequestHandler):
    timeout = 5  # a connection that sends no request in 5 s is closed (no thread held by a silent peer)

    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


class _BoundedWSGIServer(ThreadingWSGIServer):
    """At most :data:`MAX_SCRAPES` connection threads: this port lives in the ingest process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _BoundedWSGIServer6(_BoundedWSGIServer):
    address_family = socket.AF_INET6


def allow_list_app(app: Callable[..., Iterable[bytes]], allowed: list[Any]) -> Callable[..., Iterable[bytes]]:
    """``app`` for peers in ``allowed`` only; others get 403 (the peer is the TCP peer: no forwarded header)."""

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not peer_allowed(str(environ.get("REMOTE_ADDR", "")), allowed):
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"metrics: this address is not in PACS_METRICS_ALLOW\n"]
        return app(environ, start_response)

    return guarded


def start_metrics_port(settings: Settings) -> WSGIServer | None:
    """Serve ``/metrics`` on ``PACS_METRICS_HOST:PACS_METRICS_PORT`` in a daemon thread; None when the port is 0.
    An address in use is reported and the process runs on without it (metrics must not stop the archive)."""
    if not settings.metrics_port:
        return None
    host = settings.metrics_host
    server_class: type[ThreadingWSGIServer] = _BoundedWSGIServer6 if ":" in host else _BoundedWSGIServer
    app = allow_list_app(make_wsgi_app(REGISTRY), parse_allow_list(settings.metrics_allow))
    try:
        server = make_server(host, settings.metrics_port, app, server_class, handler_class=_QuietHandler)
    except OSError as exc:
        log.error("metrics port not started on %s:%s: %s", host, settings.metrics_port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True).start()
    log.info("metrics on http://%s:%s/metrics", host, server.server_port)
    return server

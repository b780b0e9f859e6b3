"""Runs the HTTP API on uvicorn with connection limits that hold against slow or hoarding clients.

uvicorn checks ``limit_concurrency`` only once a request's headers are in, and has no timeout for
them: sockets that send a header byte now and then, or nothing at all, each hold a connection for
as long as they like, and enough of them make every real client get 503 (issue 12, finding 11).
:class:`GuardedHttpToolsProtocol` adds, in the server itself:

- a header timeout (``PACS_HTTP_HEADER_TIMEOUT_S``): a connection must deliver a request's whole
  headers within this time after it connects, and between keep-alive requests within this time
  after the next request's first byte (a keep-alive connection that sends nothing is closed by
  uvicorn's own keep-alive timeout). Past it the connection gets 408 (or, when it has sent nothing,
  is just closed). The time to receive a body is bounded separately (``PACS_HTTP_REQUEST_TIMEOUT_S``
  in STOW-RS).
- a per-client connection cap (``PACS_HTTP_MAX_CONNECTIONS_PER_CLIENT``, by the TCP peer address):
  a connection over it is answered 503 and closed before anything is parsed, so one address cannot
  take the ``PACS_HTTP_MAX_CONNECTIONS`` that everyone shares.
- the real client behind a reverse proxy: from a peer in ``PACS_TRUSTED_PROXIES`` (and only from one),
  each request's ``X-Forwarded-For`` (else ``Forwarded``) names the client and ``X-Forwarded-Proto`` the
  scheme (``pacs.trusted_proxies``); the request's ``client`` (what throttles, audit rows and logs see)
  becomes that client, and the proxy's connection counts against that client's cap from the request's
  headers on (503 and closed when over it). uvicorn's own proxy-header handling is off: it would trust
  ``X-Forwarded-For`` from loopback by default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pacs.settings import Settings
from pacs.trusted_proxies import TrustedProxies, trusted_proxies

log = logging.getLogger("viewer_api.http")

KEEP_ALIVE_S = 15


def _plain_response(status: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


_TOO_MANY = _plain_response("503 Service Unavailable", "too many connections from this client")
_TIMEOUT = _plain_response("408 Request Timeout", "request headers not received in time")


async def _too_many_from_client(scope: Any, receive: Any, send: Any) -> None:
    """The answer to a proxied request whose client is over its connection cap (then the connection closes)."""
    body = b"too many connections from this client"
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a per-client connection cap.

    Subclassed per server by :func:`protocol_class`, which sets the class attributes; protocol
    instances of one server all run on its event loop thread, so the shared counter needs no lock.
    """

    header_timeout_s: ClassVar[float] = 10.0
    max_per_client: ClassVar[int] = 64
    open_by_client: ClassVar[Counter[str]]
    refusal_log: ClassVar[dict[str, float]]
    proxies: ClassVar[TrustedProxies] = TrustedProxies()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer = ""  # the TCP peer
        self._proxied = False  # the peer is a trusted proxy: the client is named by each request
        self._counted_as: str | None = None  # the client this connection counts against
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_done = 0  # requests whose headers are complete
        self._responses_done = 0
        self._bytes_waiting = False  # bytes of a request whose headers are not complete yet

    # -- connection ----------------------------------------------------------------------------------

    # override: uvicorn's protocols narrow asyncio.Protocol's BaseTransport to a Transport too (and ignore it)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer = self.client[0] if self.client else ""
        self._proxied = self.proxies.is_trusted(self._peer)
        if not self._proxied and not self._count(self._peer):
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._uncount()
        super().connection_lost(exc)

    def _count(self, client: str) -> bool:
        """Count this connection against ``client`` (False, logged: it is at its cap)."""
        cls = type(self)
        if cls.open_by_client[client] >= cls.max_per_client:
            self._log_refusal(client)
            return False
        cls.open_by_client[client] += 1
        self._counted_as = client
        return True

    def _uncount(self) -> None:
        client, self._counted_as = self._counted_as, None
        if client is not None:
            cls = type(self)
            cls.open_by_client[client] -= 1
            if cls.open_by_client[client] <= 0:
                del cls.open_by_client[client]

    def _log_refusal(self, client: str) -> None:
        """At most one line a minute per address (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self.refusal_log.get(client, -1e9) >= 60.0:
            if len(self.refusal_log) > 10_000:
                self.refusal_log.clear()
            self.refusal_log[client] = now
            via = f" (via proxy {self._peer})" if client != self._peer else ""
            log.warning("HTTP connection from %s%s refused: %d open from that address (the limit)",
                        client, via, self.open_by_client[client])

    # -- the client behind a trusted proxy -----------------------------------------------------------

    def _forwarded_client(self) -> bool:
        """A trusted proxy's request: its client and scheme into the ASGI scope, and the connection
        counted against that client. False: the client is at its cap."""
        headers = self.headers or []
        client = self.proxies.client_address(self._peer, headers)
        self.scope["client"] = (client, self.client[1] if client == self._peer and self.client else 0)
        if (proto := self.proxies.forwarded_proto(self._peer, headers)) is not None:
            self.scope["scheme"] = proto
        if client == self._counted_as:
            return True
        self._uncount()
        return self._count(client)

    # -- header timeout ----------------------------------------------------------------------------

    def _between_requests(self) -> bool:
        """No request of this connection is in progress (whose headers are in and not yet answered)."""
        return self._headers_done == self._responses_done

    def data_received(self, data: bytes) -> None:
        if self._between_requests() and data:
            self._bytes_waiting = True
            if self._header_timer is None:  # a keep-alive connection starts its next request
                self._arm_header_timer()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._headers_done += 1
        self._bytes_waiting = False
        self._cancel_header_timer()
        if self._proxied and not self._forwarded_client():
            app, self.app = self.app, _too_many_from_client  # answered 503, then the connection closes
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._responses_done += 1
        super().on_response_complete()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._between_requests() or self.transport.is_closing():
            return
        if self._bytes_waiting:
            self.transport.write(_TIMEOUT)
        self.transport.close()


def protocol_class(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for one server: its limits and its own count of connections per client."""
    return type("PacsHttpProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout_s": settings.http_header_timeout_s,
        "max_per_client": settings.http_max_connections_per_client,
        "open_by_client": Counter(),
        "refusal_log": {},
        "proxies": trusted_proxies(tuple(settings.trusted_proxies)),
    })


def run(app: Any, settings: Settings) -> None:
    """Serve ``app`` on ``PACS_HTTP_HOST:PACS_HTTP_PORT`` until interrupted (blocks)."""
    import uvicorn

    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                http=protocol_class(settings), ws="none", timeout_keep_alive=KEEP_ALIVE_S,
                proxy_headers=False,  # the protocol class applies PACS_TRUSTED_PROXIES itself
                limit_concurrency=settings.http_max_connections,
                log_config=None)  # uvicorn's loggers go to the process's handler (PACS_LOG_FORMAT: text or json)

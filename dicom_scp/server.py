"""Builds the pynetdicom AE from settings and the services in dicom_scp.services, and starts it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_scp import handlers, policy
from dicom_scp.services import SERVICES
from dicom_scp.tls import server_ssl_context
from pacs.context import AppContext
from pacs.ingest import Ingestor

log = logging.getLogger("dicom_scp")


def build_ae(ctx: AppContext) -> AE:
    s = ctx.settings
    ae = AE(ae_title=s.ae_title)
    ae.maximum_pdu_size = s.max_pdu_size
    ae.maximum_associations = s.max_associations
    ae.network_timeout = s.network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = s.network_timeout_s
    for service in SERVICES:
        for abstract_syntax, transfer_syntaxes in service.contexts(ctx):
            ae.add_supported_context(abstract_syntax, transfer_syntaxes)
    return ae


@dataclass
class Listeners:
    """The plain DICOM listener and, when a certificate is configured, the TLS one (same services)."""

    plain: ThreadedAssociationServer
    tls: ThreadedAssociationServer | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.plain.server_address[:2]

    def shutdown(self) -> None:
        for server in (self.tls, self.plain):
            if server is not None:
                server.shutdown()


def start_scp(ctx: AppContext, ingestor: Ingestor) -> Listeners:
    """Start listening in background threads; call ``shutdown()`` on the result to stop."""
    ae = build_ae(ctx)
    evt_handlers = [
        (evt.EVT_CONN_OPEN, handlers.on_conn_open),
        (evt.EVT_REQUESTED, policy.on_requested, [ctx]),  # association policy: may reject before negotiation
        (evt.EVT_ACCEPTED, handlers.on_accepted),
        (evt.EVT_RELEASED, handlers.on_released),
        (evt.EVT_ABORTED, handlers.on_aborted),
    ]
    evt_handlers += service_bindings(ctx, ingestor)
    address = (ctx.settings.dicom_host, ctx.settings.dicom_port)
    listeners = Listeners(ae.start_server(address, block=False, evt_handlers=evt_handlers))
    log.info("DICOM SCP %s listening on %s:%s", ctx.settings.ae_title, *listeners.server_address)
    ssl_context = server_ssl_context(ctx.settings)
    if ssl_context is not None:
        tls_address = (ctx.settings.dicom_host, ctx.settings.dicom_tls_port)
        listeners.tls = ae.start_server(tls_address, block=False, evt_handlers=evt_handlers, ssl_context=ssl_context)
        log.info("DICOM TLS listening on %s:%s (client certificate %s)", *listeners.tls.server_address[:2],
                 "required" if ctx.settings.tls_require_client_cert else "optional")
    return listeners


Route = tuple[set[str], Callable[..., Any], list[Any]]


def service_bindings(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    """Every service's event bindings. pynetdicom keeps one handler per intervention event, so
    an intervention event bound by several services (C-FIND: Query/Retrieve and the worklist) is
    bound once, to a dispatcher that picks the service by the request's presentation context."""
    bindings: list[tuple] = []
    routes: dict[evt.InterventionEvent, list[Route]] = {}
    for service in SERVICES:
        syntaxes = {str(abstract_syntax) for abstract_syntax, _ in service.contexts(ctx)}
        for binding in service.handlers(ctx, ingestor):
            event, handler, args = binding[0], binding[1], list(binding[2]) if len(binding) > 2 else []
            if event.is_intervention:
                routes.setdefault(event, []).append((syntaxes, handler, args))
            else:
                bindings.append((event, handler, args))
    for event, event_routes in routes.items():
        if len(event_routes) == 1:
            bindings.append((event, event_routes[0][1], event_routes[0][2]))
        else:
            bindings.append((event, _dispatch, [event_routes]))
    return bindings


def _dispatch(event: evt.Event, routes: list[Route]) -> Any:
    """Call the handler of the service that offers the request's abstract syntax (else the last bound)."""
    try:
        abstract_syntax = str(event.context.abstract_syntax)
    except AttributeError:  # an intervention event without a presentation context
        abstract_syntax = ""
    for syntaxes, handler, args in routes:
        if abstract_syntax in syntaxes:
            return handler(event, *args)
    _, handler, args = routes[-1]
    return handler(event, *args)

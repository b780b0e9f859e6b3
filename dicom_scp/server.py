"""Builds the pynetdicom AE from settings and the services in dicom_scp.services, and starts it."""

from __future__ import annotations

import logging

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_scp import handlers
from dicom_scp.services import SERVICES
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


def start_scp(ctx: AppContext, ingestor: Ingestor) -> ThreadedAssociationServer:
    """Start listening in background threads; call ``shutdown()`` on the result to stop."""
    ae = build_ae(ctx)
    evt_handlers = [
        (evt.EVT_CONN_OPEN, handlers.on_conn_open),
        (evt.EVT_ACCEPTED, handlers.on_accepted),
        (evt.EVT_RELEASED, handlers.on_released),
        (evt.EVT_ABORTED, handlers.on_aborted),
    ]
    for service in SERVICES:
        evt_handlers += service.handlers(ctx, ingestor)
    address = (ctx.settings.dicom_host, ctx.settings.dicom_port)
    server = ae.start_server(address, block=False, evt_handlers=evt_handlers)
    log.info("DICOM SCP %s listening on %s:%s", ctx.settings.ae_title, *server.server_address[:2])
    return server

"""Builds the pynetdicom AE from settings and starts it (Verification + Storage SCP)."""

from __future__ import annotations

import logging

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_scp import handlers
from pacs.context import AppContext
from pacs.ingest import Ingestor

log = logging.getLogger("dicom_scp")

# Every transfer syntax pydicom knows: objects are stored as received, so none needs a codec here.
TRANSFER_SYNTAXES = [str(ts) for ts in AllTransferSyntaxes]


def build_ae(ctx: AppContext) -> AE:
    s = ctx.settings
    ae = AE(ae_title=s.ae_title)
    ae.maximum_pdu_size = s.max_pdu_size
    ae.maximum_associations = s.max_associations
    ae.network_timeout = s.network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = s.network_timeout_s
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def start_scp(ctx: AppContext, ingestor: Ingestor) -> ThreadedAssociationServer:
    """Start listening in background threads; call ``shutdown()`` on the result to stop."""
    ae = build_ae(ctx)
    evt_handlers = [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [ingestor, ctx]),
        (evt.EVT_CONN_OPEN, handlers.on_conn_open),
        (evt.EVT_ACCEPTED, handlers.on_accepted),
        (evt.EVT_RELEASED, handlers.on_released),
        (evt.EVT_ABORTED, handlers.on_aborted),
    ]
    address = (ctx.settings.dicom_host, ctx.settings.dicom_port)
    server = ae.start_server(address, block=False, evt_handlers=evt_handlers)
    log.info("DICOM SCP %s listening on %s:%s", ctx.settings.ae_title, *server.server_address[:2])
    return server

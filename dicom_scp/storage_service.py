"""Storage SCP (C-STORE) for every storage SOP class pynetdicom knows, with every transfer syntax
pydicom knows: objects are stored as received, so none needs a codec here."""

from __future__ import annotations

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts, evt

from dicom_scp.handlers import handle_store
from pacs.context import AppContext
from pacs.ingest import Ingestor

TRANSFER_SYNTAXES = [str(ts) for ts in AllTransferSyntaxes]


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(str(cx.abstract_syntax), TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    return [(evt.EVT_C_STORE, handle_store, [ingestor, ctx])]

"""Modality Worklist Information Model – FIND SCP: a thin adapter onto pacs.ris.worklist.

Statuses (as the Query/Retrieve C-FIND SCP answers them): 0xFF00 Pending per worklist item, then
0x0000; 0xFE00 when the modality cancels; 0xC000 Unable to process, with an Error Comment, for a
value that cannot be matched (a malformed date range, say) or an identifier that cannot be decoded;
0xA700 Out of resources when the index cannot be read; 0x0122 for a C-FIND of another model.
Which orders are listed, and the matching keys, are in pacs.ris.worklist: only orders of the calling
AE's scope (pacs.ae_scope: its facility's, or all for an archive-wide AE; an unknown AE gets none).

C-FIND is bound by both this service and Query/Retrieve; ``dicom_scp.server`` dispatches each
C-FIND to the service that offers the request's presentation context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind
from sqlalchemy.exc import SQLAlchemyError

from dicom_scp.audit import audited_stream
from pacs.ae_scope import calling_scope
from pacs.aes import AERegistry
from pacs.context import AppContext
from pacs.dimse_status import CANCEL, OUT_OF_RESOURCES, PENDING, SOP_CLASS_NOT_SUPPORTED, UNABLE_TO_PROCESS, failure
from pacs.errors import IndexUnavailable
from pacs.ingest import Ingestor
from pacs.query.matching import InvalidMatchValue
from pacs.ris import worklist
from pacs.security.principal import AccessScope

log = logging.getLogger("dicom_scp")

MWL_FIND = str(ModalityWorklistInformationFind)
TRANSFER_SYNTAXES = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian), "1.2.840.10008.1.2.2"]

FindResponse = Iterator[tuple[int | Dataset, Dataset | None]]
ScopeOf = Callable[[str, str], AccessScope]  # (calling AE title, peer address) -> what it may see


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(MWL_FIND, TRANSFER_SYNTAXES)]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    scope_of = partial(calling_scope, AERegistry(ctx.read_sessions))
    return [(evt.EVT_C_FIND, handle_find, [ctx, scope_of, ctx.settings.assume_utf8_for_latin1])]


@audited_stream("dimse.worklist-find", role="modality")
def handle_find(event: evt.Event, ctx: AppContext, scope_of: ScopeOf,
                assume_utf8_for_latin1: bool = True) -> FindResponse:
    """Answer one worklist C-FIND with the orders ``scope_of`` the caller allows (``assume_utf8_for_latin1``:
    the setting, see :mod:`pacs.charset`)."""
    if str(event.request.AffectedSOPClassUID) != MWL_FIND:
        yield failure(SOP_CLASS_NOT_SUPPORTED, "only the Modality Worklist is queried here"), None
        return
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    address = str(getattr(event.assoc.requestor, "address", "") or "")
    try:
        scope = scope_of(calling_ae, address)
        identifier = event.identifier
        with ctx.read_sessions() as session:
            items = worklist.find(session, identifier, assume_utf8_for_latin1, scope=scope)
    except InvalidMatchValue as exc:
        yield failure(UNABLE_TO_PROCESS, str(exc)), None
        return
    except (SQLAlchemyError, IndexUnavailable) as exc:
        log.warning("worklist query from %s failed: %s", calling_ae, exc)
        yield failure(OUT_OF_RESOURCES, "index database unavailable"), None
        return
    except Exception as exc:  # an identifier pydicom cannot decode
        log.warning("worklist query from %s refused: %s", calling_ae, exc)
        yield failure(UNABLE_TO_PROCESS, f"cannot read the identifier: {exc}"), None
        return
    log.info("worklist query from %s: %d item(s)", calling_ae, len(items))
    for item in items:
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield PENDING, item

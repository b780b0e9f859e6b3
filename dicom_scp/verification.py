"""Verification SCP (C-ECHO)."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import Verification

from pacs.context import AppContext
from pacs.dimse_status import SUCCESS
from pacs.ingest import Ingestor

UNCOMPRESSED = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian), "1.2.840.10008.1.2.2"]


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def contexts(ctx: AppContext) -> list[tuple[str, list[str]]]:
    return [(str(Verification), UNCOMPRESSED)]


def handlers(ctx: AppContext, ingestor: Ingestor) -> list[tuple]:
    return [(evt.EVT_C_ECHO, handle_echo)]

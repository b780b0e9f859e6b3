"""The DIMSE services this SCP offers. Each service module provides:

- ``contexts(ctx) -> list[tuple[abstract_syntax, list[transfer_syntax]]]``: what it accepts;
- ``handlers(ctx, ingestor) -> list[tuple]``: pynetdicom (event, handler[, args]) bindings.

Add a service by writing its module and naming it in SERVICES.
"""

from __future__ import annotations

from types import ModuleType

from dicom_scp import (
    commitment_service,
    find_service,
    get_service,
    move_service,
    mpps_service,
    storage_service,
    verification,
    worklist_service,
)

SERVICES: tuple[ModuleType, ...] = (
    verification,
    storage_service,
    find_service,  # C-FIND SCP (Patient Root, Study Root); C-FIND is dispatched by SOP class in server.py
    commitment_service,
    mpps_service,
    move_service,  # C-MOVE SCP (Patient Root, Study Root)
    get_service,  # C-GET SCP (Patient Root, Study Root)
    worklist_service,  # Modality Worklist C-FIND SCP
)

"""The DIMSE services this SCP offers. Each service module provides:

- ``contexts(ctx) -> list[tuple[abstract_syntax, list[transfer_syntax]]]``: what it accepts;
- ``handlers(ctx, ingestor) -> list[tuple]``: pynetdicom (event, handler[, args]) bindings.

Add a service by writing its module and naming it in SERVICES.
"""

from __future__ import annotations

from types import ModuleType

from dicom_scp import storage_service, verification

SERVICES: tuple[ModuleType, ...] = (
    verification,
    storage_service,
)

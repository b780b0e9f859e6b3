"""C-STORE response statuses: the shared table of pacs.store_statuses, plus the DIMSE-only refusal."""

from __future__ import annotations

from pacs.store_statuses import (  # noqa: F401  (re-exported for the DIMSE services)
    CANNOT_UNDERSTAND,
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_MISSING_ATTRIBUTE,
    CANNOT_UNDERSTAND_NOT_STORABLE,
    CANNOT_UNDERSTAND_TRUNCATED,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_INDEX,
    OUT_OF_RESOURCES_TOO_LARGE,
    SUCCESS,
    error_comment,
    store_status,
)

REFUSED_NOT_AUTHORIZED = 0x0124

"""One table from ingest outcomes to DICOM storage statuses (PS3.4 Annex B.2.3).

C-STORE answers with them (``dicom_scp.storage_service``) and STOW-RS reports the same codes as Failure
Reasons (PS3.18 Table I.2-1), so a modality and a web uploader are told the same thing. The codes
themselves are named in :mod:`pacs.dimse_status` (re-exported here for the STOW-RS side).
"""

from __future__ import annotations

from pacs.dimse_status import (
    CANNOT_UNDERSTAND,
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_MISSING_ATTRIBUTE,
    CANNOT_UNDERSTAND_NOT_STORABLE,
    CANNOT_UNDERSTAND_TRUNCATED,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_INDEX,
    OUT_OF_RESOURCES_TOO_LARGE,
    SUBSEQUENT_OCCURRENCE_OF_REJECTED,
    SUCCESS,
    WARNING_HELD_FOR_RECONCILIATION,
    error_comment,
)
from pacs.ingest.outcome import IngestOutcome, IngestStatus
from pacs.ingest.parsing import RejectReason

__all__ = [
    "CANNOT_UNDERSTAND",
    "CANNOT_UNDERSTAND_INVALID_UID",
    "CANNOT_UNDERSTAND_MISSING_ATTRIBUTE",
    "CANNOT_UNDERSTAND_NOT_STORABLE",
    "CANNOT_UNDERSTAND_TRUNCATED",
    "DATASET_DOES_NOT_MATCH",
    "OUT_OF_RESOURCES",
    "OUT_OF_RESOURCES_INDEX",
    "OUT_OF_RESOURCES_TOO_LARGE",
    "SUBSEQUENT_OCCURRENCE_OF_REJECTED",
    "SUCCESS",
    "WARNING_HELD_FOR_RECONCILIATION",
    "error_comment",
    "store_status",
]

_BY_STATUS = {
    IngestStatus.STORED: SUCCESS,
    IngestStatus.DUPLICATE: SUCCESS,
    IngestStatus.NEW_VERSION: SUCCESS,
    IngestStatus.KEPT_EXISTING: SUCCESS,
    IngestStatus.HELD: SUCCESS,  # held for reconciliation: a sender that may not read the study learns nothing
    IngestStatus.STORAGE_UNAVAILABLE: OUT_OF_RESOURCES,
    IngestStatus.INDEX_UNAVAILABLE: OUT_OF_RESOURCES_INDEX,
    IngestStatus.PREVIOUSLY_REJECTED: SUBSEQUENT_OCCURRENCE_OF_REJECTED,
}

_BY_REASON = {
    RejectReason.NOT_DICOM: CANNOT_UNDERSTAND,
    RejectReason.TRUNCATED: CANNOT_UNDERSTAND_TRUNCATED,
    RejectReason.MISSING_ATTRIBUTE: CANNOT_UNDERSTAND_MISSING_ATTRIBUTE,
    RejectReason.INVALID_UID: CANNOT_UNDERSTAND_INVALID_UID,
    RejectReason.TOO_LARGE: OUT_OF_RESOURCES_TOO_LARGE,
    RejectReason.MISMATCH: DATASET_DOES_NOT_MATCH,
    RejectReason.NOT_STORABLE: CANNOT_UNDERSTAND_NOT_STORABLE,
}


def store_status(outcome: IngestOutcome) -> int:
    """The status of one ingest outcome (0x0000 when stored, or already stored; 0xB000 when held for
    reconciliation and the sender may read the study)."""
    if outcome.status is IngestStatus.HELD and outcome.warn:
        return WARNING_HELD_FOR_RECONCILIATION
    if outcome.status in _BY_STATUS:
        return _BY_STATUS[outcome.status]
    return _BY_REASON.get(outcome.reason, CANNOT_UNDERSTAND) if outcome.reason else CANNOT_UNDERSTAND

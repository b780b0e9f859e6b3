"""Every DIMSE status code this archive sends, named once, and the one builder of a failure status.

The names follow PS3.7 Annex C and the service classes of PS3.4; the codes pynetdicom names itself
(``pynetdicom.status.Status``) are taken from it. Each service module documents which of them it answers
and when; none declares a code of its own. (``pacs.ingest.statuses`` maps ingest outcomes onto these.)

Codes are plain ``int`` so that a status compares, formats (``0x%04X``) and encodes like any other.
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset
from pynetdicom.status import Status

# -- general (PS3.7 C.1-C.5) ---------------------------------------------------------------------
SUCCESS: Final = int(Status.SUCCESS)  # 0x0000
CANCEL: Final = int(Status.CANCEL)  # 0xFE00: the SCU sent C-CANCEL; matching or sub-operations stopped
PENDING: Final = int(Status.PENDING)  # 0xFF00: a match, or sub-operations continuing
PENDING_WARNING: Final = 0xFF01  # C-FIND match with optional keys not supported (never sent: we answer them)

INVALID_ATTRIBUTE_VALUE: Final = 0x0106
# 0x0110, 0x0112 and 0x0119 are also the Failure Reasons (0008,1197) of a storage commitment report (PS3.4
# J.3.3.1.1, pacs.commitment.service) and 0x0110 the one of a STOW-RS part that failed unexpectedly
PROCESSING_FAILURE: Final = 0x0110
DUPLICATE_SOP_INSTANCE: Final = 0x0111
NO_SUCH_SOP_INSTANCE: Final = 0x0112
INVALID_ARGUMENT_VALUE: Final = 0x0115
INVALID_OBJECT_INSTANCE: Final = 0x0117
NO_SUCH_SOP_CLASS: Final = 0x0118
CLASS_INSTANCE_CONFLICT: Final = 0x0119
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
NO_SUCH_ACTION: Final = 0x0123
REFUSED_NOT_AUTHORIZED: Final = 0x0124
RESOURCE_LIMITATION: Final = 0x0213

# -- Storage, Query/Retrieve, Worklist (PS3.4 B.2.3, C.4.1.1.4, C.4.2.1.5, C.4.3.1.4, K.4.1.1.4) ---------
OUT_OF_RESOURCES: Final = 0xA700  # transient: the peer may retry later
OUT_OF_RESOURCES_UNABLE_TO_CALCULATE: Final = 0xA701  # retrieve: the matches cannot be counted
OUT_OF_RESOURCES_UNABLE_TO_PERFORM: Final = 0xA702  # retrieve: the sub-operations cannot go on
MOVE_DESTINATION_UNKNOWN: Final = int(Status.MOVE_DESTINATION_UNKNOWN)  # 0xA801 (sent by pynetdicom itself)
IDENTIFIER_DOES_NOT_MATCH: Final = 0xA900  # identifier (or, for C-STORE, data set) does not match SOP class
UNABLE_TO_PROCESS: Final = 0xC000  # 0xCxxx: "cannot understand" / "unable to process", the rest ours
UNABLE_TO_PROCESS_INTERNAL: Final = 0xC001  # C-FIND: an unexpected error (logged)

# C-STORE (and STOW-RS Failure Reasons): what each 0xA7xx / 0xA900 / 0xCxxx means in pacs.ingest.statuses
OUT_OF_RESOURCES_INDEX: Final = 0xA701  # the index database cannot be written
OUT_OF_RESOURCES_TOO_LARGE: Final = 0xA702  # the object is over PACS_MAX_OBJECT_BYTES
DATASET_DOES_NOT_MATCH: Final = IDENTIFIER_DOES_NOT_MATCH  # data set does not match SOP class (or the request)
CANNOT_UNDERSTAND: Final = UNABLE_TO_PROCESS
CANNOT_UNDERSTAND_INVALID_UID: Final = 0xC001
CANNOT_UNDERSTAND_TRUNCATED: Final = 0xC002
CANNOT_UNDERSTAND_MISSING_ATTRIBUTE: Final = 0xC003
CANNOT_UNDERSTAND_NOT_STORABLE: Final = 0xC004
# C-STORE warning (PS3.4 B.2.3, a success): stored but held for reconciliation, not filed in its study; sent
# only to a sender that may read that study (pacs.security.filing_rules), with an Error Comment saying why
WARNING_HELD_FOR_RECONCILIATION: Final = 0xB000
# Every C-STORE warning a peer may answer (0xB000 coercion, 0xB006 elements discarded, 0xB007 SOP class does not
# match): the object was stored
STORAGE_WARNINGS: Final = (0xB000, 0xB007)

# C-STORE failure (dcm4che's, IHE IOCM): the SOP instance was rejected and is not deleted yet; sent with an
# Error Comment (pacs.studies.rejection). STOW-RS reports it as the Failure Reason of the part (409).
SUBSEQUENT_OCCURRENCE_OF_REJECTED: Final = 0xA771

# -- Modality Performed Procedure Step (PS3.4 Table F.7.2-2): an Error ID, sent with PROCESSING_FAILURE ----
MPPS_MAY_NO_LONGER_BE_UPDATED: Final = 0xA710

PENDING_STATUSES: Final = frozenset({PENDING, PENDING_WARNING})


def error_comment(message: str) -> str:
    """Error Comment is an LO: at most 64 characters, no backslash or control characters."""
    return "".join(ch if ch.isprintable() and ch != "\\" else " " for ch in message)[:64]


def failure(status: int, comment: str = "") -> Dataset:
    """A status dataset: ``status`` with an Error Comment saying why (when there is one)."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = error_comment(comment)
    return ds

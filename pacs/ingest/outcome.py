"""What an ingest answers: one outcome type for every transport (pacs.ingest.statuses translates it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pacs.ingest.parsing import RejectReason


class IngestStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical content was already stored: idempotent success
    NEW_VERSION = "new-version"  # replaced a different object with the same SOP Instance UID
    KEPT_EXISTING = "kept-existing"  # policy keep-existing: acknowledged, the stored one stays
    HELD = "held"  # stored in the reconciliation queue, not filed (pacs.reconciliation); acknowledged
    REJECTED = "rejected"  # the object cannot be archived; see reason
    PREVIOUSLY_REJECTED = "previously-rejected"  # the SOP instance was rejected (IOCM) and not deleted yet
    STORAGE_UNAVAILABLE = "storage-unavailable"
    INDEX_UNAVAILABLE = "index-unavailable"


_OK = {IngestStatus.STORED, IngestStatus.DUPLICATE, IngestStatus.NEW_VERSION, IngestStatus.KEPT_EXISTING,
       IngestStatus.HELD}


@dataclass(frozen=True)
class IngestOutcome:
    status: IngestStatus
    message: str = ""
    reason: RejectReason | None = None
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    sha256: str = ""
    derived_task_ids: tuple[int, ...] = ()
    series_instance_uid: str = ""
    # HELD: the sender may read the study and is told it was held (a warning status); False for any other
    # sender, who gets exactly what a stored object gets (pacs.security.filing_rules)
    warn: bool = False

    @property
    def ok(self) -> bool:
        return self.status in _OK

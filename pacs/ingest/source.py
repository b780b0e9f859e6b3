"""Where a received object came from: the transport, the peer and what the peer may do."""

from __future__ import annotations

from dataclasses import dataclass

from pacs.reconciliation import service as reconciliation


@dataclass(frozen=True)
class Correction:
    """A corrected version the archive makes of one of its own objects (:mod:`pacs.studies.corrections`).

    Only for ``study_instance_uid`` (the study the corrected object belongs to afterwards): the filing rules
    neither hold nor refuse it for the patient or study change it makes (:mod:`pacs.ingest.ownership`; the study
    keeps its facility), the duplicate policy does not discard it, and the index writer applies its values
    instead of "first seen wins" (:mod:`pacs.ingest.index_writer`): the patient record's name, birth date and
    sex, the study's patient, the ``study_fields`` named, and a series row moved to this study."""

    study_instance_uid: str
    principal: str  # who corrects (the audit trail)
    study_fields: tuple[str, ...] = ()  # study columns set from the object (accession_number, study_description)


@dataclass(frozen=True)
class IngestSource:
    """Where an object came from: the transport and the peer."""

    transport: str  # dimse, stow, import
    calling_ae: str = ""
    address: str = ""
    user: str = ""
    role: str = ""  # the principal's role for STOW-RS (pacs.security)
    facility: str = ""  # the facility a new study belongs to; "" = unrestricted (pacs.security.filing_rules)
    trusted: bool = True  # False for an unregistered DICOM peer: may not change what others stored
    impersonating: bool = False  # a registered AE's title from a peer that failed its identity check
    resolution: reconciliation.Resolution | None = None  # a person filing a held object (pacs.reconciliation)
    correction: Correction | None = None  # a corrected version made by the archive (pacs.studies.corrections)


def who(source: IngestSource) -> str:
    """The sender as log lines name it: ``transport:AE-or-user@address``."""
    return f"{source.transport}:{source.calling_ae or source.user or '-'}@{source.address or '-'}"

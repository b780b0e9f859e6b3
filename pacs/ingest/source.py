"""Where a received object came from: the transport, the peer and what the peer may do."""

from __future__ import annotations

from dataclasses import dataclass

from pacs.reconciliation import service as reconciliation


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


def who(source: IngestSource) -> str:
    """The sender as log lines name it: ``transport:AE-or-user@address``."""
    return f"{source.transport}:{source.calling_ae or source.user or '-'}@{source.address or '-'}"

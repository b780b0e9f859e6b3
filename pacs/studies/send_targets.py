"""The registered DICOM peers a study may be sent to (:func:`pacs.studies.send.queue_send` checks the same rules
when it is asked; this is what a page offers beforehand): an AE with a host and port, registered for a facility
that may see the study (its own, one it is shared with) or archive-wide."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.ae_scope import destination_scope
from pacs.aes import MoveDestination
from pacs.db.models import ApplicationEntity
from pacs.security.access import may_see_study
from pacs.security.principal import Principal


@dataclass(frozen=True)
class SendTarget:
    ae_title: str
    description: str
    facility: str
    archive_wide: bool


def send_targets(session: Session, principal: Principal, study_uid: str) -> list[SendTarget]:
    """Peers the study may go to; none when the principal may not pass the study on (not its facility's)."""
    if not may_see_study(session, principal.scope, study_uid, borrowed=False):
        return []
    out: list[SendTarget] = []
    for ae in session.scalars(select(ApplicationEntity).order_by(ApplicationEntity.ae_title)):
        if not ae.host or not 1 <= ae.port <= 65535:
            continue
        target = MoveDestination(ae.ae_title, ae.host, ae.port, ae.facility, ae.archive_wide)
        if may_see_study(session, destination_scope(target), study_uid, borrowed=False):
            out.append(SendTarget(ae.ae_title, ae.description, ae.facility, ae.archive_wide))
    return out

"""Figures for the administrator's pages (``/ui/admin``): archive size, storage use, queues, retention due.

Everything here is a count or a sum read from the index — never a listing of the object store — and names no
patient, so reading it is not audited. The sums over instances walk the instance table; on PostgreSQL each
query is bounded by a statement timeout (:data:`QUERY_TIMEOUT_MS`), and a figure that could not be read in time
comes back as ``None`` (the page says "not available") instead of holding the page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs.context import AppContext
from pacs.db.models import Instance, InstanceVersion, Series, Study
from pacs.security.access import owned_study_condition
from pacs.security.principal import AccessScope

log = logging.getLogger(__name__)

QUERY_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class FacilityUse:
    facility: str  # "" = studies of no facility
    studies: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class StorageUse:
    facilities: list[FacilityUse]
    prior_versions: int | None  # replaced versions kept retrievable (archive-wide admins only)
    prior_version_bytes: int | None

    @property
    def studies(self) -> int:
        return sum(f.studies for f in self.facilities)

    @property
    def instances(self) -> int:
        return sum(f.instances for f in self.facilities)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.facilities)


def _bounded(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {QUERY_TIMEOUT_MS}"))


def storage_use(ctx: AppContext, scope: AccessScope) -> StorageUse | None:
    """Studies, current instances and their bytes per facility (those ``scope`` owns); None if not readable."""
    owned = owned_study_condition(scope)
    try:
        with ctx.read_sessions() as session, session.begin():
            _bounded(session)
            sums = {facility: (int(n or 0), int(size or 0)) for facility, n, size in session.execute(
                select(Study.facility, func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
                .select_from(Instance).join(Series, Series.id == Instance.series_fk)
                .join(Study, Study.id == Series.study_fk).where(owned).group_by(Study.facility))}
            studies = dict(session.execute(select(Study.facility, func.count(Study.id))
                                           .where(owned, Study.number_of_instances > 0).group_by(Study.facility)).all())
            prior: tuple[int | None, int | None] = (None, None)
            if scope.unrestricted:
                n, size = session.execute(select(func.count(InstanceVersion.id),
                                                 func.coalesce(func.sum(InstanceVersion.size), 0))).one()
                prior = (int(n or 0), int(size or 0))
    except SQLAlchemyError as exc:
        log.warning("storage use not readable: %s", str(exc).splitlines()[0][:200])
        return None
    rows = [FacilityUse(facility or "", int(studies.get(facility, 0)), *sums.get(facility, (0, 0)))
            for facility in sorted(set(sums) | set(studies))]
    return StorageUse(rows, *prior)


def queue_depths(ctx: AppContext) -> dict[tuple[str, str], int] | None:
    """Unfinished jobs by (queue, state), as ``/metrics`` reports them; None if not readable."""
    from pacs.metrics import read_queue_depths

    try:
        with ctx.read_sessions() as session, session.begin():
            return read_queue_depths(session)
    except SQLAlchemyError as exc:
        log.warning("queue depths not readable: %s", str(exc).splitlines()[0][:200])
        return None


def retention_due_count(ctx: AppContext, scope: AccessScope, today: date | None = None) -> int | None:
    """How many studies (that ``scope`` may delete) are due under the facility retention policy; no patient data
    (the list itself is :func:`pacs.studies.retention.list_due`, audited)."""
    from pacs.studies.retention import due_condition

    today = today or datetime.now(UTC).date()
    try:
        with ctx.read_sessions() as session, session.begin():
            _bounded(session)
            return int(session.scalar(select(func.count(Study.id)).where(
                due_condition(ctx.settings, today), owned_study_condition(scope))) or 0)
    except SQLAlchemyError as exc:
        log.warning("retention count not readable: %s", str(exc).splitlines()[0][:200])
        return None

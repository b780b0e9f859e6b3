"""The consult grant: while a consult is open (not closed, not expired) its consulted facility sees its study.

Kept apart from :mod:`pacs.consults.service` so that :mod:`pacs.security.access` can import it without a cycle
(it needs only the tables).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, bindparam, exists
from sqlalchemy.orm import aliased

from pacs.consults.models import ACTIVE_STATES, Consult
from pacs.db.models import Study

NOW_PARAM = "consult_now"  # the bound parameter holding "now" (a prebuilt statement sets it per execution)


def consult_grant(facilities: Iterable[str], now: datetime | None = None) -> ColumnElement[bool]:
    """True for :class:`Study` rows with an active consult to one of ``facilities``.

    ``now`` is bound as a parameter (a Python time, not the database's clock: SQLite and PostgreSQL agree on
    it, and tests can move it); an expired consult grants nothing even before the sweep marks it
    ``expired``. Uses the index ``ix_consult_grant``. The consult table is aliased, so that the condition never
    correlates with a query that itself selects consults (:func:`pacs.consults.service.list_consults`): it is
    "any active consult of this study", not "this row's consult".
    """
    names = sorted(f for f in facilities if f)  # "" is the external side: never a facility scope
    moment = now if now is not None else datetime.now(UTC)
    granting = aliased(Consult)
    return exists().where(granting.study_instance_uid == Study.study_instance_uid,
                          granting.consulted_facility.in_(names),
                          granting.state.in_(ACTIVE_STATES),
                          granting.expires_at > bindparam(NOW_PARAM, moment, unique=True))

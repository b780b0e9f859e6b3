"""What a technologist's worklist shows beside each order: its MPPS state and whether its images are here.

The MPPS state of an order is that of its steps (:mod:`pacs.ris.mpps`): IN PROGRESS while one is, COMPLETED once
one completed, DISCONTINUED when every step was discontinued, none when no modality reported a step. The study
of an order is the one its images were linked to (:func:`pacs.ris.orders.link_study`), else the Study Instance
UID the worklist handed out, when that study exists with current instances inside the principal's scope.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.db.models import Study
from pacs.ris.models import (
    STEP_COMPLETED,
    STEP_DISCONTINUED,
    STEP_IN_PROGRESS,
    ImagingOrder,
    PerformedProcedureStep,
)
from pacs.ris.orders import OrderRecord
from pacs.security.access import study_condition
from pacs.security.principal import Principal
from pacs.studies.common import chunks


def step_states(session: Session, accession_numbers: Sequence[str]) -> dict[str, str]:
    """The MPPS state per accession number, for the orders that have at least one step."""
    seen: dict[str, list[str]] = {}
    for part in chunks(list(dict.fromkeys(accession_numbers))):
        for accession, state in session.execute(
                select(ImagingOrder.accession_number, PerformedProcedureStep.state)
                .join(PerformedProcedureStep, PerformedProcedureStep.order_fk == ImagingOrder.id)
                .where(ImagingOrder.accession_number.in_(part))):
            seen.setdefault(accession, []).append(state)
    return {accession: summary(states) for accession, states in seen.items()}


def summary(states: Sequence[str]) -> str:
    if STEP_IN_PROGRESS in states:
        return STEP_IN_PROGRESS
    if STEP_COMPLETED in states:
        return STEP_COMPLETED
    return STEP_DISCONTINUED


def order_studies(session: Session, principal: Principal, orders: Sequence[OrderRecord]) -> dict[str, str]:
    """Accession number -> the Study Instance UID of its images, for orders whose study the principal may see."""
    wanted = {o.accession_number: o.linked_study_instance_uid or o.study_instance_uid for o in orders}
    present: set[str] = set()
    for part in chunks(sorted(set(wanted.values()))):
        present.update(session.scalars(select(Study.study_instance_uid).where(
            Study.study_instance_uid.in_(part), study_condition(principal.scope, hide_empty=True))))
    return {accession: uid for accession, uid in wanted.items() if uid in present}

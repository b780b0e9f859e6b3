"""Which orders an :class:`~pacs.security.principal.AccessScope` may see or act on.

The order-side twin of :func:`pacs.security.access.study_condition`: an order belongs to the
facility that placed it (``imaging_order.facility``), so a facility scope sees that facility's
orders only (an order placed without a facility is seen by unrestricted scopes only, as on HTTP).
The Modality Worklist lists, and MPPS links steps to, only orders inside the calling AE's scope
(:mod:`pacs.ae_scope`); an order outside it is treated exactly like one that does not exist.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, true

from pacs.ris.models import ImagingOrder
from pacs.security.principal import AccessScope


def order_condition(scope: AccessScope) -> ColumnElement[bool]:
    """A SQL condition on :class:`ImagingOrder` rows true exactly for the orders ``scope`` may see."""
    parts: list[ColumnElement[bool]] = []
    if scope.facilities is not None:
        parts.append(ImagingOrder.facility.in_(sorted(scope.facilities)))
    if scope.patient_ids is not None:
        parts.append(ImagingOrder.patient_id.in_(sorted(scope.patient_ids)))
    if scope.study_uids is not None:
        parts.append(ImagingOrder.linked_study_instance_uid.in_(sorted(scope.study_uids)))
    return and_(*parts) if parts else true()

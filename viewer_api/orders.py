"""Imaging orders under ``/api/orders`` (logic in :mod:`pacs.ris.orders`, the one order service).

=========================================  ============  ===============================================
route                                      capability    answers
=========================================  ============  ===============================================
``POST /api/orders``                       order.manage  201: the order (accession generated when absent)
``GET /api/orders``                        study.search  orders in the caller's scope, by scheduled time
``GET /api/orders/{accession}``            study.search  one order
``POST /api/orders/{accession}/cancel``    order.manage  the order, discontinued (leaves the worklist)
=========================================  ============  ===============================================

Scope: a facility user sees (and creates) orders of its facility only; a patient token its own orders.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from pacs import audit
from pacs.errors import InvalidInput, NotFound
from pacs.ris.orders import NewOrder, OrderRecord, cancel_order, create_order, get_order, list_orders
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.security import audit_access, audited, context, require

router = APIRouter(prefix="/api/orders", tags=["orders"])


class PatientIn(BaseModel):
    id: str = Field(min_length=1, max_length=64)
    issuer: str = Field(default="", max_length=64)
    name: str = Field(min_length=1, max_length=200, description="DICOM PN, Family^Given^Middle")
    birth_date: str = Field(default="", max_length=10, description="YYYYMMDD or YYYY-MM-DD")
    sex: str = Field(default="", max_length=1, description="M, F or O")


class OrderIn(BaseModel):
    patient: PatientIn
    modality: str = Field(min_length=1, max_length=16)
    procedure: str = Field(min_length=1, max_length=64, description="requested procedure description")
    accession_number: str = Field(default="", max_length=16)
    placer_order_number: str = Field(default="", max_length=64, description="the EMR's own order number")
    priority: str = Field(default="ROUTINE", max_length=8, description="STAT, URGENT or ROUTINE")
    reason: str = Field(default="", max_length=1024)
    referring_physician: str = Field(default="", max_length=200, description="DICOM PN")
    station_ae_title: str = Field(default="", max_length=16, description="the modality expected to do it")
    scheduled_date: str = Field(default="", max_length=10, description="YYYYMMDD; empty = today")
    scheduled_time: str = Field(default="", max_length=8, description="HHMM[SS]; empty = now")
    facility: str = Field(default="", max_length=64, description="defaults to the caller's facility")


@router.post("", status_code=201, summary="Create an imaging order (it appears on the Modality Worklist)")
def create(body: OrderIn, request: Request, response: Response,
           principal: Principal = require(Capability.ORDER_MANAGE)) -> dict[str, Any]:  # noqa: B008
    facility = body.facility.strip() or principal.facility
    with audited(request, principal, "order.create"):
        if principal.scope.facilities is not None and facility not in principal.scope.facilities:
            raise InvalidInput(f"you may only create orders for {', '.join(sorted(principal.scope.facilities))}")
        new = NewOrder(patient_id=body.patient.id, patient_name=body.patient.name, modality=body.modality,
                       station_ae_title=body.station_ae_title, start_date=body.scheduled_date,
                       start_time=body.scheduled_time, procedure_description=body.procedure,
                       accession_number=body.accession_number, patient_birth_date=body.patient.birth_date,
                       patient_sex=body.patient.sex, referring_physician_name=body.referring_physician,
                       priority=body.priority, reason=body.reason, facility=facility,
                       issuer_of_patient_id=body.patient.issuer, placer_order_number=body.placer_order_number,
                       source="api")
        with context(request).sessions() as session, session.begin():
            order = create_order(session, new)
            audit.append(session, action="order.create", actor=principal.subject, role=principal.role.value,
                         source_address=principal.source_address, patient_id=order.patient_id,
                         study_instance_uid=order.study_instance_uid,
                         detail=f"order {order.accession_number} {order.modality} {order.priority}")
    response.headers["Location"] = f"/api/orders/{order.accession_number}"
    return order_json(order)


@router.get("", summary="Orders in the caller's scope, by scheduled date and time")
def search(request: Request, state: str = Query("", max_length=16),
           date: str = Query("", max_length=10, description="scheduled date YYYYMMDD"),
           patient_id: str = Query("", max_length=64), limit: int = Query(100, ge=1, le=1000),
           offset: int = Query(0, ge=0, le=1_000_000),
           principal: Principal = require(Capability.STUDY_SEARCH)) -> list[dict[str, Any]]:  # noqa: B008
    patient = _patient_filter(principal, patient_id)
    with (
        audited(request, principal, "order.read"),
        context(request).read_sessions() as session,
    ):
        orders = list_orders(session, state or None, date or None, patient_id=patient,
                             facilities=principal.scope.facilities, limit=limit, offset=offset)
    audit_access(request, principal, "order.read", patient_id=patient or "", detail=f"{len(orders)} order(s)")
    return [order_json(o) for o in orders]


@router.get("/{accession}", summary="One order by accession number")
def read(accession: str, request: Request,
         principal: Principal = require(Capability.STUDY_SEARCH)) -> dict[str, Any]:  # noqa: B008
    with (
        audited(request, principal, "order.read"),
        context(request).read_sessions() as session,
    ):
        order = _visible(session, principal, accession)
    audit_access(request, principal, "order.read", patient_id=order.patient_id,
                 study_instance_uid=order.linked_study_instance_uid, detail=f"order {accession}")
    return order_json(order)


@router.post("/{accession}/cancel", summary="Cancel (discontinue) a scheduled or in-progress order")
def cancel(accession: str, request: Request,
           principal: Principal = require(Capability.ORDER_MANAGE)) -> dict[str, Any]:  # noqa: B008
    with (
        audited(request, principal, "order.cancel"),
        context(request).sessions() as session, session.begin(),
    ):
        _visible(session, principal, accession)
        order = cancel_order(session, accession)
        audit.append(session, action="order.cancel", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, patient_id=order.patient_id,
                     detail=f"order {accession} discontinued")
    return order_json(order)


def _visible(session: Any, principal: Principal, accession: str) -> OrderRecord:
    order = get_order(session, accession)
    scope = principal.scope
    if (scope.facilities is not None and order.facility not in scope.facilities) or \
            (scope.patient_ids is not None and order.patient_id not in scope.patient_ids):
        raise NotFound(f"no order with accession number {accession}")
    return order


def _patient_filter(principal: Principal, requested: str) -> str | None:
    if principal.scope.patient_ids is None:
        return requested.strip() or None
    own = sorted(principal.scope.patient_ids)[0]
    if requested.strip() and requested.strip() != own:
        raise NotFound("no such patient")
    return own


def order_json(o: OrderRecord) -> dict[str, Any]:
    return {
        "accession_number": o.accession_number, "study_instance_uid": o.study_instance_uid,
        "linked_study_instance_uid": o.linked_study_instance_uid or None, "state": o.state,
        "priority": o.priority, "patient": {"id": o.patient_id, "issuer": o.issuer_of_patient_id,
                                            "name": o.patient_name, "birth_date": o.patient_birth_date,
                                            "sex": o.patient_sex},
        "modality": o.modality, "procedure": o.requested_procedure_description,
        "requested_procedure_id": o.requested_procedure_id, "scheduled_procedure_step_id":
        o.scheduled_procedure_step_id, "station_ae_title": o.scheduled_station_ae_title,
        "scheduled_date": o.scheduled_start_date, "scheduled_time": o.scheduled_start_time,
        "referring_physician": o.referring_physician_name, "reason": o.reason, "facility": o.facility,
        "placer_order_number": o.placer_order_number, "source": o.source,
        "created_at": o.created_at.isoformat() if o.created_at else None,
        "updated_at": o.updated_at.isoformat() if o.updated_at else None,
    }

"""FHIR R4 ServiceRequest: imaging orders of the RIS (:mod:`pacs.ris.orders`), read, searched and created.

**Id.** The accession number when it is a valid FHIR id (``[A-Za-z0-9.-]``, as generated accession numbers
and most EMRs' are), else ``h.`` + the hex of its bytes padded with zero bytes to 16 (34 characters; an
accession number has at most 16, so the two forms never collide). The accession number is unique and never
changes, so the id is stable.

**Status.** Order state → ServiceRequest status: scheduled and in-progress → ``active``, completed →
``completed``, discontinued → ``revoked``. ``intent`` is ``order``.

**Create** (``POST /fhir/ServiceRequest``) parses the body with ``fhir.resources`` (R4B) and makes the order
through :func:`pacs.ris.orders.create_order` (``source="fhir"``); it appears on the Modality Worklist.

==========================================  ==================================================================
ServiceRequest                              order
==========================================  ==================================================================
``status`` / ``intent``                     must be ``active`` / ``order`` (or ``original-order``,
                                            ``reflex-order``, ``filler-order``, ``instance-order``)
``identifier`` of type ``PLAC`` (v2-0203)   placer order number (the EMR's order id; a second order with the
                                            same placer number is refused, 409: a retried POST creates nothing)
``identifier`` of type ``ACSN``             accession number (else one is generated; in use: 409)
``subject``                                 ``#id`` of a contained Patient, or an inline reference with
                                            ``identifier`` and ``display``; the identifier (a contained
                                            Patient's MR one, else its first) gives Patient ID and issuer
                                            (``system`` ``urn:oid:X`` → X, another system as is, else
                                            ``assigner.display``)
name                                        a contained Patient's name (HumanName → DICOM PN
                                            ``Family^Given Middle^^Prefix^Suffix``; else its ``text``), else
                                            ``subject.display`` as given
birth date, sex                             a contained Patient's ``birthDate`` (a full date; a partial one is
                                            left out) and ``gender`` (male M, female F, other O)
``code.text`` (else a coding's display)     requested procedure description
``category`` / ``code.coding`` in DCM       modality (``http://dicom.nema.org/resources/ontology/DCM``);
                                            none: ``OT``
``priority``                                routine ROUTINE, urgent and asap URGENT, stat STAT
``reasonCode`` (text, else display)         reason (several joined by "; ")
``requester.display``                       referring physician
``occurrenceDateTime`` (or period start)    scheduled date and time, in the server's local time
``performer`` Organization display          facility, only for a principal without a facility; a
                                            facility principal's orders are always its own facility's
==========================================  ==================================================================

**Scope.** An order is visible to a principal with a facility when it is that facility's, to a patient
token when it is its patient's, to a share link when it is for the shared study; unrestricted principals
see every order. Others are 404, like unknown ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.fhir.ids import PatientRef, patient_fhir_id
from pacs.fhir.resources import accession_identifier, compact, fhir_instant, human_name, patient_identifier
from pacs.fhir.search import DCM_SYSTEM, ORDER_STATES_BY_STATUS, V2_0203, Search
from pacs.ris.models import ImagingOrder
from pacs.ris.orders import NewOrder, OrderRecord, create_order, find_order_by_placer, get_order
from pacs.ris.scope import order_condition
from pacs.security.principal import AccessScope, Principal

_PLAIN_ID = re.compile(r"^[A-Za-z0-9.-]{1,16}$")
_ENCODED = re.compile(r"^h\.((?:[0-9a-f]{2}){16})$")
_ACCESSION_BYTES = 16
STATUS_BY_STATE = {state: status for status, states in ORDER_STATES_BY_STATUS.items() for state in states}
PRIORITY_OUT = {"STAT": "stat", "URGENT": "urgent", "ROUTINE": "routine"}
PRIORITY_IN = {"routine": "ROUTINE", "urgent": "URGENT", "asap": "URGENT", "stat": "STAT"}
ORDER_INTENTS = frozenset({"order", "original-order", "reflex-order", "filler-order", "instance-order"})
_SEX_IN = {"male": "M", "female": "F", "other": "O"}
_RESOLVE_LIMIT = 1000


# -- ids ---------------------------------------------------------------------------------------------


def service_request_fhir_id(accession_number: str) -> str:
    if _PLAIN_ID.match(accession_number):
        return accession_number
    raw = accession_number.encode("utf-8")[:_ACCESSION_BYTES]
    return "h." + raw.ljust(_ACCESSION_BYTES, b"\x00").hex()


def accession_from_fhir(fhir_id: str) -> str | None:
    """The accession number a ServiceRequest id names; None for an id we never made."""
    if _PLAIN_ID.match(fhir_id):
        return fhir_id
    match = _ENCODED.match(fhir_id)
    if not match:
        return None
    try:
        accession = bytes.fromhex(match.group(1)).rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        return None
    return accession if accession and service_request_fhir_id(accession) == fhir_id else None


# -- the resource (pure) -----------------------------------------------------------------------------


class OrderLike(Protocol):
    """What the resource is built from: an :class:`OrderRecord` or an ``ImagingOrder`` row (read-only
    properties, so a frozen dataclass qualifies too)."""

    @property
    def accession_number(self) -> str: ...

    @property
    def patient_id(self) -> str: ...

    @property
    def issuer_of_patient_id(self) -> str: ...

    @property
    def patient_name(self) -> str: ...

    @property
    def requested_procedure_description(self) -> str: ...

    @property
    def scheduled_start_date(self) -> str: ...

    @property
    def scheduled_start_time(self) -> str: ...

    @property
    def modality(self) -> str: ...

    @property
    def referring_physician_name(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def priority(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def facility(self) -> str: ...

    @property
    def placer_order_number(self) -> str: ...

    @property
    def created_at(self) -> datetime | None: ...

    @property
    def updated_at(self) -> datetime | None: ...


def service_request(order: OrderLike) -> dict[str, Any]:
    """One order as a ServiceRequest (the mapping of the module docstring, read the other way)."""
    identifiers = []
    if order.placer_order_number:
        identifiers.append({"use": "official", "type": {"coding": [{"system": V2_0203, "code": "PLAC"}]},
                            "value": order.placer_order_number})
    identifiers.append(accession_identifier(order.accession_number))
    name = human_name(order.patient_name).get("text", "")
    requester = human_name(order.referring_physician_name).get("text", "")
    return compact({
        "resourceType": "ServiceRequest",
        "id": service_request_fhir_id(order.accession_number),
        "meta": compact({"lastUpdated": fhir_instant(order.updated_at)}),
        "identifier": identifiers,
        "status": STATUS_BY_STATE.get(order.state, "unknown"),
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        "priority": PRIORITY_OUT.get(order.priority, "routine"),
        "code": compact({"coding": [{"system": DCM_SYSTEM, "code": order.modality}] if order.modality else [],
                         "text": order.requested_procedure_description}),
        "subject": compact({"reference": f"Patient/{patient_fhir_id(order.patient_id, order.issuer_of_patient_id)}",
                            "identifier": patient_identifier(order.patient_id, order.issuer_of_patient_id),
                            "display": name}),
        "occurrenceDateTime": _occurrence(order.scheduled_start_date, order.scheduled_start_time),
        "authoredOn": fhir_instant(order.created_at),
        "requester": {"display": requester} if requester else None,
        "performer": [{"type": "Organization", "display": order.facility}] if order.facility else [],
        "reasonCode": [{"text": order.reason}] if order.reason else [],
    })


def _occurrence(day: str, time: str) -> str | None:
    """The scheduled date and time (server local time, with its offset); the date alone without a time."""
    try:
        if len(time) >= 4:
            moment = datetime.strptime(day + time[:6].ljust(6, "0"), "%Y%m%d%H%M%S")
            return moment.astimezone().isoformat(timespec="seconds")
        return datetime.strptime(day, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


# -- create: a ServiceRequest body as a new order (pure) ------------------------------------------------


@dataclass(frozen=True)
class OrderRequest:
    """What a posted ServiceRequest asks for; :func:`new_order` adds the facility and makes a NewOrder."""

    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    procedure: str
    modality: str
    priority: str
    reason: str
    referring_physician: str
    start_date: str
    start_time: str
    accession_number: str
    placer_order_number: str
    performer_organization: str


def parse_service_request(payload: object) -> OrderRequest:
    """Validate a posted ServiceRequest (FHIR R4B model) and read the order from it; InvalidInput says why not."""
    from fhir.resources.R4B.servicerequest import ServiceRequest

    if not isinstance(payload, dict) or payload.get("resourceType") != "ServiceRequest":
        raise InvalidInput("the body must be a FHIR ServiceRequest resource (JSON, resourceType ServiceRequest)")
    try:
        resource = ServiceRequest.model_validate(payload)
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid ServiceRequest: {_problems(exc)}") from None
    if resource.status != "active":
        raise InvalidInput(f"status must be active to place an order, not {str(resource.status)[:20]!r}")
    if resource.intent not in ORDER_INTENTS:
        raise InvalidInput(f"intent must be one of {', '.join(sorted(ORDER_INTENTS))}")
    patient_id, issuer, name, birth_date, sex = _patient(resource)
    start_date, start_time = _scheduled(resource)
    return OrderRequest(
        patient_id=patient_id, issuer=issuer, patient_name=name, birth_date=birth_date, sex=sex,
        procedure=_procedure(resource), modality=_modality(resource),
        priority=PRIORITY_IN.get(str(resource.priority or "routine"), "") or _bad_priority(resource.priority),
        reason="; ".join(t for t in (_concept_text(c) for c in resource.reasonCode or []) if t),
        referring_physician=(resource.requester.display or "") if resource.requester else "",
        start_date=start_date, start_time=start_time,
        accession_number=_identifier(resource, "ACSN"), placer_order_number=_identifier(resource, "PLAC"),
        performer_organization=_performer_organization(resource))


def new_order(request: OrderRequest, principal: Principal) -> NewOrder:
    """The order to create. The facility is the principal's; only a principal without one (every facility)
    may name it, through the performer Organization's display."""
    allowed = principal.scope.facilities
    if allowed is None:
        facility = principal.facility or request.performer_organization
    else:
        facility = principal.facility if principal.facility in allowed else min(allowed, default="")
    return NewOrder(
        patient_id=request.patient_id, patient_name=request.patient_name, modality=request.modality,
        station_ae_title="", start_date=request.start_date, start_time=request.start_time,
        procedure_description=request.procedure, accession_number=request.accession_number,
        patient_birth_date=request.birth_date, patient_sex=request.sex,
        referring_physician_name=request.referring_physician, priority=request.priority, reason=request.reason,
        facility=facility, issuer_of_patient_id=request.issuer, placer_order_number=request.placer_order_number,
        source="fhir")


def _problems(exc: Exception) -> str:
    """Pydantic's complaints as ``where: what`` (never the values: they may be patient data)."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                         for e in exc.errors()[:5])[:400]
    return str(exc)[:200]


def _bad_priority(value: object) -> str:
    raise InvalidInput(f"priority {str(value)[:20]!r} is not routine, urgent, asap or stat")


def _patient(resource: Any) -> tuple[str, str, str, str, str]:
    """(Patient ID, issuer, DICOM PN, birth date YYYY-MM-DD, sex) from the subject."""
    from fhir.resources.R4B.patient import Patient

    subject = resource.subject
    contained = None
    if subject.reference:
        if not subject.reference.startswith("#"):
            raise InvalidInput("subject must be a contained Patient (#id) or an identifier with a display: "
                               "this server does not resolve references to other servers' Patients")
        contained = next((c for c in resource.contained or []
                          if isinstance(c, Patient) and f"#{c.id}" == subject.reference), None)
        if contained is None:
            raise InvalidInput(f"subject {subject.reference[:40]!r} names no contained Patient")
    identifier = _patient_identifier(contained.identifier or []) if contained is not None else subject.identifier
    if identifier is None or not (identifier.value or "").strip():
        raise InvalidInput("the patient needs an identifier (subject.identifier or the contained Patient's)")
    name = (_pn(contained.name or []) if contained is not None else "") or (subject.display or "").strip()
    if not name:
        raise InvalidInput("the patient needs a name (a contained Patient's name or subject.display)")
    birth, sex = "", ""
    if contained is not None:
        birth = contained.birthDate.isoformat() if isinstance(contained.birthDate, date) else ""
        sex = _SEX_IN.get(str(contained.gender or ""), "")
    return identifier.value.strip(), _issuer(identifier), name, birth, sex


def _patient_identifier(identifiers: list[Any]) -> Any:
    def is_mr(identifier: Any) -> bool:
        codings = (identifier.type.coding or []) if identifier.type else []
        return any(c.code == "MR" for c in codings)

    usable = [i for i in identifiers if (i.value or "").strip()]
    return next((i for i in usable if is_mr(i)), usable[0] if usable else None)


def _issuer(identifier: Any) -> str:
    system = (identifier.system or "").strip()
    if system:
        return system.removeprefix("urn:oid:")
    return ((identifier.assigner.display or "") if identifier.assigner else "").strip()


def _pn(names: list[Any]) -> str:
    """The first official/usual (else first) HumanName as a DICOM PN ``Family^Given Middle^^Prefix^Suffix``."""
    if not names:
        return ""
    name = next((n for n in names if n.use in ("official", "usual")), names[0])
    family = (name.family or "").strip()
    given = " ".join(g.strip() for g in name.given or [] if g and g.strip())
    if not (family or given):
        return (name.text or "").strip()
    parts = [family, given, "", " ".join(name.prefix or []), " ".join(name.suffix or [])]
    return "^".join(parts).rstrip("^")


def _procedure(resource: Any) -> str:
    text = _concept_text(resource.code) if resource.code else ""
    if not text:
        raise InvalidInput("code.text (or a coding's display) must name the requested procedure")
    return text


def _concept_text(concept: Any) -> str:
    if concept.text and concept.text.strip():
        return concept.text.strip()
    return next((c.display.strip() for c in concept.coding or [] if c.display and c.display.strip()), "")


def _modality(resource: Any) -> str:
    concepts = [*(resource.category or []), *([resource.code] if resource.code else [])]
    for concept in concepts:
        for coding in concept.coding or []:
            if coding.system == DCM_SYSTEM and coding.code:
                return coding.code.strip().upper()
    return "OT"


def _scheduled(resource: Any) -> tuple[str, str]:
    """Scheduled date and time (``YYYYMMDD``, ``HHMMSS``) in the server's local time; ("", "") = now."""
    when = resource.occurrenceDateTime
    if when is None and resource.occurrencePeriod is not None:
        when = resource.occurrencePeriod.start
    if when is None:
        return "", ""
    if isinstance(when, datetime):
        local = when.astimezone() if when.tzinfo else when
        return local.strftime("%Y%m%d"), local.strftime("%H%M%S")
    if isinstance(when, date):
        return when.strftime("%Y%m%d"), ""
    raise InvalidInput("occurrenceDateTime must be a day (YYYY-MM-DD) or a dateTime with a time zone")


def _identifier(resource: Any, kind: str) -> str:
    """The value of the identifier of v2-0203 type ``kind`` (PLAC, ACSN); "" when none."""
    for identifier in resource.identifier or []:
        codings = (identifier.type.coding or []) if identifier.type else []
        if any(c.code == kind and c.system in (None, V2_0203) for c in codings) and identifier.value:
            return identifier.value.strip()
    return ""


def _performer_organization(resource: Any) -> str:
    from fhir.resources.R4B.organization import Organization

    for performer in resource.performer or []:
        reference = performer.reference or ""
        if reference.startswith("#"):
            org = next((c for c in resource.contained or []
                        if isinstance(c, Organization) and f"#{c.id}" == reference), None)
            if org is not None and org.name:
                return org.name.strip()
        if (performer.type == "Organization" or reference.startswith("Organization/")) and performer.display:
            return performer.display.strip()
    return ""


# -- reads, searches and create (inside the caller's scope) --------------------------------------------


def order_visible(order: OrderLike | OrderRecord, scope: AccessScope) -> bool:
    if scope.facilities is not None and order.facility not in scope.facilities:
        return False
    if scope.patient_ids is not None and order.patient_id not in scope.patient_ids:
        return False
    if scope.study_uids is not None:
        linked = getattr(order, "linked_study_instance_uid", "")
        return bool(linked) and linked in scope.study_uids
    return True


def read_order(session: Session, scope: AccessScope, fhir_id: str) -> OrderRecord:
    accession = accession_from_fhir(fhir_id)
    if accession is None:
        raise NotFound("no such ServiceRequest")
    try:
        order = get_order(session, accession)
    except NotFound:
        raise NotFound("no such ServiceRequest") from None
    if not order_visible(order, scope):
        raise NotFound("no such ServiceRequest")
    return order


def search_orders(session: Session, scope: AccessScope, search: Search) -> tuple[list[ImagingOrder], int]:
    """One page of the orders matching ``search`` (newest first) and the number of matches."""
    if search.matches_nothing:
        return [], 0
    conditions = _conditions(session, scope, search)
    if conditions is None:
        return [], 0
    total = session.scalar(select(func.count(ImagingOrder.id)).where(*conditions)) or 0
    if not search.count:
        return [], total
    rows = session.scalars(select(ImagingOrder).where(*conditions).order_by(ImagingOrder.id.desc())
                           .limit(search.count).offset(search.offset)).all()
    return list(rows), total


def _conditions(session: Session, scope: AccessScope, search: Search) -> list[ColumnElement[bool]] | None:
    conditions: list[ColumnElement[bool]] = [order_condition(scope)]  # the same scope as the worklist
    filters = search.filters
    if "PatientID" in filters:
        conditions.append(ImagingOrder.patient_id.in_(filters["PatientID"].split("\\")))
    if "IssuerOfPatientID" in filters:
        conditions.append(ImagingOrder.issuer_of_patient_id == filters["IssuerOfPatientID"])
    if search.patient_ref is not None:
        identity = _resolve_patient(session, search.patient_ref)
        if identity is None:
            return None
        conditions += [ImagingOrder.patient_id == identity[0], ImagingOrder.issuer_of_patient_id == identity[1]]
    if "OrderIdentifier" in filters:
        values = filters["OrderIdentifier"].split("\\")
        conditions.append(or_(ImagingOrder.accession_number.in_(values), ImagingOrder.placer_order_number.in_(values)))
    if "AccessionNumber" in filters:
        conditions.append(ImagingOrder.accession_number.in_(filters["AccessionNumber"].split("\\")))
    if "PlacerOrderNumber" in filters:
        conditions.append(ImagingOrder.placer_order_number.in_(filters["PlacerOrderNumber"].split("\\")))
    if search.statuses is not None:
        states = sorted({state for status in search.statuses for state in ORDER_STATES_BY_STATUS[status]})
        conditions.append(ImagingOrder.state.in_(states))
    if search.ids is not None:
        accessions = [a for a in (accession_from_fhir(v) for v in search.ids) if a is not None]
        if not accessions:
            return None
        conditions.append(ImagingOrder.accession_number.in_(accessions))
    return conditions


def _resolve_patient(session: Session, ref: PatientRef) -> tuple[str, str] | None:
    if ref.exact:
        return ref.patient_id, ref.issuer
    rows = session.execute(select(ImagingOrder.patient_id, ImagingOrder.issuer_of_patient_id).where(
        ImagingOrder.patient_id.startswith(ref.patient_id, autoescape=True)).distinct().limit(_RESOLVE_LIMIT))
    return next(((p, i) for p, i in rows if ref.matches(p, i)), None)


def place_order(session: Session, new: NewOrder) -> OrderRecord:
    """Create the order (inside the caller's transaction). Conflict for an accession number in use, and
    for a placer order number that already names an order (a retried POST must not order twice)."""
    if new.placer_order_number.strip() and find_order_by_placer(session, new.placer_order_number) is not None:
        raise Conflict(f"placer order number {new.placer_order_number.strip()[:64]!r} already names an order")
    return create_order(session, new)

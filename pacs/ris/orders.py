"""Imaging orders: create, list, get, cancel. Services take a Session; the caller owns the transaction.

The one order service behind every door: ``pacs order`` (CLI), ``/api/orders`` (HTTP), FHIR
``ServiceRequest`` and HL7 ``ORM^O01`` over MLLP all call :func:`create_order` and :func:`cancel_order`.
An order's state then follows MPPS (:mod:`pacs.ris.mpps`) and the images (:func:`link_study`).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import date, datetime

from pydicom.uid import generate_uid
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs.aes import validate_ae_title
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.ris.models import (
    COMPLETED,
    DISCONTINUED,
    IN_PROGRESS,
    ORDER_STATES,
    PRIORITIES,
    PRIORITY_RANK,
    ROUTINE,
    SCHEDULED,
    ImagingOrder,
)
from pacs.text import fold

_SH = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash: SH/AE-like identifiers
_CS = re.compile(r"^[A-Z0-9 _]{1,16}$")
_GENERATE_ATTEMPTS = 5


@dataclass(frozen=True)
class OrderRecord:
    accession_number: str
    study_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    requested_procedure_id: str
    requested_procedure_description: str
    scheduled_procedure_step_id: str
    scheduled_station_ae_title: str
    scheduled_start_date: str
    scheduled_start_time: str
    modality: str
    scheduled_performing_physician_name: str
    referring_physician_name: str
    state: str
    created_at: datetime | None
    updated_at: datetime | None
    priority: str = ROUTINE
    reason: str = ""
    facility: str = ""
    issuer_of_patient_id: str = ""
    placer_order_number: str = ""
    source: str = ""
    linked_study_instance_uid: str = ""


@dataclass(frozen=True)
class NewOrder:
    """What a caller supplies; identifiers left empty are generated."""

    patient_id: str
    patient_name: str
    modality: str
    station_ae_title: str  # "" = any station (orders from an EMR rarely name one)
    start_date: str  # "" = today
    start_time: str  # "" = now
    procedure_description: str
    accession_number: str = ""
    requested_procedure_id: str = ""
    scheduled_procedure_step_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    referring_physician_name: str = ""
    performing_physician_name: str = ""
    priority: str = ROUTINE  # STAT, URGENT, ROUTINE
    reason: str = ""
    facility: str = ""
    issuer_of_patient_id: str = ""
    placer_order_number: str = ""
    source: str = ""  # api, fhir, hl7, cli


def create_order(session: Session, new: NewOrder) -> OrderRecord:
    """Validate and store a scheduled order; generates the accession number and step ids when not given.

    Raises InvalidInput for a bad value and Conflict for an accession number already in use.
    """
    values = _validated(new)
    given = bool(new.accession_number.strip())
    for _ in range(1 if given else _GENERATE_ATTEMPTS):
        accession = new.accession_number.strip() if given else generate_accession_number()
        row = ImagingOrder(
            accession_number=accession,
            study_instance_uid=generate_uid(prefix=None),  # 2.25.<UUID>: unique without a registered root
            requested_procedure_id=new.requested_procedure_id.strip() or accession,
            scheduled_procedure_step_id=new.scheduled_procedure_step_id.strip() or accession,
            state=SCHEDULED,
            **values,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError as exc:
            if given:
                raise Conflict(f"accession number {accession} is already used") from exc
            continue
        return _record(row)
    raise Conflict("could not generate an unused accession number")  # pragma: no cover - 10^6 per day


def generate_accession_number(today: date | None = None) -> str:
    """YYMMDD and six random digits (12 characters; SH allows 16). Uniqueness is the database's job."""
    return f"{(today or date.today()):%y%m%d}{secrets.randbelow(10**6):06d}"


def list_orders(session: Session, state: str | None = None, scheduled_date: str | None = None,
                station_ae_title: str | None = None, *, patient_id: str | None = None,
                facilities: frozenset[str] | None = None, limit: int | None = None,
                offset: int = 0) -> list[OrderRecord]:
    """Orders by scheduled date and time, optionally filtered (``facilities``: only those facilities' orders)."""
    stmt = select(ImagingOrder).order_by(ImagingOrder.scheduled_start_date, ImagingOrder.scheduled_start_time,
                                         ImagingOrder.accession_number)
    if patient_id:
        stmt = stmt.where(ImagingOrder.patient_id == patient_id.strip())
    if facilities is not None:
        stmt = stmt.where(ImagingOrder.facility.in_(sorted(facilities)))
    if limit is not None:
        stmt = stmt.limit(limit).offset(offset)
    if state:
        if state not in ORDER_STATES:
            raise InvalidInput(f"unknown order state {state!r}: one of {', '.join(ORDER_STATES)}")
        stmt = stmt.where(ImagingOrder.state == state)
    if scheduled_date:
        stmt = stmt.where(ImagingOrder.scheduled_start_date == normalise_date(scheduled_date, "date"))
    if station_ae_title:
        stmt = stmt.where(ImagingOrder.scheduled_station_ae_title == station_ae_title)
    return [_record(r) for r in session.scalars(stmt)]


def get_order(session: Session, accession_number: str) -> OrderRecord:
    return _record(_row(session, accession_number))


def find_order_by_placer(session: Session, placer_order_number: str) -> OrderRecord | None:
    """The order an EMR knows by its own number (HL7 ORC-2, a FHIR identifier), if any."""
    if not placer_order_number.strip():
        return None
    row = session.scalars(select(ImagingOrder).where(
        ImagingOrder.placer_order_number == placer_order_number.strip()).limit(1)).one_or_none()
    return _record(row) if row is not None else None


def order_for_study(session: Session, study_instance_uid: str) -> OrderRecord | None:
    """The order a study fulfils: the one its images were linked to (:func:`link_study`, which checks patient
    and facility), or the one that issued its Study Instance UID. Never by accession number alone."""
    row = session.scalars(select(ImagingOrder).where(or_(
        ImagingOrder.linked_study_instance_uid == study_instance_uid,
        ImagingOrder.study_instance_uid == study_instance_uid)).order_by(ImagingOrder.id).limit(1)).one_or_none()
    return _record(row) if row is not None else None


def link_study(session: Session, study_instance_uid: str, accession_number: str, patient_id: str,
               modality: str, study_date: str, facility: str = "") -> OrderRecord | None:
    """Link a study whose images arrived to its order: by accession number, else by the order's own Study
    Instance UID (the worklist gave it to the modality), else by patient + modality + scheduled date.

    Never across patients or facilities: an order whose patient ID differs from the study's, or whose
    facility is another than the study's (when both have one), is not linked — an accession number typed
    twice at two hospitals must not put one patient's order (procedure, priority) on another's study.
    A scheduled order becomes in progress when its images arrive (MPPS, when the modality sends it, then
    completes or discontinues it). Returns the linked order, or None when no order matches.
    """
    patient_id, facility = patient_id.strip(), facility.strip()
    same_owner = [ImagingOrder.patient_id == patient_id]
    if facility:
        same_owner.append(or_(ImagingOrder.facility == "", ImagingOrder.facility == facility))
    row = None
    if accession_number.strip():
        row = session.scalars(select(ImagingOrder).where(
            ImagingOrder.accession_number == accession_number.strip(), *same_owner).with_for_update()).one_or_none()
    if row is None:
        row = session.scalars(select(ImagingOrder).where(
            ImagingOrder.study_instance_uid == study_instance_uid, *same_owner).with_for_update()).one_or_none()
    if row is None and patient_id and modality.strip() and study_date.strip():
        row = session.scalars(select(ImagingOrder).where(
            *same_owner, ImagingOrder.modality == modality.strip().upper(),
            ImagingOrder.scheduled_start_date == study_date.strip(), ImagingOrder.linked_study_instance_uid == "",
            ImagingOrder.state.in_((SCHEDULED, IN_PROGRESS))).order_by(ImagingOrder.id).limit(1).with_for_update()
        ).one_or_none()
    if row is None:
        return None
    if row.linked_study_instance_uid != study_instance_uid:
        row.linked_study_instance_uid = study_instance_uid
    if row.state == SCHEDULED:
        row.state = IN_PROGRESS
    session.flush()
    return _record(row)


def cancel_order(session: Session, accession_number: str) -> OrderRecord:
    """Discontinue a scheduled or in-progress order: it leaves the worklist. A finished order cannot be."""
    row = _row(session, accession_number, for_update=True)
    if row.state in (COMPLETED, DISCONTINUED):
        raise Conflict(f"order {accession_number} is already {row.state}")
    row.state = DISCONTINUED
    session.flush()
    return _record(row)


def _row(session: Session, accession_number: str, for_update: bool = False) -> ImagingOrder:
    stmt = select(ImagingOrder).where(ImagingOrder.accession_number == accession_number.strip())
    row = session.scalars(stmt.with_for_update() if for_update else stmt).one_or_none()
    if row is None:
        raise NotFound(f"no order with accession number {accession_number}")
    return row


def _validated(new: NewOrder) -> dict[str, str | int]:
    patient_id = new.patient_id.strip()
    if not patient_id or len(patient_id) > 64 or "\\" in patient_id or not patient_id.isprintable():
        raise InvalidInput(f"invalid patient id {new.patient_id!r}: 1-64 printable characters, no backslash")
    for label, value in (("accession number", new.accession_number), ("requested procedure id",
                         new.requested_procedure_id), ("scheduled procedure step id", new.scheduled_procedure_step_id)):
        if value.strip() and not _SH.match(value.strip()):
            raise InvalidInput(f"invalid {label} {value!r}: 1-16 printable ASCII characters, no backslash")
    modality = new.modality.strip().upper()
    if not _CS.match(modality):
        raise InvalidInput(f"invalid modality {new.modality!r} (e.g. CT, MR, CR, DX, US, MG)")
    description = new.procedure_description.strip()
    if not description or len(description) > 64 or "\\" in description or not description.isprintable():
        raise InvalidInput("the procedure description must be 1-64 printable characters, no backslash")
    sex = new.patient_sex.strip().upper()
    if sex not in ("", "M", "F", "O"):
        raise InvalidInput(f"invalid patient sex {new.patient_sex!r}: M, F or O")
    patient_name = person_name(new.patient_name, "patient name", required=True)
    performing = person_name(new.performing_physician_name, "performing physician name")
    priority = normalise_priority(new.priority)
    now = datetime.now()
    reason = new.reason.strip()
    if len(reason) > 1024 or not all(c.isprintable() or c in "\n\t" for c in reason):
        raise InvalidInput("the reason must be at most 1024 printable characters")
    for label, value in (("facility", new.facility), ("issuer of patient id", new.issuer_of_patient_id),
                         ("placer order number", new.placer_order_number)):
        if len(value.strip()) > 64 or "\\" in value or not value.strip().isprintable():
            raise InvalidInput(f"invalid {label} {value!r}: at most 64 printable characters, no backslash")
    return {
        "priority": priority,
        "priority_rank": PRIORITY_RANK[priority],
        "reason": reason,
        "facility": new.facility.strip(),
        "issuer_of_patient_id": new.issuer_of_patient_id.strip(),
        "placer_order_number": new.placer_order_number.strip(),
        "source": new.source.strip()[:16],
        "patient_id": patient_id,
        "patient_name": patient_name,
        "patient_name_search": fold(patient_name),
        "patient_birth_date": normalise_date(new.patient_birth_date, "birth date") if new.patient_birth_date else "",
        "patient_sex": sex,
        "requested_procedure_description": description,
        "scheduled_station_ae_title": _ae(new.station_ae_title) if new.station_ae_title.strip() else "",
        "scheduled_start_date": normalise_date(new.start_date, "date") if new.start_date.strip()
        else f"{now:%Y%m%d}",
        "scheduled_start_time": normalise_time(new.start_time) if new.start_time.strip() else f"{now:%H%M%S}",
        "modality": modality,
        "scheduled_performing_physician_name": performing,
        "scheduled_performing_physician_name_search": fold(performing),
        "referring_physician_name": person_name(new.referring_physician_name, "referring physician name"),
    }


def normalise_priority(value: str) -> str:
    """STAT, URGENT or ROUTINE (case-insensitive; empty = ROUTINE). DICOM's HIGH counts as URGENT."""
    cleaned = (value or "").strip().upper() or ROUTINE
    cleaned = {"HIGH": "URGENT", "ASAP": "URGENT", "S": "STAT", "A": "URGENT", "R": "ROUTINE",
               "MEDIUM": "ROUTINE", "LOW": "ROUTINE"}.get(cleaned, cleaned)
    if cleaned not in PRIORITIES:
        raise InvalidInput(f"invalid priority {value!r}: one of {', '.join(PRIORITIES)}")
    return cleaned


def _ae(title: str) -> str:
    try:
        return validate_ae_title(title)
    except InvalidInput as exc:
        raise InvalidInput(f"station AE title: {exc}") from exc


def person_name(value: str, label: str, required: bool = False) -> str:
    """A DICOM PN as typed (``Family^Given``); at most 3 component groups of 64 characters."""
    value = value.strip()
    if not value:
        if required:
            raise InvalidInput(f"the {label} is required (Family^Given)")
        return ""
    groups = value.split("=")
    if "\\" in value or not value.isprintable() or len(groups) > 3 or any(len(g) > 64 for g in groups):
        raise InvalidInput(f"invalid {label} {value!r}: Family^Given, at most 64 characters, no backslash")
    return value


def normalise_date(value: str, label: str) -> str:
    """YYYYMMDD from YYYYMMDD or YYYY-MM-DD, checked to be a real date."""
    cleaned = value.strip().replace("-", "")
    try:
        datetime.strptime(cleaned, "%Y%m%d")
    except ValueError as exc:
        raise InvalidInput(f"invalid {label} {value!r}: YYYYMMDD") from exc
    if len(cleaned) != 8:
        raise InvalidInput(f"invalid {label} {value!r}: YYYYMMDD")
    return cleaned


def normalise_time(value: str) -> str:
    """HHMMSS from HHMM, HHMMSS, HH:MM or HH:MM:SS (stored at one precision so TM ranges compare as strings)."""
    cleaned = value.strip().replace(":", "")
    if len(cleaned) == 4:
        cleaned += "00"
    if len(cleaned) != 6 or not cleaned.isdigit() or int(cleaned[:2]) > 23 or int(cleaned[2:4]) > 59 \
            or int(cleaned[4:]) > 59:
        raise InvalidInput(f"invalid time {value!r}: HHMM or HHMMSS")
    return cleaned


def _record(row: ImagingOrder) -> OrderRecord:
    return OrderRecord(
        row.accession_number, row.study_instance_uid, row.patient_id, row.patient_name, row.patient_birth_date,
        row.patient_sex, row.requested_procedure_id, row.requested_procedure_description,
        row.scheduled_procedure_step_id, row.scheduled_station_ae_title, row.scheduled_start_date,
        row.scheduled_start_time, row.modality, row.scheduled_performing_physician_name,
        row.referring_physician_name, row.state, row.created_at, row.updated_at, row.priority, row.reason,
        row.facility, row.issuer_of_patient_id, row.placer_order_number, row.source, row.linked_study_instance_uid,
    )

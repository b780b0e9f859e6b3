"""Imaging orders: create, list, get, cancel. Services take a Session; the caller owns the transaction.

There is no HTTP API for orders yet: endpoints that show patient data need authentication,
which comes with the security work (SPEC §7). Today orders come from ``pacs order`` (and, for
their state, from MPPS).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import date, datetime

from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs.aes import validate_ae_title
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.ris.models import COMPLETED, DISCONTINUED, ORDER_STATES, SCHEDULED, ImagingOrder
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


@dataclass(frozen=True)
class NewOrder:
    """What a caller supplies; identifiers left empty are generated."""

    patient_id: str
    patient_name: str
    modality: str
    station_ae_title: str
    start_date: str
    start_time: str
    procedure_description: str
    accession_number: str = ""
    requested_procedure_id: str = ""
    scheduled_procedure_step_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    referring_physician_name: str = ""
    performing_physician_name: str = ""


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
                station_ae_title: str | None = None) -> list[OrderRecord]:
    """Orders by scheduled date and time, optionally filtered."""
    stmt = select(ImagingOrder).order_by(ImagingOrder.scheduled_start_date, ImagingOrder.scheduled_start_time,
                                         ImagingOrder.accession_number)
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


def _validated(new: NewOrder) -> dict[str, str]:
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
    return {
        "patient_id": patient_id,
        "patient_name": patient_name,
        "patient_name_search": fold(patient_name),
        "patient_birth_date": normalise_date(new.patient_birth_date, "birth date") if new.patient_birth_date else "",
        "patient_sex": sex,
        "requested_procedure_description": description,
        "scheduled_station_ae_title": _ae(new.station_ae_title),
        "scheduled_start_date": normalise_date(new.start_date, "date"),
        "scheduled_start_time": normalise_time(new.start_time),
        "modality": modality,
        "scheduled_performing_physician_name": performing,
        "scheduled_performing_physician_name_search": fold(performing),
        "referring_physician_name": person_name(new.referring_physician_name, "referring physician name"),
    }


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
        row.referring_physician_name, row.state, row.created_at, row.updated_at,
    )

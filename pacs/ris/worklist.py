"""Modality Worklist (PS3.4 K.6.1): RIS orders matched against a C-FIND identifier, answered as worklist items.

Which orders a worklist shows: by default only *scheduled* ones. An order whose step a modality has
started (MPPS IN PROGRESS) leaves the list, so that a second modality does not acquire the same
patient again; completed and discontinued orders never appear. A modality that needs its started
items back (after a crash, say) asks for them with Scheduled Procedure Step Status ``STARTED``
(``SCHEDULED\\STARTED`` for both) in the sequence item.

Matching keys (everything else in the identifier is a return key, answered empty when unknown):

- top level: PatientName (PN: case- and diacritic-insensitive), PatientID, PatientBirthDate,
  PatientSex, AccessionNumber, RequestedProcedureID, RequestedProcedureDescription, StudyInstanceUID;
- Scheduled Procedure Step Sequence item: ScheduledStationAETitle, ScheduledProcedureStepStartDate,
  ScheduledProcedureStepStartTime, Modality, ScheduledPerformingPhysicianName,
  ScheduledProcedureStepID, ScheduledProcedureStepDescription, ScheduledProcedureStepStatus.

Sequence matching (C.2.2.2.6) uses the sequence's first item; an empty sequence matches every
order and is answered with a full item. ReferringPhysicianName is returned but not matched on.

Only orders inside the asker's scope are listed (:func:`pacs.ris.scope.order_condition`; for a modality,
:func:`pacs.ae_scope.ae_scope`: its facility's orders, or all for an archive-wide AE).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from sqlalchemy import ColumnElement, false, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from pacs.charset import decode_dataset_text
from pacs.query.matching import InvalidMatchValue, condition, is_universal, person_name
from pacs.ris.models import IN_PROGRESS, SCHEDULED, ImagingOrder
from pacs.ris.scope import order_condition
from pacs.security.principal import UNRESTRICTED, AccessScope

UTF8 = "ISO_IR 192"
SPS_SEQUENCE = "ScheduledProcedureStepSequence"
SPS_STATUS = "ScheduledProcedureStepStatus"
# Order state <-> Scheduled Procedure Step Status (0040,0020). Only these two states are ever listed.
STEP_STATUS = {SCHEDULED: "SCHEDULED", IN_PROGRESS: "STARTED"}
DEFAULT_STATES = (SCHEDULED,)


@dataclass(frozen=True)
class Key:
    """A worklist attribute: its VR, the column it is matched on (None: return key only), where its value is."""

    vr: str
    column: str | None
    attribute: str

    def value(self, order: ImagingOrder) -> str:
        value = getattr(order, self.attribute)
        return STEP_STATUS.get(value, "") if self.attribute == "state" else value


TOP_KEYS: dict[str, Key] = {
    "PatientName": Key("PN", "patient_name_search", "patient_name"),
    "PatientID": Key("LO", "patient_id", "patient_id"),
    "PatientBirthDate": Key("DA", "patient_birth_date", "patient_birth_date"),
    "PatientSex": Key("CS", "patient_sex", "patient_sex"),
    "AccessionNumber": Key("SH", "accession_number", "accession_number"),
    "RequestedProcedureID": Key("SH", "requested_procedure_id", "requested_procedure_id"),
    "RequestedProcedureDescription": Key("LO", "requested_procedure_description", "requested_procedure_description"),
    "StudyInstanceUID": Key("UI", "study_instance_uid", "study_instance_uid"),
    "ReferringPhysicianName": Key("PN", None, "referring_physician_name"),
}

SPS_KEYS: dict[str, Key] = {
    "ScheduledStationAETitle": Key("AE", "scheduled_station_ae_title", "scheduled_station_ae_title"),
    "ScheduledProcedureStepStartDate": Key("DA", "scheduled_start_date", "scheduled_start_date"),
    "ScheduledProcedureStepStartTime": Key("TM", "scheduled_start_time", "scheduled_start_time"),
    "Modality": Key("CS", "modality", "modality"),
    "ScheduledPerformingPhysicianName": Key("PN", "scheduled_performing_physician_name_search",
                                            "scheduled_performing_physician_name"),
    "ScheduledProcedureStepDescription": Key("LO", "requested_procedure_description",
                                             "requested_procedure_description"),
    "ScheduledProcedureStepID": Key("SH", "scheduled_procedure_step_id", "scheduled_procedure_step_id"),
    SPS_STATUS: Key("CS", None, "state"),  # matched by _state_condition
}


def find(session: Session, identifier: Dataset, assume_utf8_for_latin1: bool = True, *,
         scope: AccessScope = UNRESTRICTED) -> list[Dataset]:
    """The worklist items matching ``identifier`` inside ``scope``, by scheduled date and time.

    The identifier's text is decoded in place first with the rule of :mod:`pacs.charset`: a patient
    name sent as UTF-8 under ISO_IR 100 (or no label) is matched as UTF-8 when ``assume_utf8_for_latin1``.
    Raises InvalidMatchValue for a value that cannot be matched (a malformed date range, say).
    """
    decode_dataset_text(identifier, assume_utf8_for_latin1)
    stmt = select(ImagingOrder).where(order_condition(scope), *conditions(identifier)).order_by(
        ImagingOrder.scheduled_start_date, ImagingOrder.scheduled_start_time, ImagingOrder.accession_number)
    return [response(order, identifier) for order in session.scalars(stmt)]


def conditions(identifier: Dataset) -> list[ColumnElement[bool]]:
    """SQL conditions for the identifier's matching keys, the order state included."""
    out: list[ColumnElement[bool]] = []
    out += _key_conditions(identifier, TOP_KEYS)
    item = sequence_item(identifier)
    if item is not None:
        out += _key_conditions(item, SPS_KEYS)
    out.append(_state_condition(query_value(item, SPS_STATUS) if item is not None else None))
    return out


def sequence_item(identifier: Dataset) -> Dataset | None:
    """The Scheduled Procedure Step item to match on (None when the key is absent or has no item)."""
    seq = identifier.get(SPS_SEQUENCE)
    return seq[0] if seq else None


def _key_conditions(ds: Dataset, keys: dict[str, Key]) -> list[ColumnElement[bool]]:
    out = []
    for keyword, key in keys.items():
        if key.column is None:
            continue
        cond = match(getattr(ImagingOrder, key.column), query_value(ds, keyword), key.vr)
        if cond is not None:
            out.append(cond)
    return out


def match(column: InstrumentedAttribute[str], value: str | None, vr: str) -> ColumnElement[bool] | None:
    """One key's condition with pacs.query.matching (None: universal).

    PN values match the folded column; several backslash-separated values match any of them;
    TM values are widened to the precision they were given in (``0900`` is 09:00:00-09:00:59),
    because times are stored as HHMMSS.
    """
    if is_universal(value):
        return None
    assert value is not None
    value = value.strip(" \x00")
    if vr == "PN":
        return person_name(column, value)
    if vr != "UI" and "\\" in value:
        alternatives = [c for v in value.split("\\") if (c := match(column, v, vr)) is not None]
        return or_(*alternatives) if len(alternatives) == len(value.split("\\")) else None
    if vr == "TM" and not any(w in value for w in "*?"):
        value = time_range(value)
    return condition(column, value, vr)


def time_range(value: str) -> str:
    """A TM query value as an HHMMSS range: '0900' -> '090000-090099', '08-1030' -> '080000-103099'."""
    low, sep, high = value.replace(":", "").partition("-")
    if not sep:
        low = high = low
    low, high = low.strip(), high.strip()
    for part in (low, high):
        if part and not part.split(".")[0].isdigit():
            raise InvalidMatchValue(f"not a TM value: {value!r}")
    low = low if "." in low else low.ljust(6, "0")
    high = high if "." in high else high.ljust(6, "9")
    return f"{low}-{high}"


def _state_condition(status: str | None) -> ColumnElement[bool]:
    if is_universal(status):
        return ImagingOrder.state.in_(DEFAULT_STATES)
    assert status is not None
    by_status = {v: k for k, v in STEP_STATUS.items()}
    states = [by_status[s.strip()] for s in status.upper().split("\\") if s.strip() in by_status]
    return ImagingOrder.state.in_(states) if states else false()


def query_value(ds: Dataset, keyword: str) -> str | None:
    """The value of ``keyword`` in a query dataset as a string; None when absent or empty."""
    elem = ds.get(keyword)
    if elem is None or elem == "":
        return None
    if isinstance(elem, MultiValue):
        return "\\".join(str(v) for v in elem)
    if isinstance(elem, bytes):
        return elem.decode("utf-8", "replace")
    return str(elem)


def response(order: ImagingOrder, identifier: Dataset) -> Dataset:
    """The worklist item for ``order``: every key the identifier asked for, in UTF-8."""
    ds = Dataset()
    ds.SpecificCharacterSet = UTF8
    for elem in identifier:
        if elem.keyword in ("SpecificCharacterSet", "QueryRetrieveLevel") or _skipped(elem):
            continue
        if elem.keyword == SPS_SEQUENCE:
            item = sequence_item(identifier)
            ds.ScheduledProcedureStepSequence = Sequence([_sps_item(order, item)])
        else:
            ds.add(_answer(elem, TOP_KEYS.get(elem.keyword), order))
    return ds


def _sps_item(order: ImagingOrder, query_item: Dataset | None) -> Dataset:
    item = Dataset()
    if query_item is None:  # an empty sequence asks for everything we hold
        for keyword, key in SPS_KEYS.items():
            setattr(item, keyword, key.value(order) or None)
        return item
    for elem in query_item:
        if not _skipped(elem):
            item.add(_answer(elem, SPS_KEYS.get(elem.keyword), order))
    return item


def _answer(requested: DataElement, key: Key | None, order: ImagingOrder) -> DataElement:
    if key is not None:
        return DataElement(requested.tag, key.vr, key.value(order) or None)
    return DataElement(requested.tag, requested.VR, Sequence() if requested.VR == "SQ" else None)


def _skipped(elem: DataElement) -> bool:
    """Group lengths and private elements are not return keys."""
    return elem.tag.element == 0 or elem.tag.is_private

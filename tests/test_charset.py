"""The one charset rule (pacs.charset): UTF-8 sent under ISO_IR 100 is read as UTF-8, ISO_IR 192 as
labelled, a genuine Latin-1 name stays Latin-1 — and every reader of received text applies the same rule:
ingest (the index), DICOM JSON metadata, the C-FIND SCP, the worklist and the DIMSE audit."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from dicom_scp import find_service
from pacs import charset
from pacs.audit import dimse as dimse_audit
from pacs.dicomweb.metadata import instance_json
from pacs.ingest.parsing import parse_received
from pacs.ris import worklist
from tests.support.datasets import make_dataset, to_bytes

VIETNAMESE = "Nguyễn^Văn An"
GERMAN = "Müller^Jürgen"
SPS = "ScheduledProcedureStepSequence"

# (label, the bytes sent for the patient name, what the name must read as with the rule on)
CASES = {
    "utf8-under-iso-ir-100": ("ISO_IR 100", VIETNAMESE.encode("utf-8"), VIETNAMESE),
    "utf8-under-iso-ir-192": ("ISO_IR 192", VIETNAMESE.encode("utf-8"), VIETNAMESE),
    "latin1-under-iso-ir-100": ("ISO_IR 100", GERMAN.encode("latin-1"), GERMAN),
}


def _raw(ds: Dataset) -> Dataset:
    """``ds`` as a peer's bytes parse: every element still raw until read (how pynetdicom hands it over)."""
    encoded = encode(ds, False, True)
    assert encoded is not None
    return decode(io.BytesIO(encoded), False, True)


def _identifier(label: str, name: bytes) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = label
    ds.QueryRetrieveLevel = "STUDY"
    ds.add_new(0x00100010, "PN", name)
    ds.StudyInstanceUID = ""
    item = Dataset()
    item.add_new(0x00400006, "PN", name)  # Scheduled Performing Physician's Name, inside a sequence
    ds.ScheduledProcedureStepSequence = [item]
    return _raw(ds)


def _instance(label: str, name: bytes) -> bytes:
    ds = make_dataset(SpecificCharacterSet=label)
    ds.PatientName = "PLACEHOLDER"
    data = to_bytes(ds)
    placeholder = b"PLACEHOLDER" + b" "  # padded to even length
    padded = name + b" " * (len(name) % 2)
    length_field = len(placeholder).to_bytes(2, "little")
    assert data.count(length_field + placeholder) == 1
    return data.replace(length_field + placeholder, len(padded).to_bytes(2, "little") + padded)


# -- the rule itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_the_rule(case: str) -> None:
    label, sent, expected = CASES[case]
    ds = _identifier(label, sent)
    assert charset.assumes_utf8(ds, True) is (label != "ISO_IR 192")
    assert not charset.assumes_utf8(ds, False)
    assert charset.text_of(ds, "PatientName", charset.assumes_utf8(ds, True)) == expected
    decoded = charset.decode_dataset_text(_identifier(label, sent), assume_utf8_for_latin1=True)
    assert str(decoded.PatientName) == expected
    assert str(decoded[SPS][0].ScheduledPerformingPhysicianName) == expected  # items inherit the label


def test_the_setting_off_decodes_as_labelled() -> None:
    ds = charset.decode_dataset_text(_identifier("ISO_IR 100", VIETNAMESE.encode()), assume_utf8_for_latin1=False)
    assert str(ds.PatientName) == VIETNAMESE.encode().decode("latin-1")  # mojibake, as labelled


def test_only_raw_text_with_non_ascii_bytes_is_read_as_utf8() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.add_new(0x00100020, "LO", "PLAIN-ASCII")
    ds.add_new(0x00280010, "US", 512)
    raw = _raw(ds)
    assert charset.utf8_text(raw.get_item(0x00100020)) is None  # ASCII: nothing to decide
    assert charset.utf8_text(raw.get_item(0x00280010)) is None  # not text
    multi = Dataset()
    multi.SpecificCharacterSet = "ISO_IR 100"
    multi.add_new(0x00080080, "LO", "Bệnh viện\\Khoa".encode())
    decoded = charset.decode_dataset_text(_raw(multi), True)
    assert list(decoded.InstitutionName) == ["Bệnh viện", "Khoa"]  # a backslash separates LO values


# -- every reader applies it -------------------------------------------------------------------------


READERS: dict[str, Callable[[str, bytes], str]] = {
    "index": lambda label, sent: parse_received(_instance(label, sent), max_bytes=10**7,
                                                assume_utf8_for_latin1=True).patient["patient_name"],
    "metadata": lambda label, sent: instance_json(_raw(_instance_dataset(label, sent)), "1.2", "1.3", "1.4",
                                                  assume_utf8_for_latin1=True)["00100010"]["Value"][0]["Alphabetic"],
    "c-find": lambda label, sent: find_service.read_identifier(_identifier(label, sent), True)
    .filters["PatientName"],
    "worklist": lambda label, sent: worklist.query_value(
        charset.decode_dataset_text(_identifier(label, sent), True), "PatientName") or "",
    "audit": lambda label, sent: dict(dimse_audit.identifier_keys(_identifier(label, sent), True)[0])["PatientName"],
}


def _instance_dataset(label: str, sent: bytes) -> Dataset:
    from pydicom import dcmread

    return dcmread(io.BytesIO(_instance(label, sent)))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", CASES)
def test_every_reader_applies_the_same_rule(reader: str, case: str) -> None:
    label, sent, expected = CASES[case]
    assert READERS[reader](label, sent) == expected


def test_worklist_matches_a_utf8_name_sent_under_latin1() -> None:
    """pacs.ris.worklist decodes the identifier with the rule before it reads a matching key."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from pacs.db.models import Base
    from pacs.ris.orders import NewOrder, create_order

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        accession = create_order(session, NewOrder(
            patient_id="P1", patient_name=VIETNAMESE, modality="CT", station_ae_title="CT01", start_date="20261128",
            start_time="0900", procedure_description="CT CHEST")).accession_number
        for label, sent in (("ISO_IR 100", VIETNAMESE.encode()), ("ISO_IR 192", VIETNAMESE.encode())):
            identifier = Dataset()
            identifier.SpecificCharacterSet = label
            identifier.add_new(0x00100010, "PN", sent)
            identifier.AccessionNumber = ""
            found = worklist.find(session, _raw(identifier), assume_utf8_for_latin1=True)
            assert [item.AccessionNumber for item in found] == [accession], label
        identifier = Dataset()
        identifier.SpecificCharacterSet = "ISO_IR 100"
        identifier.add_new(0x00100010, "PN", VIETNAMESE.encode())
        assert worklist.find(session, _raw(identifier), assume_utf8_for_latin1=False) == []  # read as labelled

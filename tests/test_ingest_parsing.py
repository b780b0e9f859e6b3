"""Parsing received bytes: what each kind of bad input gets, and how text is decoded (pure logic)."""

from __future__ import annotations

import pytest

from pacs.ingest.parsing import ObjectRejected, RejectReason, parse_received
from pacs.text import fold
from tests.support.corpus import corpus_files
from tests.support.datasets import dataset_bytes, make_dataset, make_instance, to_bytes

MAX = 64 * 1024 * 1024


def _reject(data: bytes, **kw) -> ObjectRejected:
    with pytest.raises(ObjectRejected) as info:
        parse_received(data, max_bytes=kw.pop("max_bytes", MAX), **kw)
    return info.value


def test_valid_object_is_identified_and_bytes_kept() -> None:
    data = make_instance(PatientID="X1", AccessionNumber="A-9")
    obj = parse_received(data, max_bytes=MAX)
    assert obj.data == data
    assert obj.patient["patient_id"] == "X1"
    assert obj.study["accession_number"] == "A-9"
    assert obj.transfer_syntax_uid == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("bad_uid", ["../../etc", "1.2.abc", "1.2..3", ".1.2", "1.2.", "1" * 65, "1.2/3", "1.2 3"])
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_path_like_or_malformed_uid_is_refused(keyword: str, bad_uid: str) -> None:
    ds = make_dataset()
    setattr(ds, keyword, bad_uid)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    err = _reject(to_bytes(ds))
    assert err.reason is RejectReason.INVALID_UID
    assert keyword in err.message


@pytest.mark.parametrize("cut", [10, 200, 400])
def test_truncated_object_is_refused(cut: int) -> None:
    data = make_instance()
    err = _reject(data[:-cut])
    assert err.reason in (RejectReason.TRUNCATED, RejectReason.NOT_DICOM)
    assert "truncated" in err.message


def test_non_dicom_bytes_are_refused() -> None:
    err = _reject(b"%PDF-1.7 this is a PDF, not an image\n" * 20)
    assert err.reason is RejectReason.NOT_DICOM
    assert "not a DICOM object" in err.message


def test_tiny_and_oversized_inputs_are_refused() -> None:
    assert _reject(b"DICM").reason is RejectReason.NOT_DICOM
    data = make_instance()
    assert _reject(data, max_bytes=len(data) - 1).reason is RejectReason.TOO_LARGE


def test_missing_identity_is_refused() -> None:
    ds = make_dataset()
    del ds.StudyInstanceUID
    err = _reject(to_bytes(ds))
    assert err.reason is RejectReason.MISSING_ATTRIBUTE
    assert "StudyInstanceUID" in err.message


def test_c_store_request_mismatch_is_refused() -> None:
    err = _reject(make_instance(), expected_sop_instance_uid="1.2.3.4")
    assert err.reason is RejectReason.MISMATCH


def test_bare_dataset_gets_file_meta_and_keeps_its_bytes() -> None:
    part10 = make_instance()
    bare = dataset_bytes(part10)
    obj = parse_received(bare, max_bytes=MAX)
    assert obj.data[128:132] == b"DICM"
    assert dataset_bytes(obj.data) == bare


def test_vietnamese_utf8_name_is_decoded_exactly() -> None:
    obj = parse_received(make_instance(PatientName="Nguyễn^Văn An"), max_bytes=MAX)
    assert obj.patient["patient_name"] == "Nguyễn^Văn An"
    assert obj.patient["patient_name_search"] == "NGUYEN^VAN AN"


def test_utf8_sent_under_iso_ir_100_label_is_read_as_utf8() -> None:
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100")
    ds.PatientName = "PLACEHOLDER^XYZAB"  # 16 bytes, like the UTF-8 encoding below
    data = to_bytes(ds).replace(b"PLACEHOLDER^XYZAB ", "Trần^Thị Hà".encode() + b"  ")
    assert "Trần^Thị Hà".encode() in data
    obj = parse_received(data, max_bytes=MAX)
    assert obj.patient["patient_name"] == "Trần^Thị Hà"


def test_real_latin1_is_kept_as_latin1() -> None:
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Zoë")
    obj = parse_received(to_bytes(ds), max_bytes=MAX)
    assert obj.patient["patient_name"] == "Müller^Zoë"
    assert obj.patient["patient_name_search"] == "MULLER^ZOE"


@pytest.mark.parametrize(("text", "folded"), [
    ("Nguyễn Văn An", "NGUYEN VAN AN"), ("Đặng Thị Ánh", "DANG THI ANH"), ("nguyen", "NGUYEN"),
    ("Lê Hoàng Ước", "LE HOANG UOC"),
])
def test_fold_removes_vietnamese_diacritics(text: str, folded: str) -> None:
    assert fold(text) == folded


def test_every_corpus_file_is_accepted_or_refused_with_a_reason() -> None:
    """The whole pydicom corpus through the parser: never an unexpected exception."""
    accepted = refused = 0
    for path in corpus_files():
        try:
            parse_received(path.read_bytes(), max_bytes=MAX)
            accepted += 1
        except ObjectRejected as exc:
            assert exc.message and exc.reason in RejectReason
            refused += 1
    assert accepted > 100 and refused > 10

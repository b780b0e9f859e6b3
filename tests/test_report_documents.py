"""What a signed report becomes: the TID 2000 SR, the key-image KOS and the PDF.

No server is needed, but the validators are real: Debian's ``dciodvfy`` checks every DICOM object
we build (after a round trip through bytes) and poppler's ``pdftotext`` reads the PDF back.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage, generate_uid

from pacs.errors import InvalidInput, PacsError
from pacs.reports.document import ReportDocument
from pacs.reports.key_images import build_key_object_selection
from pacs.reports.pdf import FONT_DIR_ENV, LABELS, ReportFontMissing, display_name, render_report_pdf
from pacs.reports.sr import build_report_sr, report_text_from_sr

FINDINGS = (
    "Không thấy tổn thương khu trú. Gan lách bình thường.\nThận hai bên kích thước bình thường.\n\n  Dòng thụt lề."
)
IMPRESSION = "Chưa phát hiện bất thường trên CT bụng.\nĐề nghị theo dõi."
SIGNED_AT = datetime(2025, 3, 5, 7, 30, 15, tzinfo=UTC)  # 14:30:15 in Ho Chi Minh City
SIGNER = "Trần Thị Bích"
FACILITY = "Bệnh viện Đa khoa Tỉnh"


@pytest.fixture()
def evidence() -> list[Dataset]:
    """Two instances of one CT study (read without pixel data), patient named in Vietnamese."""
    ds = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Nguyễn^Văn An"
    second = copy.deepcopy(ds)
    second.SOPInstanceUID = generate_uid()
    second.InstanceNumber = 2
    return [ds, second]


def other_study_instance(evidence: list[Dataset]) -> Dataset:
    other = copy.deepcopy(evidence[0])
    other.StudyInstanceUID = generate_uid()
    other.SeriesInstanceUID = generate_uid()
    other.SOPInstanceUID = generate_uid()
    return other


def make_doc(evidence: list[Dataset], **changes: object) -> ReportDocument:
    ds = evidence[0]
    doc = ReportDocument(
        report_id=42, version=1, status="final", findings=FINDINGS, impression=IMPRESSION, language="vi",
        author="bich", author_name=SIGNER, signed_by="bich", signed_by_name=SIGNER, signed_at=SIGNED_AT,
        amend_reason="", created_at=datetime(2025, 3, 5, 7, 0, tzinfo=UTC),
        study_instance_uid=str(ds.StudyInstanceUID), accession_number="ACC0001", patient_id=str(ds.PatientID),
        issuer_of_patient_id="", patient_name="Nguyễn^Văn An", patient_birth_date="19600102", patient_sex="M",
        study_date="20040119", study_time="072730", study_description="CT bụng", modalities=("CT",),
        referring_physician_name="Lê^Văn Cường", procedure="CT bụng có tiêm thuốc cản quang", facility="BVT",
        facility_name=FACILITY,
    )
    return dataclasses.replace(doc, **changes)  # type: ignore[arg-type]


def write_and_validate(ds: Dataset, path: Path) -> Dataset:
    """Write as a Part 10 file, run dciodvfy (no ``Error`` line allowed), and read the bytes back."""
    dcmwrite(path, ds, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "dciodvfy errors:\n" + "\n".join(lines)
    return dcmread(BytesIO(path.read_bytes()))


def content_items(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(content_items(item))
    return out


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def build_sr(doc: ReportDocument, evidence: list[Dataset], **kwargs: object) -> Dataset:
    return build_report_sr(doc, evidence, series_instance_uid="1.2.826.0.1.3680043.8.498.1",
                           sop_instance_uid="1.2.826.0.1.3680043.8.498.2", **kwargs)  # type: ignore[arg-type]


# --- SR ----------------------------------------------------------------------------------------


def test_final_sr_is_valid_and_round_trips(evidence: list[Dataset], tmp_path: Path) -> None:
    doc = make_doc(evidence)
    sr = write_and_validate(build_sr(doc, evidence, institution_name=FACILITY), tmp_path / "sr.dcm")

    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert report_text_from_sr(sr) == (FINDINGS, IMPRESSION)
    # Patient and study come from the evidence, not from the report.
    source = evidence[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "StudyID"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert str(sr.PatientName) == "Nguyễn^Văn An"
    assert sr.Modality == "SR"
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9901, 1)
    referenced = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in evidence}

    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    verifier = sr.VerifyingObserverSequence[0]
    assert str(verifier.VerifyingObserverName) == f"{SIGNER}^"
    assert verifier.VerifyingOrganization == FACILITY
    assert verifier.VerificationDateTime == "20250305143015+0700"
    assert (sr.ContentDate, sr.ContentTime) == ("20250305", "143015")
    assert "PredecessorDocumentsSequence" not in sr

    # TID 2000: root title, template, language, person observer, sections.
    assert concept(sr) == ("18748-4", "LN")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    items = content_items(sr)
    by_concept = {concept(item): item for item in items}
    language = by_concept[("121049", "DCM")]
    assert language.RelationshipType == "HAS CONCEPT MOD"
    assert language.ConceptCodeSequence[0].CodeValue == "vi-VN"
    assert by_concept[("121005", "DCM")].ConceptCodeSequence[0].CodeValue == "121006"
    assert str(by_concept[("121008", "DCM")].PersonName) == f"{SIGNER}^"
    assert by_concept[("121070", "DCM")].ValueType == "CONTAINER"
    assert by_concept[("121071", "DCM")].TextValue == FINDINGS
    assert by_concept[("121073", "DCM")].TextValue == IMPRESSION
    assert ("121078", "DCM") not in by_concept  # no addendum unless amended


def test_rebuilding_the_same_version_gives_the_same_content(evidence: list[Dataset]) -> None:
    doc = make_doc(evidence)
    first, second = build_sr(doc, evidence), build_sr(doc, evidence)
    for keyword in ("ContentDate", "ContentTime", "ContentSequence", "VerifyingObserverSequence",
                    "CurrentRequestedProcedureEvidenceSequence"):
        assert first[keyword] == second[keyword], keyword


def test_amended_sr_names_its_predecessor_and_reason(evidence: list[Dataset], tmp_path: Path) -> None:
    previous = ("1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11", ComprehensiveSRStorage)
    doc = make_doc(evidence, status="amended", version=2, amend_reason="Bổ sung: nang thận trái 5 mm.",
                   impression="Nang thận trái nhỏ.")
    sr = write_and_validate(build_sr(doc, evidence, predecessor=previous), tmp_path / "amended.dcm")

    assert report_text_from_sr(sr) == (FINDINGS, "Nang thận trái nhỏ.")
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
    predecessor = sr.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == evidence[0].StudyInstanceUID
    series = predecessor.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == previous[0]
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous[1]
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == previous[2]
    by_concept = {concept(item): item for item in content_items(sr)}
    assert by_concept[("121078", "DCM")].ValueType == "CONTAINER"
    assert by_concept[("111021", "DCM")].TextValue == "Bổ sung: nang thận trái 5 mm."


def test_preliminary_sr_is_unverified(evidence: list[Dataset], tmp_path: Path) -> None:
    doc = make_doc(evidence, status="preliminary", signed_by="", signed_by_name="", signed_at=None, language="en",
                   author_name="Phạm Minh Đức", findings="No focal lesion.", impression="Normal study.")
    sr = write_and_validate(build_sr(doc, evidence), tmp_path / "preliminary.dcm")

    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in sr
    assert (sr.ContentDate, sr.ContentTime) == ("20250305", "140000")  # created_at, local time
    by_concept = {concept(item): item for item in content_items(sr)}
    assert str(by_concept[("121008", "DCM")].PersonName) == "Phạm Minh Đức^"
    assert by_concept[("121049", "DCM")].ConceptCodeSequence[0].CodeValue == "en-US"
    assert report_text_from_sr(sr) == ("No focal lesion.", "Normal study.")


def test_sr_from_latin1_evidence_keeps_vietnamese_text(evidence: list[Dataset], tmp_path: Path) -> None:
    """Many modalities send ISO_IR 100; the SR is UTF-8 whatever the evidence used."""
    latin = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Müller^José"
    raw = BytesIO()
    dcmwrite(raw, latin, enforce_file_format=True)
    latin = dcmread(BytesIO(raw.getvalue()))
    doc = make_doc([latin])
    sr = write_and_validate(build_sr(doc, [latin]), tmp_path / "latin.dcm")
    assert str(sr.PatientName) == "Müller^José"
    assert report_text_from_sr(sr) == (FINDINGS, IMPRESSION)


def test_sr_refuses_evidence_of_another_study_only(evidence: list[Dataset]) -> None:
    doc = make_doc(evidence)
    with pytest.raises(InvalidInput, match="belongs to the report's study"):
        build_sr(doc, [other_study_instance(evidence)])
    with pytest.raises(InvalidInput):
        build_sr(dataclasses.replace(doc, status="draft"), evidence)
    with pytest.raises(InvalidInput):
        build_sr(doc, evidence, predecessor=("1.2.3", "not a uid", ComprehensiveSRStorage))


def test_sr_records_comparison_studies_as_other_evidence(evidence: list[Dataset], tmp_path: Path) -> None:
    prior = other_study_instance(evidence)
    sr = write_and_validate(build_sr(make_doc(evidence), [prior, *evidence]), tmp_path / "with-prior.dcm")
    assert sr.StudyInstanceUID == evidence[0].StudyInstanceUID
    assert sr.PertinentOtherEvidenceSequence[0].StudyInstanceUID == prior.StudyInstanceUID


# --- KOS ---------------------------------------------------------------------------------------


def selection(ds: Dataset) -> tuple[str, str, str]:
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)


def test_key_object_selection_is_valid_and_references_the_selection(evidence: list[Dataset], tmp_path: Path) -> None:
    ko = build_key_object_selection(
        evidence, [selection(evidence[1]), selection(evidence[0]), selection(evidence[1])],
        series_instance_uid="1.2.826.0.1.3680043.8.498.3", sop_instance_uid="1.2.826.0.1.3680043.8.498.4",
        description="Ảnh khối u gan",
    )
    ko = write_and_validate(ko, tmp_path / "ko.dcm")

    assert ko.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert (ko.Modality, ko.SeriesNumber) == ("KO", 9902)
    assert concept(ko) == ("113000", "DCM")
    assert ko.StudyInstanceUID == evidence[0].StudyInstanceUID
    assert str(ko.PatientName) == "Nguyễn^Văn An"
    items = content_items(ko)
    refs = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in items if item.ValueType == "IMAGE"]
    assert refs == [evidence[1].SOPInstanceUID, evidence[0].SOPInstanceUID]  # in order, once each
    assert [item.TextValue for item in items if item.ValueType == "TEXT"] == ["Ảnh khối u gan"]
    listed = {
        ref.ReferencedSOPInstanceUID
        for series in ko.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert listed == set(refs)


def test_key_object_selection_refuses_instances_outside_the_study(evidence: list[Dataset]) -> None:
    other = other_study_instance(evidence)
    uids = {"series_instance_uid": "1.2.826.0.1.3680043.8.498.5", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.6"}
    with pytest.raises(InvalidInput, match="belongs to study"):
        build_key_object_selection([*evidence, other], [selection(evidence[0]), selection(other)], **uids)
    with pytest.raises(InvalidInput, match="not among the evidence"):
        build_key_object_selection(evidence, [selection(other)], **uids)
    with pytest.raises(InvalidInput):
        build_key_object_selection(evidence, [], **uids)


# --- PDF ---------------------------------------------------------------------------------------


def pdf_text(pdf: bytes, tmp_path: Path, name: str = "report.pdf") -> str:
    assert pdf.startswith(b"%PDF-")
    path = tmp_path / name
    path.write_bytes(pdf)
    result = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pdf_in_vietnamese(evidence: list[Dataset], tmp_path: Path) -> None:
    findings = FINDINGS + "\n<b>x</b> **y** __z__ {nb} \\n"
    text = pdf_text(render_report_pdf(make_doc(evidence, findings=findings)), tmp_path)

    assert "Nguyễn Văn An" in text
    assert "Không thấy tổn thương khu trú. Gan lách bình thường." in text
    assert "Thận hai bên kích thước bình thường." in text
    for line in IMPRESSION.splitlines():
        assert line in text
    assert SIGNER in text
    assert FACILITY in text
    assert "<b>x</b> **y** __z__ {nb} \\n" in text  # plain text, never markup
    labels = LABELS["vi"]
    for key in ("title", "patient_name", "patient_id", "birth_date", "sex", "procedure", "modality", "study_date",
                "accession", "referring", "findings", "impression", "signed_by", "signed_at", "report"):
        assert labels[key] in text, key
    assert labels["title"] == "KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH"
    assert "02/01/1960" in text and "Nam" in text and "19/01/2004" in text
    assert "ACC0001" in text and "Lê Văn Cường" in text and "CT bụng có tiêm thuốc cản quang" in text
    assert "05/03/2025 14:30" in text  # signed_at in Asia/Ho_Chi_Minh
    assert "Mã kết quả 42, phiên bản 1" in text and "Trang 1/1" in text
    assert LABELS["vi"]["preliminary"] not in text and LABELS["vi"]["amended"] not in text


def test_pdf_in_english(evidence: list[Dataset], tmp_path: Path) -> None:
    text = pdf_text(render_report_pdf(make_doc(evidence), language="en"), tmp_path)
    for key in ("title", "patient_name", "birth_date", "sex", "findings", "impression", "signed_by"):
        assert LABELS["en"][key] in text, key
    assert "DIAGNOSTIC IMAGING REPORT" in text and "Male" in text and "Page 1 of 1" in text
    assert LABELS["vi"]["title"] not in text
    assert "Nguyễn Văn An" in text  # the report's words are not translated
    with pytest.raises(ValueError):
        render_report_pdf(make_doc(evidence), language="fr")


def test_pdf_marks_amended_and_preliminary(evidence: list[Dataset], tmp_path: Path) -> None:
    amended = make_doc(evidence, status="amended", version=3, amend_reason="Sửa kích thước nang.")
    text = pdf_text(render_report_pdf(amended), tmp_path, "amended.pdf")
    assert "ĐÃ SỬA ĐỔI / AMENDED" in text
    assert "Lý do sửa đổi: Sửa kích thước nang." in text
    assert "phiên bản 3" in text

    preliminary = make_doc(evidence, status="preliminary", signed_by="", signed_by_name="", signed_at=None)
    text = pdf_text(render_report_pdf(preliminary), tmp_path, "preliminary.pdf")
    assert "SƠ BỘ / PRELIMINARY" in text
    assert LABELS["vi"]["preliminary_note"] in text
    assert SIGNER in text  # the author, as "reported by"
    text = pdf_text(render_report_pdf(preliminary, language="en"), tmp_path, "preliminary-en.pdf")
    assert "PRELIMINARY" in text


def test_long_findings_make_a_multi_page_pdf(evidence: list[Dataset], tmp_path: Path) -> None:
    lines = [f"Dòng {n}: nhu mô gan đồng nhất, không thấy khối khu trú." for n in range(1, 201)]
    lines.append("Một từ-rất-dài-" + "x" * 300)
    doc = make_doc(evidence, findings="\n".join(lines))
    text = pdf_text(render_report_pdf(doc), tmp_path)
    pages = text.count("\f")
    assert pages > 1
    assert lines[0] in text and lines[-2] in text
    assert "Dòng 200: nhu mô gan đồng nhất, không thấy khối khu trú." in text
    assert f"Trang 1/{pages}" in text and f"Trang {pages}/{pages}" in text
    assert text.rindex(LABELS["vi"]["impression"]) > text.rindex("Dòng 200")
    assert text.count(LABELS["vi"]["title"]) == pages  # header on every page


def test_pdf_metadata_and_same_bytes_for_the_same_version(evidence: list[Dataset], tmp_path: Path) -> None:
    doc = make_doc(evidence)
    pdf = render_report_pdf(doc)
    assert render_report_pdf(doc) == pdf
    path = tmp_path / "meta.pdf"
    path.write_bytes(pdf)
    info = subprocess.run(["pdfinfo", "-isodates", str(path)], capture_output=True, text=True, timeout=60).stdout
    assert f"Author:          {SIGNER}" in info
    assert "Title:           KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH" in info
    assert "CreationDate:    2025-03-05T07:30:15Z" in info or "CreationDate:    2025-03-05T07:30:15+00" in info
    assert "Page size:" in info and "A4" in info


def test_missing_font_is_a_clear_error(evidence: list[Dataset], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FONT_DIR_ENV, str(tmp_path))
    with pytest.raises(ReportFontMissing, match=FONT_DIR_ENV) as caught:
        render_report_pdf(make_doc(evidence))
    assert isinstance(caught.value, PacsError)


def test_display_name() -> None:
    assert display_name("Nguyễn^Văn An") == "Nguyễn Văn An"
    assert display_name("Smith^John^Q^Dr^Jr") == "Smith John Q"
    assert display_name("Lê^Văn=レ^ヴァン") == "Lê Văn"
    assert display_name("") == ""

"""HL7 v2 messages without servers: ORM^O01 → orders, ACKs, ORU^R01 from a report, MLLP framing.

What we build is parsed back with the other library (python-hl7), so a quirk of hl7apy cannot hide
behind a round trip through itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacs.hl7 import messages as m
from pacs.hl7.mllp import (
    FrameTooLarge,
    MllpError,
    MllpTimeout,
    frame,
    parse_address,
    read_frame,
    skip_frame,
)
from pacs.hl7.outbound import control_id_for
from pacs.jobs import retry_delay
from pacs.reports.document import ReportDocument
from pacs.ris.orders import NewOrder

MSH = "MSH|^~\\&|HIS|BVDK_HUE|PACS|RAD|20261128083000+0700||ORM^O01^ORM_O01|{cid}|P|{ver}|||AL|NE|VNM|{charset}"


def seg(name: str, fields: dict[int, str]) -> str:
    """One ER7 segment from {field number: raw ER7 value} (test input, written by hand on purpose)."""
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


def orm(*segments: str, cid: str = "MSG00001", ver: str = "2.5.1", charset: str = "UNICODE UTF-8") -> str:
    return "\r".join([MSH.format(cid=cid, ver=ver, charset=charset), *segments])


PID = seg("PID", {1: "1", 3: "CMND0123^^^BCA^NI~BN123456^^^BVHUE&2.16.840.1.113883.3.999&ISO^MR",
                  5: "Nguyễn^Văn An^Thị~NGUYEN^VAN AN", 7: "19800215", 8: "M",
                  11: "12 Lê Lợi^^Huế^^^VNM"})
PV1 = seg("PV1", {1: "1", 2: "O", 3: "KHAM^^^BVHUE"})
ORC_NW = seg("ORC", {1: "NW", 2: "PLC1001^HIS", 3: "ACC2026001", 5: "SC", 7: "^^^20261128090000^^S",
                     9: "20261128083000", 12: "BS123^Trần^Bình^Quốc^^TS.", 16: "^Theo dõi u phổi"})
OBR_NW = seg("OBR", {1: "1", 2: "PLC1001^HIS", 4: "CTCHEST^CT ngực có cản quang^L", 7: "20261128091500",
                     16: "BS999^Lê^Cường", 24: "CT", 27: "^^^^^S", 31: "^Ho kéo dài~^Sốt về chiều"})


def new_order(text: str, **kw: str) -> NewOrder:
    parsed = m.parse_orm(text, **kw)
    assert len(parsed.items) == 1
    item = parsed.items[0]
    assert isinstance(item, NewOrder)
    return item


def parse_bytes(data: bytes) -> m.OrmMessage:
    header = m.read_header(data)
    m.check_supported(header)
    return m.parse_orm(m.decode_text(data, header))


# -- ORM^O01 → NewOrder ---------------------------------------------------------------------------


def test_realistic_orm_maps_every_field() -> None:
    data = orm(PID, PV1, ORC_NW, OBR_NW).encode("utf-8")
    parsed = parse_bytes(data)
    assert parsed.header == m.Header("HIS", "BVDK_HUE", "PACS", "RAD", "MSG00001", "P", "2.5.1", "ORM", "O01",
                                     "UNICODE UTF-8")
    assert parsed.patient_id == "BN123456"
    (order,) = parsed.items
    assert order == NewOrder(
        patient_id="BN123456",  # the PID-3 repetition typed MR, not the national id before it
        issuer_of_patient_id="BVHUE",
        patient_name="Nguyễn^Văn An^Thị",  # diacritics exact, first XPN repetition
        patient_birth_date="19800215", patient_sex="M",
        modality="CT", station_ae_title="", start_date="20261128", start_time="090000",  # ORC-7.4 before OBR-7
        procedure_description="CT ngực có cản quang", accession_number="ACC2026001",
        placer_order_number="PLC1001", referring_physician_name="Trần^Bình^Quốc^TS.",  # ORC-12 before OBR-16
        priority="STAT", reason="Ho kéo dài; Sốt về chiều; Theo dõi u phổi", facility="BVDK_HUE", source="hl7",
    )


def test_default_facility_setting_wins_over_msh4() -> None:
    assert new_order(orm(PID, ORC_NW, OBR_NW), default_facility="BV_TINH").facility == "BV_TINH"


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.6"])
def test_older_and_newer_versions_map_the_same(version: str) -> None:
    order = new_order(orm(PID, ORC_NW, OBR_NW, ver=version))
    assert (order.patient_id, order.patient_name, order.accession_number, order.procedure_description,
            order.priority) == ("BN123456", "Nguyễn^Văn An^Thị", "ACC2026001", "CT ngực có cản quang", "STAT")


def test_accession_number_falls_back_to_obr18_then_obr3_then_none() -> None:
    orc = seg("ORC", {1: "NW", 2: "P1"})
    obr18 = seg("OBR", {1: "1", 2: "P1", 3: "FILL3", 4: "X^Chụp X", 18: "ACC18"})
    obr3 = seg("OBR", {1: "1", 2: "P1", 3: "FILL3", 4: "X^Chụp X"})
    bare = seg("OBR", {1: "1", 2: "P1", 4: "X^Chụp X"})
    assert new_order(orm(PID, orc, obr18)).accession_number == "ACC18"
    assert new_order(orm(PID, orc, obr3)).accession_number == "FILL3"
    assert new_order(orm(PID, orc, bare)).accession_number == ""  # the order service generates one


@pytest.mark.parametrize(("obr_fields", "modality"), [
    ({24: "MR"}, "MR"),  # a DICOM modality as it is
    ({24: "NMR"}, "MR"),  # HL7 table 0074
    ({24: "RUS"}, "US"),
    ({24: "RAD", 4: "MRBRAIN^MRI sọ não"}, "MR"),  # section says nothing: the code's prefix
    ({4: "US-ABD^Siêu âm bụng"}, "US"),
    ({4: "PETCT01^PET/CT"}, "PT"),
    ({4: "XRCHEST^X quang ngực"}, "CR"),
    ({4: "12345^Thủ thuật"}, "OT"),  # nothing to go on: OT
])
def test_modality_mapping(obr_fields: dict[int, str], modality: str) -> None:
    obr = seg("OBR", {1: "1", 4: "ABC^Thủ thuật", **obr_fields})
    assert new_order(orm(PID, seg("ORC", {1: "NW", 2: "P1"}), obr)).modality == modality


@pytest.mark.parametrize(("orc7", "tq1", "obr27", "priority"), [
    ("^^^^^S", "", "", "STAT"),
    ("", "A^ASAP^HL70485", "", "URGENT"),
    ("", "", "^^^^^R", "ROUTINE"),
    ("", "", "", "ROUTINE"),
    ("^^^^^A", "S", "^^^^^R", "URGENT"),  # ORC-7 first
])
def test_priority_mapping(orc7: str, tq1: str, obr27: str, priority: str) -> None:
    segments = [PID, seg("ORC", {1: "NW", 2: "P1", 7: orc7}), seg("OBR", {1: "1", 4: "X^Y", 27: obr27})]
    if tq1:
        segments.append(seg("TQ1", {1: "1", 9: tq1}))
    assert new_order(orm(*segments)).priority == priority


def test_tq1_start_time_and_unknown_priority() -> None:
    segments = [PID, seg("ORC", {1: "NW", 2: "P1"}), seg("OBR", {1: "1", 4: "X^Y", 7: "20261201080000"}),
                seg("TQ1", {1: "1", 7: "202612021430"})]
    order = new_order(orm(*segments))
    assert (order.start_date, order.start_time) == ("20261202", "1430")
    with pytest.raises(m.Hl7Error) as err:
        m.parse_orm(orm(PID, seg("ORC", {1: "NW", 7: "^^^^^Q"}), seg("OBR", {1: "1", 4: "X^Y"})))
    assert err.value.ack_code == "AE" and err.value.code == m.TABLE_VALUE_NOT_FOUND and "Q" in err.value.message


def test_escaped_values_are_unescaped() -> None:
    pid = seg("PID", {3: "P\\T\\1", 5: "Trần\\S\\x^Thị \\F\\ Hoa", 7: "1990", 8: "U"})
    obr = seg("OBR", {1: "1", 4: "X^CT \\E\\ sọ", 31: "^dòng 1\\.br\\dòng 2 \\X41\\"})
    order = new_order(orm(pid, seg("ORC", {1: "NW"}), obr))
    assert order.patient_id == "P&1"
    assert order.patient_name == "Trần^x^Thị | Hoa"  # a literal ^ arrives in the family name (the service refuses
    # such a PN; that is its call)
    assert order.patient_birth_date == ""  # year only: not a DICOM date
    assert order.patient_sex == ""  # U
    assert order.procedure_description == "CT \\ sọ"
    assert order.reason == "dòng 1\ndòng 2 A"


def test_latin1_charset_is_decoded_as_latin1() -> None:
    text = orm(seg("PID", {3: "P1", 5: "Müller^José"}), seg("ORC", {1: "NW", 2: "P1"}),
               seg("OBR", {1: "1", 4: "XR^Röntgen Thorax"}), charset="8859/1")
    parsed = parse_bytes(text.encode("latin-1"))
    assert parsed.items[0].patient_name == "Müller^José"  # type: ignore[union-attr]


@pytest.mark.parametrize("control", ["CA", "OC", "DC"])
def test_cancel_requests(control: str) -> None:
    text = orm(PID, seg("ORC", {1: control, 2: "PLC1001", 3: "ACC2026001"}), seg("OBR", {1: "1", 4: "X^Y"}))
    assert m.parse_orm(text).items == (m.CancelRequest(control, "ACC2026001", "PLC1001"),)
    placer_only = orm(seg("ORC", {1: control, 2: "PLC1001"}))  # no PID needed to cancel
    assert m.parse_orm(placer_only).items == (m.CancelRequest(control, "", "PLC1001"),)
    with pytest.raises(m.Hl7Error, match="no order to cancel"):
        m.parse_orm(orm(seg("ORC", {1: control, 5: "CA"})))


def test_several_order_groups_in_one_message() -> None:
    second = [seg("ORC", {1: "NW", 2: "PLC2"}), seg("OBR", {1: "2", 2: "PLC2", 4: "MRHEAD^MRI đầu"})]
    parsed = m.parse_orm(orm(PID, ORC_NW, OBR_NW, *second, seg("ORC", {1: "CA", 3: "OLD1"})))
    kinds = [(type(i).__name__, getattr(i, "placer_order_number", "")) for i in parsed.items]
    assert kinds == [("NewOrder", "PLC1001"), ("NewOrder", "PLC2"), ("CancelRequest", "")]


@pytest.mark.parametrize(("segments", "code", "words"), [
    ((ORC_NW, OBR_NW), m.REQUIRED_FIELD_MISSING, "PID"),  # missing PID
    ((ORC_NW, PID, OBR_NW), m.SEGMENT_SEQUENCE_ERROR, "PID must come before ORC"),
    ((PID, OBR_NW, ORC_NW), m.SEGMENT_SEQUENCE_ERROR, "OBR must follow an ORC"),
    ((PID,), m.REQUIRED_FIELD_MISSING, "ORC"),
    ((PID, ORC_NW), m.REQUIRED_FIELD_MISSING, "OBR"),
    ((seg("PID", {5: "A^B"}), ORC_NW, OBR_NW), m.REQUIRED_FIELD_MISSING, "PID-3"),
    ((seg("PID", {3: "P1"}), ORC_NW, OBR_NW), m.REQUIRED_FIELD_MISSING, "PID-5"),
    ((PID, ORC_NW, seg("OBR", {1: "1"})), m.REQUIRED_FIELD_MISSING, "OBR-4"),
    ((PID, seg("ORC", {1: "XO", 2: "P"}), OBR_NW), m.TABLE_VALUE_NOT_FOUND, "XO"),
    ((PID, seg("ORC", {2: "P"}), OBR_NW), m.REQUIRED_FIELD_MISSING, "ORC-1"),
])
def test_content_errors_are_ae_with_a_reason(segments: tuple[str, ...], code: int, words: str) -> None:
    with pytest.raises(m.Hl7Error) as err:
        m.parse_orm(orm(*segments))
    assert not isinstance(err.value, m.Hl7Reject)
    assert err.value.ack_code == "AE" and err.value.code == code and words in err.value.message


@pytest.mark.parametrize(("data", "code", "words"), [
    (b"hello world", m.SEGMENT_SEQUENCE_ERROR, "MSH"),
    (b"MSH|^^\\&|HIS", m.SEGMENT_SEQUENCE_ERROR, "MSH"),  # duplicate encoding characters
    (orm(PID, ORC_NW, OBR_NW, ver="2.7").encode(), m.UNSUPPORTED_VERSION, "2.7"),
    (orm(PID, ver="").encode(), m.UNSUPPORTED_VERSION, "version"),
    (orm(PID).replace("ORM^O01^ORM_O01", "ADT^A01^ADT_A01").encode(), m.UNSUPPORTED_MESSAGE_TYPE, "ADT^A01"),
    (orm(PID).replace("ORM^O01^ORM_O01", "ORM^O02").encode(), m.UNSUPPORTED_EVENT_CODE, "ORM^O02"),
    (orm(PID, charset="ISO IR87").encode(), m.DATA_TYPE_ERROR, "character set"),
    (orm(PID, ORC_NW, OBR_NW).encode("utf-8").replace("Nguyễn".encode(), b"Nguy\xff\xfen"), m.DATA_TYPE_ERROR,
     "invalid in the declared character set"),
    (orm(PID, ORC_NW, OBR_NW, charset="").encode("utf-8").replace(b"Nguy", b"Nguy\xc3"), m.DATA_TYPE_ERROR,
     "UTF-8"),
    (orm(PID, "garbage that is no segment", ORC_NW).encode(), m.SEGMENT_SEQUENCE_ERROR, "cannot parse"),
])
def test_unreadable_messages_are_ar(data: bytes, code: int, words: str) -> None:
    with pytest.raises(m.Hl7Reject) as err:
        parse_bytes(data)
    assert err.value.ack_code == "AR" and err.value.code == code and words in err.value.message


def test_segments_separated_by_lf_are_accepted() -> None:
    assert parse_bytes(orm(PID, ORC_NW, OBR_NW).replace("\r", "\r\n").encode()).patient_id == "BN123456"


# -- ACK ----------------------------------------------------------------------------------------------


HEADER = m.Header("HIS", "BVDK_HUE", "PACS", "RAD", "MSG00001", "P", "2.5.1", "ORM", "O01", "UNICODE UTF-8")


def test_ack_aa() -> None:
    msg = hl7.parse(m.build_ack(HEADER, "AA", control_id="ACK1"))
    assert raw(msg, "MSH", 3) == "PACS" and raw(msg, "MSH", 4) == "RAD"
    assert raw(msg, "MSH", 5) == "HIS" and raw(msg, "MSH", 6) == "BVDK_HUE"
    assert raw(msg, "MSH", 9) == "ACK^O01^ACK" and raw(msg, "MSH", 10) == "ACK1"
    assert raw(msg, "MSH", 12) == "2.5.1" and raw(msg, "MSH", 18) == "UNICODE UTF-8"
    assert raw(msg, "MSA", 1) == "AA" and raw(msg, "MSA", 2) == "MSG00001"
    assert raw(msg, "MSA", 3) == ""
    with pytest.raises(KeyError):
        msg.segment("ERR")


def test_ack_ae_names_the_field_and_escapes_the_reason() -> None:
    error = m.Hl7Error("invalid patient name 'A|B^C': Family^Given", m.DATA_TYPE_ERROR, "PID", 5)
    msg = hl7.parse(m.build_ack(HEADER, "AE", error))
    assert raw(msg, "MSA", 1) == "AE"
    assert msg.unescape(raw(msg, "MSA", 3)) == error.message
    assert raw(msg, "ERR", 2) == "PID^1^5"
    assert raw(msg, "ERR", 3) == "102^Data type error^HL70357"
    assert raw(msg, "ERR", 4) == "E"
    assert msg.unescape(raw(msg, "ERR", 8)) == error.message


def test_ack_for_v23_uses_err1() -> None:
    header = replace(HEADER, version="2.3")
    msg = hl7.parse(m.build_ack(header, "AE", m.Hl7Error("PID segment is required", 101, "PID")))
    assert raw(msg, "MSH", 12) == "2.3" and raw(msg, "MSH", 9) == "ACK^O01"
    assert raw(msg, "ERR", 1) == "PID^1^^101&Required field missing&HL70357"


def test_ack_without_a_readable_header() -> None:
    msg = hl7.parse(m.build_ack(None, "AR", m.Hl7Reject("not an HL7 v2 message", m.SEGMENT_SEQUENCE_ERROR)))
    assert raw(msg, "MSA", 1) == "AR" and raw(msg, "MSA", 2) == ""
    assert raw(msg, "MSH", 12) == m.ORU_VERSION


def test_parse_ack_reads_code_control_id_and_reason() -> None:
    text = m.build_ack(HEADER, "AE", m.Hl7Error("unknown patient", m.UNKNOWN_KEY, "PID", 3))
    assert m.parse_ack(text.encode()) == m.Ack("AE", "MSG00001", "unknown patient")
    assert m.parse_ack(m.build_ack(HEADER, "AA").encode()).accepted
    with pytest.raises(m.Hl7Reject):
        m.parse_ack(orm(PID).encode())


# -- ORU^R01 ------------------------------------------------------------------------------------------

NASTY = "Tràn dịch | màng phổi ^ bên ~ phải & trái \\ C:\\F\\ |F\\ \\E\\ \\.br\\ \\X0D\\"


def report(**kw: object) -> ReportDocument:
    values: dict[str, object] = dict(
        report_id=42, version=1, status="final",
        findings="Phổi: tràn dịch màng phổi phải.\nTim: bình thường.\r\n\r\n  Thụt lề giữ nguyên",
        impression="Tràn dịch màng phổi phải lượng ít.", language="vi",
        author="bs.an", author_name="Nguyễn Văn An", signed_by="bs.binh", signed_by_name="Trần Thị Bình",
        signed_at=datetime(2026, 11, 28, 3, 15, 0, tzinfo=UTC), amend_reason="",
        created_at=datetime(2026, 11, 28, 2, 0, 0, tzinfo=UTC), study_instance_uid="1.2.840.113619.2.55.3.1234",
        accession_number="ACC2026001", patient_id="BN123456", issuer_of_patient_id="BVHUE",
        patient_name="Nguyễn^Văn An^Thị", patient_birth_date="19800215", patient_sex="M", study_date="20261128",
        study_time="091500.123", study_description="CT ngực", modalities=("CT",),
        referring_physician_name="Trần^Bình", procedure="CT ngực có cản quang", facility="BVHUE",
        facility_name="Bệnh viện Trung ương Huế", placer_order_number="PLC1001",
    )
    values.update(kw)
    return ReportDocument(**values)  # type: ignore[arg-type]


def oru(doc: ReportDocument, **kw: str) -> hl7.Message:
    text = m.build_oru(doc, control_id=kw.pop("control_id", "R42V1DABCDEF"), receiving_application="EMR",
                       receiving_facility="HUE", now=datetime(2026, 11, 28, 3, 16, 0, tzinfo=UTC))
    assert "\n" not in text
    return hl7.parse(text)


def raw(msg: hl7.Message, segment: str, field_no: int) -> str:
    """A whole field as sent (python-hl7's ``msg["PID.F5"]`` accessor gives one unescaped component)."""
    return str(msg.segment(segment)(field_no)) if len(msg.segment(segment)) > field_no else ""


def obx_by_code(msg: hl7.Message) -> dict[str, hl7.Segment]:
    return {str(s(3)(1)(1)): s for s in msg.segments("OBX")}


def lines(msg: hl7.Message, obx: hl7.Segment) -> list[str]:
    return [msg.unescape(str(r)) for r in obx(5)]


def test_oru_final_every_field() -> None:
    msg = oru(report())
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "ORC", "OBR", "OBX", "OBX", "OBX"]
    assert raw(msg, "MSH", 3) == "PACS" and raw(msg, "MSH", 4) == "BVHUE"
    assert raw(msg, "MSH", 5) == "EMR" and raw(msg, "MSH", 6) == "HUE"
    assert raw(msg, "MSH", 7) == "20261128031600+0000"
    assert raw(msg, "MSH", 9) == "ORU^R01^ORU_R01" and raw(msg, "MSH", 10) == "R42V1DABCDEF"
    assert raw(msg, "MSH", 11) == "P" and raw(msg, "MSH", 12) == "2.5.1"
    assert raw(msg, "MSH", 18) == "UNICODE UTF-8"
    # PID: id with issuer in CX.4, XPN from the DICOM PN, birth date, sex
    assert str(msg["PID.F3.R1.C1"]) == "BN123456" and str(msg["PID.F3.R1.C4"]) == "BVHUE"
    assert raw(msg, "PID", 5) == "Nguyễn^Văn An^Thị"
    assert raw(msg, "PID", 7) == "19800215" and raw(msg, "PID", 8) == "M"
    # ORC: result, placer, filler = accession
    assert raw(msg, "ORC", 1) == "RE" and raw(msg, "ORC", 2) == "PLC1001" and raw(msg, "ORC", 3) == "ACC2026001"
    # OBR
    assert raw(msg, "OBR", 2) == "PLC1001" and raw(msg, "OBR", 3) == "ACC2026001"
    assert str(msg["OBR.F4.R1.C2"]) == "CT ngực có cản quang"
    assert raw(msg, "OBR", 7) == "20261128091500"
    assert raw(msg, "OBR", 16) == "^Trần^Bình"
    assert raw(msg, "OBR", 22) == "20261128031500+0000"
    assert raw(msg, "OBR", 25) == "F"
    assert str(msg["OBR.F32.R1.C1.S1"]) == "bs.binh" and str(msg["OBR.F32.R1.C1.S2"]) == "Trần Thị Bình"
    obx = obx_by_code(msg)
    assert set(obx) == {"59776-5", "19005-8", "113014"}
    findings, impression, uid = obx["59776-5"], obx["19005-8"], obx["113014"]
    assert str(findings(2)) == "TX" and str(findings(3)) == "59776-5^Procedure Findings^LN"
    assert lines(msg, findings) == ["Phổi: tràn dịch màng phổi phải.", "Tim: bình thường.", "",
                                    "  Thụt lề giữ nguyên"]
    assert str(impression(3)) == "19005-8^Impression^LN"
    assert lines(msg, impression) == ["Tràn dịch màng phổi phải lượng ít."]
    assert str(uid(2)) == "ST" and str(uid(3)) == "113014^DICOM Study^DCM"
    assert str(uid(5)) == "1.2.840.113619.2.55.3.1234"
    assert [str(s(1)) for s in msg.segments("OBX")] == ["1", "2", "3"]
    assert {str(s(11)) for s in msg.segments("OBX")} == {"F"}


def test_oru_preliminary_and_amended_statuses() -> None:
    prelim = oru(report(status="preliminary", signed_by="", signed_by_name="", signed_at=None))
    assert raw(prelim, "OBR", 25) == "P" and {str(s(11)) for s in prelim.segments("OBX")} == {"P"}
    assert str(prelim["OBR.F32.R1.C1.S1"]) == "bs.an"  # the preliminary's author interprets it
    assert raw(prelim, "OBR", 22) == "20261128020000+0000"  # not signed: when it was written
    amended = oru(report(status="amended", version=2, amend_reason="Sửa bên: phải | không phải trái"))
    assert raw(amended, "OBR", 25) == "C" and {str(s(11)) for s in amended.segments("OBX")} == {"C"}
    reason = obx_by_code(amended)["AMEND"]
    assert str(reason(3)) == "AMEND^Reason for amendment^L"
    assert lines(amended, reason) == ["Sửa bên: phải | không phải trái"]
    with pytest.raises(ValueError, match="draft"):
        m.build_oru(report(status="draft"), control_id="X")


def test_oru_text_with_delimiters_and_escape_lookalikes_round_trips() -> None:
    doc = report(findings=NASTY + "\n" + NASTY, impression="a\\b", patient_name="O'Brien|x^Mary&Ann~Jo\\E\\",
                 procedure="CT ^ | ~ & \\", referring_physician_name="")
    msg = oru(doc)
    obx = obx_by_code(msg)
    assert lines(msg, obx["59776-5"]) == [NASTY, NASTY]
    assert lines(msg, obx["19005-8"]) == ["a\\b"]
    assert str(msg["PID.F5.R1.C1"]) == "O'Brien|x"
    assert str(msg["PID.F5.R1.C2"]) == "Mary&Ann~Jo\\E\\"
    assert str(msg["OBR.F4.R1.C2"]) == "CT ^ | ~ & \\"
    assert raw(msg, "OBR", 16) == ""
    assert len(msg.segments("OBX")) == 3


def test_oru_without_issuer_birth_date_or_impression() -> None:
    msg = oru(report(issuer_of_patient_id="", patient_birth_date="", impression="", modalities=()))
    assert raw(msg, "PID", 3) == "BN123456^^^^MR"
    assert raw(msg, "PID", 7) == ""
    assert set(obx_by_code(msg)) == {"59776-5", "113014"}
    assert raw(msg, "OBR", 24) == "RAD"


def test_text_lines() -> None:
    assert m.text_lines("a\r\nb\rc\nd\n\n") == ["a", "b", "c", "d"]
    assert m.text_lines("tab\there\x07bell") == ["tab\there bell"]
    assert m.text_lines("") == [""]


def test_control_ids_fit_msh10_and_differ_per_destination() -> None:
    ids = {control_id_for(123456789, 12, name) for name in ("emr", "his", "lis")}
    assert len(ids) == 3 and all(len(i) <= 20 for i in ids)
    assert control_id_for(1, 1, "emr") == control_id_for(1, 1, "emr")
    assert [retry_delay(n, 5, 60) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]


# -- MLLP framing -----------------------------------------------------------------------------------


@pytest.fixture()
def pipe() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_frames_round_trip_and_pipelined_frames_stay_apart(pipe: tuple[socket.socket, socket.socket]) -> None:
    a, b = pipe
    a.sendall(b"\r\n" + frame(b"MSH|first\rPID|1") + frame(b"MSH|second\x1c"[:-1]))
    a.shutdown(socket.SHUT_WR)
    with b.makefile("rb") as stream:
        assert read_frame(stream, 1000) == b"MSH|first\rPID|1"
        assert read_frame(stream, 1000) == b"MSH|second"
        assert read_frame(stream, 1000) is None  # clean end between frames


def test_oversized_frame_is_refused_early_then_skipped(pipe: tuple[socket.socket, socket.socket]) -> None:
    a, b = pipe
    big = b"MSH|^~\\&|HIS|F|PACS|R|20261128||ORM^O01|BIG1|P|2.5.1\r" + b"x" * 5_000_000

    def writer() -> None:
        a.sendall(frame(big) + frame(b"MSH|next"))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with b.makefile("rb", buffering=65536) as stream:
        with pytest.raises(FrameTooLarge) as err:
            read_frame(stream, 100_000)
        assert err.value.head.startswith(b"MSH|^~\\&|HIS") and len(err.value.head) <= 4096
        assert m.read_header(err.value.head).control_id == "BIG1"
        skip_frame(stream, 10_000_000)
        assert read_frame(stream, 100_000) == b"MSH|next"
    thread.join(5)


def test_skip_gives_up_after_its_limit(pipe: tuple[socket.socket, socket.socket]) -> None:
    a, b = pipe

    def writer() -> None:
        with contextlib.suppress(OSError):  # the reader gives up first and the fixture closes the pair
            a.sendall(b"\x0b" + b"y" * 300_000)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with b.makefile("rb") as stream:
        with pytest.raises(FrameTooLarge):
            read_frame(stream, 1000)
        with pytest.raises(MllpError, match="not ended"):
            skip_frame(stream, 100_000)
    b.close()  # unblocks the writer (EPIPE) so it ends inside this test, not in the next one
    thread.join(5)


@pytest.mark.parametrize(("data", "words"), [
    (b"MSH|no start byte", "start byte"),
    (b"\x0bMSH|cut short", "closed inside"),
    (b"\x0bMSH|bad end\x1cX", "not followed by 0x0D"),
])
def test_malformed_streams(pipe: tuple[socket.socket, socket.socket], data: bytes, words: str) -> None:
    a, b = pipe
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    with b.makefile("rb") as stream, pytest.raises(MllpError, match=words):
        read_frame(stream, 1000)


def test_timeouts(pipe: tuple[socket.socket, socket.socket]) -> None:
    _, b = pipe
    b.settimeout(0.2)
    with b.makefile("rb") as stream, pytest.raises(MllpTimeout):
        read_frame(stream, 1000)  # nothing at all
    a2, b2 = socket.socketpair()
    with a2, b2:
        b2.settimeout(1.0)

        def trickle() -> None:
            a2.sendall(b"\x0bMSH")
            for _ in range(8):
                time.sleep(0.1)
                a2.sendall(b"x")

        threading.Thread(target=trickle, daemon=True).start()
        with b2.makefile("rb") as stream, pytest.raises(MllpTimeout, match="too long"):
            read_frame(stream, 1000, frame_timeout_s=0.3)  # each byte in time, the whole frame not


def test_parse_address() -> None:
    assert parse_address("10.0.0.5:2575") == ("10.0.0.5", 2575)
    assert parse_address("[::1]:2575") == ("::1", 2575)
    for bad in ("emr", "emr:", "emr:99999", ":2575", "emr:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_a_message_of_delimiters_is_refused_before_parsing() -> None:
    started = time.monotonic()
    with pytest.raises(m.Hl7Reject, match="fields/components"):
        m.parse_orm(orm(PID, ORC_NW, OBR_NW, seg("NTE", {1: "1", 3: "^" * 500_000})))
    assert time.monotonic() - started < 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="|^~\\&FSTREXHN.br0D ăễđ\tA", max_size=40),
       st.text(alphabet="|^~\\&FSTRE.ễ ", min_size=1, max_size=20))
def test_any_text_round_trips_through_oru(text: str, name: str) -> None:
    doc = report(findings=text, impression="", amend_reason="", patient_name=name.replace("^", "") or "x",
                 procedure=name)
    msg = oru(doc)
    expected = m.text_lines(text)
    if any(line.strip() for line in expected):
        assert lines(msg, obx_by_code(msg)["59776-5"]) == expected
    assert str(msg["OBR.F4.R1.C2"]) == name.replace("\t", " ")

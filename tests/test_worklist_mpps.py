"""RIS orders, the Modality Worklist SCP and the MPPS SCP.

Pure logic (order validation, worklist matching and answers, step and order states) runs on an
in-memory SQLite index. End to end, orders are created with `pacs order add` and a modality is
played by pynetdicom and DCMTK's findscu against `pacs serve` (embedded) and `pacs scp` on
PostgreSQL (scaled).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from dicom_scp import worklist_service
from pacs.context import AppContext
from pacs.db.models import Base
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.query.matching import InvalidMatchValue
from pacs.ris import mpps, worklist
from pacs.ris.models import ImagingOrder, PerformedProcedureStep
from pacs.ris.orders import NewOrder, cancel_order, create_order, get_order, list_orders
from pacs.security.principal import UNRESTRICTED
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.inprocess import register_ae
from tests.support.net import free_port
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.stack import EmbeddedPacs, ScaledStack

VIETNAMESE = "Nguyễn^Văn An"


# --- pure logic on an in-memory index -------------------------------------------------------------


@pytest.fixture()
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        yield s


def _order(session: Session, **kw: str) -> str:
    fields = {"patient_id": "P1", "patient_name": "DOE^JOHN", "modality": "CT", "station_ae_title": "CT01",
              "start_date": "20261128", "start_time": "0900", "procedure_description": "CT CHEST", **kw}
    return create_order(session, NewOrder(**fields)).accession_number


@pytest.fixture()
def orders(session: Session) -> dict[str, str]:
    out = {
        "A": _order(session, patient_name=VIETNAMESE, performing_physician_name="Trần^Bình"),
        "B": _order(session, patient_name="NGUYEN^THI HA", start_date="20261129", start_time="1430"),
        "C": _order(session, patient_name="Lê^Minh", modality="MR", station_ae_title="MR01", start_time="1000"),
        "D": _order(session, patient_name="CANCELLED^ONE"),
        "E": _order(session, patient_name="STARTED^ONE", start_time="0930"),
    }
    cancel_order(session, out["D"])
    session.execute(update(ImagingOrder).where(ImagingOrder.accession_number == out["E"]).values(state="in-progress"))
    return out


def test_create_order_generates_identifiers_and_validates(session: Session) -> None:
    order = get_order(session, _order(session))
    assert len(order.accession_number) == 12 and order.accession_number.isdigit()
    assert order.requested_procedure_id == order.scheduled_procedure_step_id == order.accession_number
    assert order.study_instance_uid.startswith("2.25.") and order.state == "scheduled"
    assert order.scheduled_start_time == "090000"
    given = get_order(session, _order(session, accession_number="ACC-1", start_date="2026-11-30", start_time="14:05"))
    assert (given.accession_number, given.scheduled_start_date, given.scheduled_start_time) == \
        ("ACC-1", "20261130", "140500")
    with pytest.raises(Conflict):
        _order(session, accession_number="ACC-1")
    for bad in ({"start_date": "20261331"}, {"start_time": "2500"}, {"modality": "C T!"},
                {"station_ae_title": "A" * 17}, {"patient_name": ""}, {"patient_id": "a\\b"},
                {"accession_number": "X" * 17}, {"patient_sex": "Q"}, {"procedure_description": ""}):
        with pytest.raises(InvalidInput):
            _order(session, **bad)
    assert [o.accession_number for o in list_orders(session, scheduled_date="20261130")] == ["ACC-1"]


def test_cancel_order_states(session: Session) -> None:
    acc = _order(session)
    assert cancel_order(session, acc).state == "discontinued"
    with pytest.raises(Conflict):
        cancel_order(session, acc)
    with pytest.raises(NotFound):
        cancel_order(session, "NOPE")


def _query(top: dict[str, str] | None = None, sps: dict[str, str] | None = None) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.AccessionNumber = ""
    for k, v in (top or {}).items():
        setattr(ds, k, v)
    item = Dataset()
    item.ScheduledStationAETitle = ""
    for k, v in (sps or {}).items():
        setattr(item, k, v)
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


@pytest.mark.parametrize(("top", "sps", "expected"), [
    ({}, {"ScheduledStationAETitle": "CT01"}, "AB"),
    ({}, {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": "20261128"}, "A"),
    ({}, {"ScheduledProcedureStepStartDate": "20261128-20261129"}, "ACB"),
    ({}, {"ScheduledProcedureStepStartDate": "20261129-"}, "B"),
    ({}, {"ScheduledProcedureStepStartTime": "0800-1000"}, "AC"),
    ({}, {"ScheduledProcedureStepStartTime": "0900"}, "A"),
    ({}, {"Modality": "MR"}, "C"),
    ({}, {"ScheduledStationAETitle": "CT01\\MR01"}, "ACB"),
    ({}, {"ScheduledStationAETitle": "CT*"}, "AB"),
    ({}, {"ScheduledPerformingPhysicianName": "tran"}, "A"),
    ({}, {"ScheduledProcedureStepStatus": "STARTED"}, "E"),
    ({}, {"ScheduledProcedureStepStatus": "SCHEDULED\\STARTED"}, "AECB"),
    ({}, {"ScheduledProcedureStepStatus": "COMPLETED"}, ""),
    ({"PatientName": "nguyen"}, {}, "AB"),
    ({"PatientName": "NGUYEN^VAN AN"}, {}, "A"),
    ({"PatientName": "Nguyễn^Văn*"}, {}, "A"),
    ({"PatientName": "le"}, {}, "C"),
    ({"PatientID": "P1"}, {"Modality": "CT"}, "AB"),
    ({"PatientID": "P2"}, {}, ""),
])
def test_worklist_matching(session: Session, orders: dict[str, str], top: dict, sps: dict, expected: str) -> None:
    found = [i.AccessionNumber for i in worklist.find(session, _query(top, sps))]
    assert found == [orders[k] for k in expected]


def test_worklist_matches_uid_accession_and_empty_sequence(session: Session, orders: dict[str, str]) -> None:
    uid = get_order(session, orders["B"]).study_instance_uid
    assert [i.AccessionNumber for i in worklist.find(session, _query({"StudyInstanceUID": uid}))] == [orders["B"]]
    assert [i.AccessionNumber for i in worklist.find(session, _query({"AccessionNumber": orders["C"]}))] == \
        [orders["C"]]
    ds = Dataset()
    ds.PatientName = "nguyen^van*"
    ds.ScheduledProcedureStepSequence = Sequence()
    [item] = worklist.find(session, ds)
    sps = item.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledStationAETitle == "CT01" and sps.ScheduledProcedureStepStatus == "SCHEDULED"
    assert sps.ScheduledPerformingPhysicianName == "Trần^Bình"
    with pytest.raises(InvalidMatchValue):
        worklist.find(session, _query({}, {"ScheduledProcedureStepStartDate": "2026-11-28-x"}))


def test_worklist_answer_has_exactly_the_requested_keys_in_utf8(session: Session, orders: dict[str, str]) -> None:
    query = _query({"PatientID": "", "StudyInstanceUID": "", "RequestedProcedureDescription": "",
                    "RequestedProcedurePriority": "", "ReferringPhysicianName": ""},
                   {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": "20261128",
                    "ScheduledProcedureStepStartTime": "", "Modality": "", "ScheduledStationName": "",
                    "ScheduledProcedureStepID": ""})
    query.ReferencedStudySequence = Sequence()
    [item] = worklist.find(session, query)
    order = get_order(session, orders["A"])
    assert item.SpecificCharacterSet == "ISO_IR 192"
    assert set(item.dir()) == {"SpecificCharacterSet", *query.dir()}
    assert (str(item.PatientName), item.PatientID, item.StudyInstanceUID, item.RequestedProcedureDescription) == \
        (VIETNAMESE, "P1", order.study_instance_uid, "CT CHEST")
    assert item.RequestedProcedurePriority in (None, "") and item.ReferencedStudySequence == []
    sps = item.ScheduledProcedureStepSequence[0]
    assert set(sps.dir()) == set(query.ScheduledProcedureStepSequence[0].dir())
    assert (sps.ScheduledProcedureStepStartTime, sps.Modality, sps.ScheduledProcedureStepID) == \
        ("090000", "CT", order.accession_number)
    encoded = _roundtrip(item)
    assert str(encoded.PatientName) == VIETNAMESE


def _roundtrip(ds: Dataset) -> Dataset:
    """Encode as pynetdicom puts a C-FIND response on the wire, and decode it again."""
    data = encode(ds, True, True)
    assert data is not None and "Nguyễn".encode() in data
    return decode(BytesIO(data), True, True)


@pytest.mark.parametrize(("current", "requested", "expected"), [
    ("IN PROGRESS", None, "IN PROGRESS"),
    ("IN PROGRESS", "IN PROGRESS", "IN PROGRESS"),
    ("IN PROGRESS", "COMPLETED", "COMPLETED"),
    ("IN PROGRESS", "DISCONTINUED", "DISCONTINUED"),
    ("IN PROGRESS", "DONE", mpps.InvalidStep),
    ("COMPLETED", "COMPLETED", mpps.StepFinal),
    ("COMPLETED", None, mpps.StepFinal),
    ("DISCONTINUED", "IN PROGRESS", mpps.StepFinal),
])
def test_step_transitions(current: str, requested: str | None, expected: object) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            mpps.next_step_state(current, requested)
    else:
        assert mpps.next_step_state(current, requested) == expected


@pytest.mark.parametrize(("current", "steps", "expected"), [
    ("scheduled", [], "scheduled"),
    ("scheduled", ["IN PROGRESS"], "in-progress"),
    ("in-progress", ["COMPLETED"], "completed"),
    ("in-progress", ["DISCONTINUED"], "discontinued"),
    ("in-progress", ["COMPLETED", "IN PROGRESS"], "in-progress"),
    ("in-progress", ["COMPLETED", "DISCONTINUED"], "completed"),
    ("discontinued", ["IN PROGRESS"], "in-progress"),  # what the modality reports wins over the plan
])
def test_order_state_follows_its_steps(current: str, steps: list[str], expected: str) -> None:
    assert mpps.order_state_for(current, steps) == expected


def n_create_attributes(accession: str, study_uid: str = "", status: str = "IN PROGRESS") -> Dataset:
    """An MPPS N-CREATE attribute list the way a CT sends it (PS3.4 Table F.7.2-1, abridged)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = VIETNAMESE
    ds.PatientID = "P1"
    item = Dataset()
    item.AccessionNumber = accession
    item.StudyInstanceUID = study_uid
    item.RequestedProcedureID = ""
    item.ScheduledProcedureStepID = ""
    ds.ScheduledStepAttributesSequence = Sequence([item])
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = "20261128"
    ds.PerformedProcedureStepStartTime = "091500"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = Sequence()
    return ds


def n_set_modification(status: str, series_uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261128"
    ds.PerformedProcedureStepEndTime = "093000"
    items = []
    for uid in series_uids:
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.SeriesDescription = "AXIAL"
        image = Dataset()
        image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        image.ReferencedSOPInstanceUID = generate_uid()
        item.ReferencedImageSequence = Sequence([image])
        items.append(item)
    ds.PerformedSeriesSequence = Sequence(items)
    return ds


def test_mpps_service_moves_the_order(session: Session, orders: dict[str, str]) -> None:
    uid, series = generate_uid(), [generate_uid(), generate_uid()]
    step = mpps.create_step(session, uid, n_create_attributes(orders["A"]), "CT01")
    assert (step.state, step.order_accession_number, step.order_state) == ("IN PROGRESS", orders["A"], "in-progress")
    with pytest.raises(mpps.DuplicateStep):
        mpps.create_step(session, uid, n_create_attributes(orders["A"]), "CT01")
    assert mpps.set_step(session, uid, n_set_modification("IN PROGRESS", series[:1])).series_instance_uids == \
        (series[0],)
    done = mpps.set_step(session, uid, n_set_modification("COMPLETED", series))  # the same series again, and one more
    assert (done.state, done.order_state, done.series_instance_uids) == ("COMPLETED", "completed", tuple(series))
    with pytest.raises(mpps.StepFinal):
        mpps.set_step(session, uid, n_set_modification("COMPLETED", series))
    with pytest.raises(mpps.NoSuchStep):
        mpps.set_step(session, generate_uid(), n_set_modification("COMPLETED", series))
    with pytest.raises(mpps.InvalidStep):
        mpps.create_step(session, generate_uid(), n_create_attributes(orders["B"], status="COMPLETED"))
    row = session.scalars(select(PerformedProcedureStep).where(PerformedProcedureStep.sop_instance_uid == uid)).one()
    assert json.loads(row.n_create_json)["00100010"]["Value"] == [{"Alphabetic": VIETNAMESE}]
    assert len(json.loads(row.n_set_json)) == 2 and row.end_time == "093000"
    # linked by the Study Instance UID alone; a step naming no order is kept unlinked
    by_uid = mpps.create_step(session, generate_uid(), n_create_attributes("", get_order(session, orders["C"])
                                                                            .study_instance_uid))
    assert by_uid.order_accession_number == orders["C"]
    assert mpps.create_step(session, generate_uid(), n_create_attributes("UNKNOWN")).order_accession_number is None


def _find_event(identifier: Dataset, sop_class: str, cancelled: bool = False) -> SimpleNamespace:
    return SimpleNamespace(identifier=identifier, is_cancelled=cancelled,
                           request=SimpleNamespace(AffectedSOPClassUID=sop_class),
                           assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="CT01")))


def test_find_handler_answers_cancels_and_refuses_other_models() -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        _order(s)
        _order(s, start_time="1000")
    ctx = SimpleNamespace(read_sessions=sessionmaker(engine))
    query = _query({}, {"ScheduledStationAETitle": "CT01"})
    mwl = str(ModalityWorklistInformationFind)
    every = lambda ae, address: UNRESTRICTED  # noqa: E731 - what an archive-wide AE may see
    answers = list(worklist_service.handle_find(_find_event(query, mwl), ctx, every))
    assert [code for code, _ in answers] == [0xFF00, 0xFF00]
    assert list(worklist_service.handle_find(_find_event(query, mwl, cancelled=True), ctx, every)) == [(0xFE00, None)]
    [(bad, _)] = worklist_service.handle_find(
        _find_event(_query({}, {"ScheduledProcedureStepStartDate": "x-y-z"}), mwl), ctx, every)
    assert bad.Status == 0xC000 and "range" in bad.ErrorComment
    [(other, _)] = worklist_service.handle_find(_find_event(query, "1.2.840.10008.5.1.4.1.2.2.1"), ctx, every)
    assert other.Status == 0x0122


# --- end to end: a modality against `pacs serve` and `pacs scp` -------------------------------------------


@dataclass
class Archive:
    port: int
    env: dict[str, str]
    ctx: AppContext


def _register(ctx: AppContext, *titles: str) -> None:
    """Another issue adds an association policy for query and MPPS: register our modalities as a site would
    (in-process, as `pacs ae add TITLE 127.0.0.1 PORT --archive-wide` does)."""
    for title in titles:
        register_ae(ctx, title, "127.0.0.1", free_port(), archive_wide=True)


def _add_order(env: dict[str, str], *args: str, process: bool = False) -> dict:
    """`pacs order add`: as a process (``process``), else in-process (invoke_pacs: the same command code)."""
    add = ["order", "add", "--modality", "CT", "--procedure", "CT CHEST", "--json", *args]
    result = run_pacs(add, env) if process else invoke_pacs(add, env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("mwl"))
    try:
        _register(pacs.ctx, "CT01", "FINDSCU")
        yield Archive(pacs.port, pacs.env, pacs.ctx)
    finally:
        pacs.close()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """`pacs scp` on PostgreSQL and a file store, no broker."""
    root = tmp_path_factory.mktemp("mwl-scaled")
    with ScaledStack(root, f"file://{root / 'objects'}", broker_url=None).up("scp") as stack:
        _register(stack.ctx, "CT01")
        yield Archive(stack.port, stack.env, stack.ctx)


def _worklist(port: int, query: Dataset, aet: str = "CT01") -> tuple[list[Dataset], int]:
    """C-FIND on the worklist as a modality does; returns the items and the final status."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    try:
        items, final = [], -1
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            assert status, "no response"
            if status.Status in (0xFF00, 0xFF01):
                items.append(identifier)
            else:
                final = status.Status
        return items, final
    finally:
        assoc.release()


def _mpps(port: int, action: str, uid: str, ds: Dataset) -> Dataset:
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    try:
        if action == "create":
            status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        else:
            status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
        return status
    finally:
        assoc.release()


def _ct01_query(dates: str) -> Dataset:
    return _query({"PatientID": "", "StudyInstanceUID": "", "RequestedProcedureDescription": ""},
                  {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": dates,
                   "ScheduledProcedureStepStartTime": "", "Modality": ""})


def _state(archive: Archive, accession: str) -> str:
    with archive.ctx.sessions() as s:
        return get_order(s, accession).state


def _series(archive: Archive, accession: str) -> list[str]:
    with archive.ctx.sessions() as s:
        order = s.scalars(select(ImagingOrder).where(ImagingOrder.accession_number == accession)).one()
        return sorted(ser.series_instance_uid for step in order.steps for ser in step.series)


def _full_cycle(archive: Archive) -> None:
    """Orders from the CLI; the modality's worklist; MPPS in progress then completed; cancel."""
    env = archive.env
    viet = _add_order(env, "--patient-id", "VN001", "--patient-name", VIETNAMESE, "--station-ae", "CT01",
                      "--date", "20261128", "--time", "0900", "--accession", "ACC-VN1", process=True)
    other = _add_order(env, "--patient-id", "P2", "--patient-name", "DOE^JANE", "--station-ae", "CT01",
                       "--date", "20261129", "--time", "1400")
    _add_order(env, "--patient-id", "P3", "--patient-name", "ELSE^WHERE", "--station-ae", "CT02",
               "--date", "20261128", "--time", "1000")
    _add_order(env, "--patient-id", "P4", "--patient-name", "LATER^ONE", "--station-ae", "CT01",
               "--date", "20261205", "--time", "1000")

    items, final = _worklist(archive.port, _ct01_query("20261128-20261130"))
    assert final == 0
    assert [(i.AccessionNumber, str(i.PatientName)) for i in items] == [("ACC-VN1", VIETNAMESE),
                                                                         (other["accession_number"], "DOE^JANE")]
    assert items[0].StudyInstanceUID == viet["study_instance_uid"]
    assert items[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "090000"
    by_name, _ = _worklist(archive.port, _query({"PatientName": "NGUYEN^VAN AN"}))
    assert [str(i.PatientName) for i in by_name] == [VIETNAMESE]

    uid, series = generate_uid(), [generate_uid(), generate_uid()]
    assert _mpps(archive.port, "create", uid, n_create_attributes("ACC-VN1")).Status == 0x0000
    assert _state(archive, "ACC-VN1") == "in-progress"
    assert _mpps(archive.port, "create", uid, n_create_attributes("ACC-VN1")).Status == 0x0111
    items, _ = _worklist(archive.port, _ct01_query("20261128-20261130"))
    assert [i.AccessionNumber for i in items] == [other["accession_number"]]  # started: off the list
    assert _mpps(archive.port, "set", uid, n_set_modification("COMPLETED", series)).Status == 0x0000
    assert _state(archive, "ACC-VN1") == "completed"
    assert _series(archive, "ACC-VN1") == sorted(series)
    refused = _mpps(archive.port, "set", uid, n_set_modification("DISCONTINUED", []))
    assert refused.Status == 0x0110 and refused.ErrorID == 0xA710
    assert _state(archive, "ACC-VN1") == "completed"
    assert _mpps(archive.port, "set", generate_uid(), n_set_modification("COMPLETED", [])).Status == 0x0112

    cancelled = run_pacs(["order", "cancel", other["accession_number"]], env)  # a process: the operator's command
    assert cancelled.returncode == 0, cancelled.stderr
    assert _worklist(archive.port, _ct01_query("20261128-20261130")) == ([], 0)
    again = invoke_pacs(["order", "cancel", other["accession_number"]], env)
    assert again.returncode == 1 and "already discontinued" in again.stderr


@pytest.mark.integration
def test_worklist_and_mpps_embedded(embedded: Archive) -> None:
    _full_cycle(embedded)
    listed = json.loads(run_pacs(["order", "list", "--json"], embedded.env).stdout)
    assert {o["accession_number"]: o["state"] for o in listed}["ACC-VN1"] == "completed"
    assert [o["patient_name"] for o in listed if o["patient_id"] == "VN001"] == [VIETNAMESE]


@pytest.mark.integration
def test_findscu_worklist_embedded(embedded: Archive, tmp_path: Path) -> None:
    _add_order(embedded.env, "--patient-id", "VN002", "--patient-name", "Trần^Thị Bình", "--station-ae", "FINDSCU",
               "--date", "20261201", "--time", "0730")
    keys = ["PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=FINDSCU",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261201-20261201",
            "ScheduledProcedureStepSequence[0].Modality"]
    cmd = [dcmtk("findscu"), "-W", "-aet", "FINDSCU", "-aec", "PACS", "-X", "-od", str(tmp_path),
           *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(embedded.port)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    [rsp] = sorted(tmp_path.glob("rsp*.dcm"))
    ds = pydicom.dcmread(rsp)
    assert (str(ds.PatientName), ds.PatientID, ds.ScheduledProcedureStepSequence[0].Modality) == \
        ("Trần^Thị Bình", "VN002", "CT")


@pytest.mark.integration
def test_worklist_and_mpps_on_postgresql(scaled: Archive) -> None:
    _full_cycle(scaled)

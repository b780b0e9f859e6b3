"""HL7 v2 over MLLP against real databases (SQLite embedded and PostgreSQL): the listener that takes
ORM^O01 orders, and the outbound queue that delivers ORU^R01 to a real MLLP receiver.

The test client and receiver frame bytes with their own few lines and read our messages with
python-hl7, not with the code under test.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hl7
import pytest
from sqlalchemy import select, update

from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent
from pacs.hl7.listener import AUDIT_ACTION, Hl7Listener
from pacs.hl7.outbound import (
    Hl7Delivery,
    Hl7DeliveryConfig,
    Hl7Destination,
    enqueue_oru,
    list_outbound,
    retry_failed,
    wake_delivery,
)
from pacs.jobs import JobState
from pacs.reports.document import ReportDocument
from pacs.reports.models import Hl7Outbound, Report
from pacs.ris.models import DISCONTINUED, SCHEDULED
from pacs.ris.orders import get_order, list_orders
from pacs.settings import Settings
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.integration

MAX_BYTES = 1024**2


@pytest.fixture(params=["sqlite", "postgresql"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppContext]:
    url = request.getfixturevalue("fresh_pg_url") if request.param == "postgresql" else ""
    settings = Settings(data_dir=tmp_path / "data", database_url=url, hl7_host="127.0.0.1", hl7_port=free_port(),
                        hl7_timeout_s=10, hl7_max_connections=4, hl7_max_message_bytes=MAX_BYTES,
                        hl7_default_facility="")
    context = AppContext.create(settings)
    migrate.upgrade(context.engine)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture()
def listener(ctx: AppContext) -> Iterator[Hl7Listener]:
    server = Hl7Listener(ctx).start()
    try:
        yield server
    finally:
        server.stop()


# -- a test client: MLLP written out by hand -------------------------------------------------------


class Client:
    """One MLLP connection; ``exchange`` sends a message and returns the ACK parsed by python-hl7."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(b"\x0b" + payload + b"\x1c\x0d")

    def receive(self) -> bytes:
        while b"\x1c\x0d" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed without an answer")
            self.buffer += chunk
        block, _, self.buffer = self.buffer.partition(b"\x1c\x0d")
        assert block.startswith(b"\x0b")
        return block[1:]

    def exchange(self, payload: bytes) -> hl7.Message:
        self.send(payload)
        return hl7.parse(self.receive().decode("utf-8"))

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def client(listener: Hl7Listener) -> Iterator[Client]:
    c = Client(listener.server_address[1])
    try:
        yield c
    finally:
        c.close()


def seg(name: str, fields: dict[int, str]) -> str:
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


def orm(*segments: str, cid: str = "MSG1", charset: str = "UNICODE UTF-8", kind: str = "ORM^O01^ORM_O01") -> bytes:
    msh = f"MSH|^~\\&|HIS|BVDK_HUE|PACS|RAD|20261128083000||{kind}|{cid}|P|2.5.1|||AL|NE|VNM|{charset}"
    return "\r".join([msh, *segments]).encode("latin-1" if charset == "8859/1" else "utf-8")


PID = seg("PID", {1: "1", 3: "BN123456^^^BVHUE^MR", 5: "Nguyễn^Thị Hồng^Ánh", 7: "19850704", 8: "F"})


def new_order(accession: str = "ACC2026001", placer: str = "PLC1001") -> tuple[str, str]:
    orc = seg("ORC", {1: "NW", 2: placer, 3: accession, 7: "^^^20261128093000^^A", 12: "BS12^Phạm^Minh^Đức",
                      16: "^Theo dõi sau mổ"})
    obr = seg("OBR", {1: "1", 2: placer, 4: "MRBRAIN^MRI sọ não không tiêm^L", 24: "NMR",
                      31: "^Đau đầu kéo dài"})
    return orc, obr


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3 unescaped)."""
    fields = ack.segment("MSA")
    text = ack.unescape(str(fields(3))) if len(fields) > 3 else ""
    return str(fields(1)), str(fields(2)), text


def err_location(ack: hl7.Message) -> str:
    return str(ack.segment("ERR")(2))


def audit_rows(ctx: AppContext) -> list[AuditEvent]:
    with ctx.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == AUDIT_ACTION).order_by(AuditEvent.id)))


# -- orders in ----------------------------------------------------------------------------------------


def test_new_order_is_stored_with_every_mapped_field_and_audited(ctx: AppContext, listener: Hl7Listener) -> None:
    with client(listener) as c:
        ack = c.exchange(orm(PID, *new_order()))
    assert msa(ack) == ("AA", "MSG1", "")
    assert str(ack.segment("MSH")(5)) == "HIS" and str(ack.segment("MSH")(3)) == "PACS"
    with ctx.sessions() as s:
        order = get_order(s, "ACC2026001")
    assert order.state == SCHEDULED
    assert (order.patient_id, order.issuer_of_patient_id, order.patient_name, order.patient_birth_date,
            order.patient_sex) == ("BN123456", "BVHUE", "Nguyễn^Thị Hồng^Ánh", "19850704", "F")
    assert (order.placer_order_number, order.requested_procedure_description, order.modality, order.priority) == (
        "PLC1001", "MRI sọ não không tiêm", "MR", "URGENT")
    assert (order.scheduled_start_date, order.scheduled_start_time) == ("20261128", "093000")
    assert order.scheduled_station_ae_title == ""
    assert order.referring_physician_name == "Phạm^Minh^Đức"
    assert order.reason == "Đau đầu kéo dài; Theo dõi sau mổ"
    assert (order.facility, order.source) == ("BVDK_HUE", "hl7")
    (row,) = audit_rows(ctx)
    assert (row.actor, row.outcome, row.patient_id) == ("HIS@BVDK_HUE", "success", "BN123456")
    assert row.source_address.startswith("127.0.0.1:")
    assert "ORM^O01 MSG1" in row.detail and "accession=ACC2026001" in row.detail


def test_latin1_message_and_generated_accession_number(ctx: AppContext, listener: Hl7Listener) -> None:
    pid = seg("PID", {3: "DE77", 5: "Müller^José", 8: "M"})
    with client(listener) as c:
        ack = c.exchange(orm(pid, seg("ORC", {1: "NW", 2: "EMR-9"}), seg("OBR", {1: "1", 4: "CT01^CT Schädel"}),
                             charset="8859/1"))
    assert msa(ack)[0] == "AA"
    assert str(ack.segment("MSH")(18)) == "8859/1"
    with ctx.sessions() as s:
        (order,) = list_orders(s, patient_id="DE77")
    assert order.patient_name == "Müller^José" and order.requested_procedure_description == "CT Schädel"
    assert len(order.accession_number) == 12 and order.placer_order_number == "EMR-9" and order.modality == "CT"


def test_cancel_by_accession_or_placer_number(ctx: AppContext, listener: Hl7Listener) -> None:
    with client(listener) as c:
        assert msa(c.exchange(orm(PID, *new_order("ACC1", "PLC1"), cid="N1")))[0] == "AA"
        assert msa(c.exchange(orm(PID, *new_order("ACC2", "PLC2"), cid="N2")))[0] == "AA"
        cancel_by_accession = seg("ORC", {1: "CA", 2: "PLC1", 3: "ACC1"})
        assert msa(c.exchange(orm(PID, cancel_by_accession, cid="C1"))) == ("AA", "C1", "")
        assert msa(c.exchange(orm(seg("ORC", {1: "OC", 2: "PLC2"}), cid="C2")))[0] == "AA"  # placer only, no PID
        assert msa(c.exchange(orm(PID, cancel_by_accession, cid="C3")))[0] == "AA"  # a repeat changes nothing
        unknown = c.exchange(orm(seg("ORC", {1: "CA", 3: "NOPE"}), cid="C4"))
        assert msa(unknown)[0] == "AE" and "NOPE" in msa(unknown)[2]
        assert str(unknown.segment("ERR")(3)(1)(1)) == "204"
    with ctx.sessions() as s:
        assert get_order(s, "ACC1").state == DISCONTINUED
        assert get_order(s, "ACC2").state == DISCONTINUED
    outcomes = [(r.outcome, r.detail.split(":")[0]) for r in audit_rows(ctx)]
    assert outcomes == [("success", "ORM^O01 N1"), ("success", "ORM^O01 N2"), ("success", "ORM^O01 C1"),
                        ("success", "ORM^O01 C2"), ("success", "ORM^O01 C3"), ("failure", "ORM^O01 C4")]


def test_bad_messages_each_get_their_answer_and_the_listener_goes_on(ctx: AppContext, listener: Hl7Listener) -> None:
    orc, obr = new_order("ACC9", "PLC9")
    valid_utf8 = orm(PID, orc, obr, cid="BADBYTES")
    cases: list[tuple[bytes, str, str]] = [
        (b"this is not HL7 at all", "AR", "MSH"),
        (orm(PID, "what is this segment", orc, obr, cid="GARBAGE"), "AR", "cannot parse"),
        (orm(orc, PID, obr, cid="ORDER"), "AE", "PID must come before ORC"),
        (orm(orc, obr, cid="NOPID"), "AE", "PID segment is required"),
        (orm(PID, kind="ADT^A01^ADT_A01", cid="ADT"), "AR", "unsupported message type ADT^A01"),
        (valid_utf8.replace("Nguyễn".encode(), b"Nguy\xe1\xbb"), "AR", "invalid in the declared character set"),
        (orm(seg("PID", {3: "BN1", 5: "A^B", 7: "19851345"}), orc, obr, cid="BADDATE"), "AE", "birth date"),
    ]
    with client(listener) as c:
        for payload, code, words in cases:
            ack = c.exchange(payload)
            assert msa(ack)[0] == code, payload[:60]
            assert words in msa(ack)[2] or words in ack.unescape(str(ack.segment("ERR")(8))), (words, msa(ack))
        missing_pid = c.exchange(orm(orc, obr, cid="NOPID2"))
        assert err_location(missing_pid).startswith("PID") and str(missing_pid.segment("ERR")(3)(1)(1)) == "101"
        assert msa(c.exchange(orm(PID, orc, obr, cid="OK1")))[0] == "AA"  # the same connection still works
        duplicate = c.exchange(orm(PID, *new_order("ACC9", "OTHER"), cid="DUP"))
        assert msa(duplicate)[0] == "AE" and "already used" in msa(duplicate)[2]
        assert str(duplicate.segment("ERR")(3)(1)(1)) == "205"
        same_placer = c.exchange(orm(PID, *new_order("ACC10", "PLC9"), cid="DUP2"))
        assert msa(same_placer)[0] == "AE" and "PLC9" in msa(same_placer)[2]
    with ctx.sessions() as s:
        assert [o.accession_number for o in list_orders(s)] == ["ACC9"]
    rows = audit_rows(ctx)
    assert [r.outcome for r in rows].count("failure") == len(cases) + 3
    assert [r.outcome for r in rows].count("success") == 1
    assert all(r.outcome == "failure" for r in rows[: len(cases)])
    assert rows[0].actor == "hl7:unknown" and rows[4].actor == "HIS@BVDK_HUE"


def test_a_10_mb_message_is_refused_and_the_listener_stays_alive(ctx: AppContext, listener: Hl7Listener) -> None:
    orc, obr = new_order()
    big = orm(PID, orc, seg("NTE", {1: "1", 3: "x" * 10_000_000}), obr, cid="BIG")
    with client(listener) as c:
        started = time.monotonic()
        ack = c.exchange(big)
        assert msa(ack)[:2] == ("AR", "BIG") and "larger than" in msa(ack)[2]
        assert msa(c.exchange(orm(PID, orc, obr, cid="AFTER")))[:2] == ("AA", "AFTER")  # same connection goes on
        assert time.monotonic() - started < 30
    with client(listener) as c2:  # and new connections are served
        assert msa(c2.exchange(orm(PID, *new_order("ACC3", "PLC3"), cid="NEXT")))[0] == "AA"
    rows = audit_rows(ctx)
    assert rows[0].outcome == "failure" and "larger than" in rows[0].detail


def test_connection_limit(ctx: AppContext, listener: Hl7Listener) -> None:
    port = listener.server_address[1]
    held = [Client(port) for _ in range(4)]
    try:
        assert msa(held[0].exchange(orm(PID, *new_order(), cid="HELD")))[0] == "AA"
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        with extra:
            assert extra.recv(10) == b""  # closed at once: the limit is 4
        held.pop().close()
        time.sleep(0.2)
        with client(listener) as c:
            assert msa(c.exchange(orm(PID, *new_order("ACC5", "PLC5"), cid="AGAIN")))[0] == "AA"
    finally:
        for c in held:
            c.close()


# -- results out --------------------------------------------------------------------------------------


class Receiver:
    """A real MLLP receiver (its own framing, python-hl7 ACKs) answering each message with ``code``."""

    def __init__(self, port: int, code: str = "AA") -> None:
        self.port = port
        self.code = code
        self.received: list[str] = []  # MSH-10 of each message, in arrival order
        self.messages: list[hl7.Message] = []
        self.delay_s = 0.0
        self._server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while True:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while b"\x1c\x0d" in buffer:
                        block, _, buffer = buffer.partition(b"\x1c\x0d")
                        message = hl7.parse(block.lstrip(b"\x0b").decode("utf-8"))
                        receiver.messages.append(message)
                        receiver.received.append(str(message.segment("MSH")(10)))
                        time.sleep(receiver.delay_s)
                        ack = message.create_ack(receiver.code)
                        if receiver.code != "AA":
                            ack.segment("MSA").append(ack.create_field(["disk full"]))
                        self.request.sendall(b"\x0b" + str(ack).encode("utf-8") + b"\x1c\x0d")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port()).start()
    try:
        yield r
    finally:
        r.stop()


FAST = Hl7DeliveryConfig(poll_s=0.1, batch_size=20, max_attempts=3, retry_base_s=0.2, retry_max_s=0.4, lease_s=30,
                         timeout_s=5)


def make_report(ctx: AppContext, n: int = 1) -> list[int]:
    with ctx.sessions() as s, s.begin():
        rows = [Report(study_instance_uid=f"1.2.826.0.1.3680043.9.{i}", patient_id="BN123456", status="final")
                for i in range(n)]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def document(report_id: int, version: int = 1, status: str = "final") -> ReportDocument:
    return ReportDocument(
        report_id=report_id, version=version, status=status, findings="Không thấy tổn thương.\nNhu mô não bình thường.",
        impression="Bình thường.", language="vi", author="bs.an", author_name="Nguyễn Văn An", signed_by="bs.an",
        signed_by_name="Nguyễn Văn An", signed_at=datetime(2026, 11, 28, 4, 0, tzinfo=UTC),
        amend_reason="Bổ sung" if status == "amended" else "", created_at=None,
        study_instance_uid="1.2.826.0.1.3680043.9.1", accession_number="ACC2026001", patient_id="BN123456",
        issuer_of_patient_id="BVHUE", patient_name="Nguyễn^Thị Hồng^Ánh", patient_birth_date="19850704",
        patient_sex="F", study_date="20261128", study_time="093000", study_description="MRI sọ não",
        modalities=("MR",), referring_physician_name="Phạm^Minh", procedure="MRI sọ não không tiêm",
        facility="BVHUE", facility_name="BV Huế", placer_order_number="PLC1001",
    )


def destinations(*pairs: tuple[str, int]) -> dict[str, Hl7Destination]:
    return {name: Hl7Destination(name, "127.0.0.1", port, name.upper(), "HUE") for name, port in pairs}


def enqueue(ctx: AppContext, doc: ReportDocument, dests: dict[str, Hl7Destination]) -> list[int]:
    with ctx.sessions() as s, s.begin():
        return [row.id for row in enqueue_oru(s, doc, dests)]


def outbound_rows(ctx: AppContext) -> list[Hl7Outbound]:
    with ctx.sessions() as s:
        return list(s.scalars(select(Hl7Outbound).order_by(Hl7Outbound.id)))


def make_due(ctx: AppContext) -> None:
    with ctx.sessions() as s, s.begin():
        s.execute(update(Hl7Outbound).where(Hl7Outbound.state == JobState.PENDING)
                  .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)))


def test_enqueue_is_idempotent_and_per_destination(ctx: AppContext) -> None:
    (report_id,) = make_report(ctx)
    dests = destinations(("emr", 2575), ("his", 2576))
    first = enqueue(ctx, document(report_id), dests)
    again = enqueue(ctx, document(report_id), dests)
    assert first == again and len(first) == 2
    rows = outbound_rows(ctx)
    assert [(r.destination, r.state, r.report_fk, r.report_version, r.message_type) for r in rows] == [
        ("emr", JobState.PENDING, report_id, 1, "ORU^R01"), ("his", JobState.PENDING, report_id, 1, "ORU^R01")]
    assert len({r.message_control_id for r in rows}) == 2
    for row in rows:
        msg = hl7.parse(row.message)
        assert str(msg.segment("MSH")(10)) == row.message_control_id
        assert str(msg.segment("MSH")(5)) == row.destination.upper() and str(msg.segment("MSH")(6)) == "HUE"
    assert len(enqueue(ctx, document(report_id, 2, "amended"), dests)) == 2  # a new version: new messages
    assert len(outbound_rows(ctx)) == 4
    with ctx.sessions() as s:
        assert [r.destination for r in list_outbound(s, JobState.PENDING)] == ["his", "emr", "his", "emr"]


def test_delivered_exactly_once_and_woken_by_signing(ctx: AppContext, receiver: Receiver) -> None:
    (report_id,) = make_report(ctx)
    slow = Hl7DeliveryConfig(poll_s=60, max_attempts=3, retry_base_s=0.2, retry_max_s=0.4, timeout_s=5)
    delivery = Hl7Delivery(ctx, slow, destinations(("emr", receiver.port))).start()
    ctx.extras["hl7_delivery"] = delivery
    try:
        time.sleep(0.3)  # its first pass found nothing: it now sleeps for a minute unless woken
        (row_id,) = enqueue(ctx, document(report_id), destinations(("emr", receiver.port)))
        wake_delivery(ctx)
        wait_until(lambda: outbound_rows(ctx)[0].state == JobState.SENT, timeout=10, what="delivery after wake()")
        time.sleep(0.5)
    finally:
        delivery.stop()
    (row,) = outbound_rows(ctx)
    assert (row.id, row.state, row.ack_code, row.attempts, row.last_error) == (row_id, JobState.SENT, "AA", 0, "")
    assert receiver.received == [row.message_control_id]
    msg = receiver.messages[0]
    assert str(msg.segment("OBR")(25)) == "F" and str(msg.segment("PID")(5)) == "Nguyễn^Thị Hồng^Ánh"


def test_receiver_down_then_up(ctx: AppContext) -> None:
    (report_id,) = make_report(ctx)
    port = free_port()
    delivery = Hl7Delivery(ctx, FAST, destinations(("emr", port)))
    enqueue(ctx, document(report_id), destinations(("emr", port)))
    delivery.run_once()
    (row,) = outbound_rows(ctx)
    assert (row.state, row.attempts) == (JobState.PENDING, 1) and "unreachable" in row.last_error
    next_at = row.next_attempt_at.replace(tzinfo=UTC) if row.next_attempt_at.tzinfo is None else row.next_attempt_at
    assert next_at > datetime.now(UTC)
    delivery.run_once()  # not due yet: nothing happens
    assert outbound_rows(ctx)[0].attempts == 1
    time.sleep(0.5)
    delivery.run_once()
    assert outbound_rows(ctx)[0].attempts == 2 and outbound_rows(ctx)[0].state == JobState.PENDING
    up = Receiver(port).start()
    try:
        time.sleep(0.5)
        delivery.run_once()
        (row,) = outbound_rows(ctx)
        assert (row.state, row.ack_code, row.attempts) == (JobState.SENT, "AA", 2)
        delivery.run_once()
        assert up.received == [row.message_control_id]  # exactly once
    finally:
        up.stop()


def test_application_error_is_retried_then_failed_then_retried_by_hand(ctx: AppContext) -> None:
    (report_id,) = make_report(ctx)
    angry = Receiver(free_port(), code="AE").start()
    try:
        delivery = Hl7Delivery(ctx, FAST, destinations(("emr", angry.port)))
        enqueue(ctx, document(report_id), destinations(("emr", angry.port)))
        for _ in range(3):
            make_due(ctx)
            delivery.run_once()
        (row,) = outbound_rows(ctx)
        assert (row.state, row.attempts, row.ack_code) == (JobState.FAILED, 3, "AE")
        assert "answered AE" in row.last_error and "disk full" in row.last_error
        assert angry.received == [row.message_control_id] * 3
        make_due(ctx)
        delivery.run_once()
        assert len(angry.received) == 3  # failed: no more attempts
        with ctx.sessions() as s:
            assert [r.id for r in list_outbound(s, JobState.FAILED)] == [row.id]
        with ctx.sessions() as s, s.begin():
            assert retry_failed(s) == 1
        (row,) = outbound_rows(ctx)
        assert (row.state, row.attempts) == (JobState.PENDING, 0)
        angry.code = "AA"
        delivery.run_once()
        assert outbound_rows(ctx)[0].state == JobState.SENT
    finally:
        angry.stop()


def test_versions_of_one_report_are_delivered_in_order(ctx: AppContext, receiver: Receiver) -> None:
    (report_id,) = make_report(ctx)
    dests = destinations(("emr", receiver.port))
    (v1,) = enqueue(ctx, document(report_id, 1, "final"), dests)
    enqueue(ctx, document(report_id, 2, "amended"), dests)
    with ctx.sessions() as s, s.begin():  # the final report is waiting for a retry
        s.execute(update(Hl7Outbound).where(Hl7Outbound.id == v1)
                  .values(next_attempt_at=datetime.now(UTC) + timedelta(hours=1)))
    delivery = Hl7Delivery(ctx, FAST, dests)
    delivery.run_once()
    assert receiver.received == []  # the amendment does not overtake it
    make_due(ctx)
    delivery.run_once()
    delivery.run_once()
    rows = outbound_rows(ctx)
    assert [r.state for r in rows] == [JobState.SENT, JobState.SENT]
    assert receiver.received == [rows[0].message_control_id, rows[1].message_control_id]
    assert [str(m.segment("OBR")(25)) for m in receiver.messages] == ["F", "C"]


def test_two_senders_share_the_queue_without_sending_twice(ctx: AppContext, receiver: Receiver) -> None:
    report_ids = make_report(ctx, 10)
    dests = destinations(("emr", receiver.port))
    for report_id in report_ids:
        enqueue(ctx, document(report_id), dests)
    receiver.delay_s = 0.02
    senders = [Hl7Delivery(ctx, Hl7DeliveryConfig(poll_s=0.05, batch_size=3, timeout_s=5), dests) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: all(r.state == JobState.SENT for r in outbound_rows(ctx)), timeout=30, what="all sent")
    finally:
        for sender in senders:
            sender.stop()
    assert sorted(receiver.received) == sorted(r.message_control_id for r in outbound_rows(ctx))

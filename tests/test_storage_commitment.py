"""Storage Commitment Push Model SCP: what is durably stored, the request table and its reporter, and the
whole exchange with a pynetdicom "modality" against `pacs serve` (SQLite + files) and `pacs scp`
(PostgreSQL + S3, two processes sharing the table)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select, update

from dicom_scp.commitment_service import WELL_KNOWN_INSTANCE, parse_request, send_event_report
from pacs.aes import add_ae
from pacs.commitment.models import StorageCommitment
from pacs.commitment.service import (
    CommitmentConfig,
    CommitmentReporter,
    CommitmentResult,
    FailedRef,
    Recorded,
    ReportNotDelivered,
    SopRef,
    evaluate,
    record_request,
)
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import Instance
from pacs.dimse_status import CLASS_INSTANCE_CONFLICT, NO_SUCH_SOP_INSTANCE, PROCESSING_FAILURE
from pacs.forwarding.delivery import Destination
from pacs.ingest import Ingestor, IngestSource
from pacs.security.principal import UNRESTRICTED
from pacs.settings import Settings
from storage import StorageUnavailable
from tests.support.commitment_modality import Modality, action_info
from tests.support.datasets import make_dataset, make_instance
from tests.support.dcmtk import echoscu, storescu
from tests.support.inprocess import register_ae
from tests.support.net import free_port, wait_until
from tests.support.seaweed import SeaweedS3
from tests.support.stack import REDIS_URL, EmbeddedPacs, ScaledStack

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: what make_dataset() builds
FAST = {"PACS_COMMITMENT_POLL_S": "0.5", "PACS_COMMITMENT_RETRY_BASE_S": "0.5", "PACS_COMMITMENT_RETRY_MAX_S": "1"}


# -- the decision: what is durably stored -----------------------------------------------------------


@pytest.fixture()
def archive(tmp_path: Path) -> Iterator[AppContext]:
    """SQLite + filesystem store, schema migrated (all heads)."""
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(ctx.engine)
    yield ctx
    ctx.close()


def _ingest(ctx: AppContext, count: int) -> list[SopRef]:
    ingestor = Ingestor(ctx.sessions, ctx.store)
    refs = []
    for _ in range(count):
        ds = make_dataset()
        outcome = ingestor.ingest(make_instance(SOPInstanceUID=ds.SOPInstanceUID), IngestSource("import"))
        assert outcome.ok, outcome
        refs.append(SopRef(SC, ds.SOPInstanceUID))
    return refs


def _object_key(ctx: AppContext, sop_uid: str) -> str:
    with ctx.sessions() as s:
        return s.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop_uid)) or ""


def test_evaluate_names_exactly_what_is_stored(archive: AppContext) -> None:
    refs = _ingest(archive, 7)  # more than 4: the store is checked from the thread pool
    unknown = SopRef(SC, generate_uid())
    mismatch = SopRef(str(CTImageStorage), refs[1].sop_instance_uid)
    archive.store.delete(_object_key(archive, refs[2].sop_instance_uid))  # indexed, object gone
    truncated = _object_key(archive, refs[3].sop_instance_uid)
    archive.store.put(truncated, archive.store.get_bytes(truncated)[:-10])  # indexed, object damaged
    result = evaluate(archive.read_sessions, archive.store, [*refs, unknown, mismatch, refs[0]], scope=UNRESTRICTED)
    assert result.success == (refs[0], refs[1], *refs[4:])  # the repeated refs[0] is answered once
    assert result.failed == (FailedRef(SC, refs[2].sop_instance_uid, PROCESSING_FAILURE),
                             FailedRef(SC, refs[3].sop_instance_uid, PROCESSING_FAILURE),
                             FailedRef(SC, unknown.sop_instance_uid, NO_SUCH_SOP_INSTANCE),
                             FailedRef(str(CTImageStorage), refs[1].sop_instance_uid, CLASS_INSTANCE_CONFLICT))
    assert result.event_type == 2
    assert CommitmentResult.from_json(result.to_json()) == result


class _DownStore:
    """An object store that cannot be reached."""

    def __init__(self) -> None:
        self.calls = 0

    def size(self, key: str) -> int:
        self.calls += 1
        raise StorageUnavailable("connection refused")


def test_unreachable_store_is_a_processing_failure(archive: AppContext) -> None:
    refs = _ingest(archive, 6)
    unknown = SopRef(SC, generate_uid())
    store = _DownStore()
    result = evaluate(archive.read_sessions, store, [*refs, unknown], scope=UNRESTRICTED)  # type: ignore[arg-type]
    assert result.success == ()
    assert {f.sop_instance_uid: f.reason for f in result.failed} == {
        **{r.sop_instance_uid: PROCESSING_FAILURE for r in refs}, unknown.sop_instance_uid: NO_SUCH_SOP_INSTANCE}
    assert store.calls < len(refs)  # once found down, the store is not asked again for every object


# -- the request: validation, the table, the reporter -------------------------------------------------


@pytest.mark.parametrize(("action", "instance", "info", "status", "words"), [
    (1, WELL_KNOWN_INSTANCE, None, 0x0115, "Action Information"),
    (1, WELL_KNOWN_INSTANCE, action_info(refs=[(SC, "1.2.3")]), 0x0115, "missing TransactionUID"),
    (1, WELL_KNOWN_INSTANCE, action_info("1.2.x", [(SC, "1.2.3")]), 0x0115, "invalid TransactionUID"),
    (1, WELL_KNOWN_INSTANCE, action_info("1.2.3"), 0x0115, "ReferencedSOPSequence"),
    (1, WELL_KNOWN_INSTANCE, action_info("1.2.3", []), 0x0115, "ReferencedSOPSequence"),
    (1, WELL_KNOWN_INSTANCE, action_info("1.2.3", [(SC, "1.2.3"), (SC, "../../etc")]), 0x0115,
     "item 2: invalid ReferencedSOPInstanceUID"),
    (1, WELL_KNOWN_INSTANCE, action_info("1.2.3", [("", "1.2.3")]), 0x0115, "invalid ReferencedSOPClassUID"),
    (2, WELL_KNOWN_INSTANCE, action_info("1.2.3", [(SC, "1.2.3")]), 0x0123, "no such action"),
    (1, "1.2.3", action_info("1.2.3", [(SC, "1.2.3")]), 0x0112, "well-known"),
    (1, "1.2.a", action_info("1.2.3", [(SC, "1.2.3")]), 0x0117, "invalid SOP instance"),
])
def test_bad_requests_are_refused_with_a_reason(action: int, instance: str, info: Dataset | None, status: int,
                                                words: str) -> None:
    from dicom_scp.commitment_service import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        parse_request(action, instance, info)
    assert err.value.status == status and words in err.value.message


def test_valid_request_is_parsed() -> None:
    assert parse_request(1, WELL_KNOWN_INSTANCE, action_info("1.2.3", [(SC, "1.2.4"), (SC, "1.2.5")])) == (
        "1.2.3", [SopRef(SC, "1.2.4"), SopRef(SC, "1.2.5")])


def _row(ctx: AppContext, transaction: str) -> StorageCommitment:
    with ctx.sessions() as s:
        return s.scalars(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction)).one()


@dataclass
class _FakeSender:
    fail: bool = False
    sent: list[tuple[Destination, str, CommitmentResult]] = field(default_factory=list)

    def __call__(self, cfg: CommitmentConfig, dest: Destination, transaction: str, result: CommitmentResult) -> None:
        if self.fail:
            raise ReportNotDelivered(f"{dest} is unreachable")
        self.sent.append((dest, transaction, result))


def test_table_and_reporter(archive: AppContext) -> None:
    refs = _ingest(archive, 2)
    with archive.sessions() as s, s.begin():
        add_ae(s, "MODALITY", "127.0.0.1", 4242, archive_wide=True)
    sender = _FakeSender(fail=True)
    reporter = CommitmentReporter(archive, sender, CommitmentConfig(retry_base_s=60, max_attempts=3))
    assert record_request(archive.sessions, "1.2.3", "MODALITY", refs) is Recorded.PENDING
    assert record_request(archive.sessions, "1.2.3", "OTHER", refs) is Recorded.CONFLICT
    assert record_request(archive.sessions, "1.2.3", "MODALITY", refs[:1]) is Recorded.CONFLICT

    reporter.run_once()  # decided, not delivered: backoff
    row = _row(archive, "1.2.3")
    assert (row.state, row.attempts, "unreachable" in row.last_error) == ("pending", 1, True)
    assert CommitmentResult.from_json(row.result or "").success == tuple(refs)
    reporter.run_once()
    assert _row(archive, "1.2.3").attempts == 1  # not due yet

    sender.fail = False
    with archive.sessions() as s, s.begin():
        s.execute(update(StorageCommitment).values(next_attempt_at=StorageCommitment.created_at))
    reporter.run_once()
    row = _row(archive, "1.2.3")
    assert (row.state, row.attempts, row.last_error) == ("reported", 2, "")
    [(dest, transaction, result)] = sender.sent
    assert (str(dest), transaction, result.event_type, result.success) == ("MODALITY@127.0.0.1:4242", "1.2.3", 1,
                                                                           tuple(refs))
    # the same request again (its sender missed our N-ACTION response): reported once more
    assert record_request(archive.sessions, "1.2.3", "MODALITY", refs) is Recorded.PENDING
    reporter.run_once()
    assert len(sender.sent) == 2 and _row(archive, "1.2.3").state == "reported"

    assert record_request(archive.sessions, "1.2.9", "STRANGER", refs) is Recorded.UNREGISTERED
    row = _row(archive, "1.2.9")
    assert row.state == "failed" and "'STRANGER' is not registered" in row.last_error
    reporter.run_once()
    assert len(sender.sent) == 2

    sender.fail = True  # gives up after max_attempts
    record_request(archive.sessions, "1.2.10", "MODALITY", refs)
    for _ in range(3):
        with archive.sessions() as s, s.begin():
            s.execute(update(StorageCommitment).values(next_attempt_at=StorageCommitment.created_at))
        reporter.run_once()
    row = _row(archive, "1.2.10")
    assert (row.state, row.attempts) == ("failed", 3)


# -- the modality --------------------------------------------------------------------------------------


# tests/support/commitment_modality.py


def _pairs(ds: Dataset, keyword: str) -> list[tuple[str, ...]]:
    out = []
    for item in ds.get(keyword, []):
        pair = (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
        out.append((*pair, f"0x{int(item.FailureReason):04X}") if "FailureReason" in item else pair)
    return out


@pytest.mark.integration
def test_report_falls_back_to_default_roles() -> None:
    """A requester that refuses to let us act as SCP still gets its report (without role selection)."""
    modality = Modality(scp_role=False).listen()
    try:
        result = CommitmentResult((SopRef(SC, "1.2.3"),), ())
        send_event_report(CommitmentConfig(network_timeout_s=5), Destination("MODALITY", "127.0.0.1", modality.port),
                          "1.2.4", result)
        [(event_type, ds)] = modality.reports_for("1.2.4")
        assert event_type == 1 and _pairs(ds, "ReferencedSOPSequence") == [(SC, "1.2.3")]
        assert str(ds.RetrieveAETitle) == "PACS" and "FailedSOPSequence" not in ds
    finally:
        modality.stop_listening()
    with pytest.raises(ReportNotDelivered, match="unreachable"):
        send_event_report(CommitmentConfig(network_timeout_s=5), Destination("MODALITY", "127.0.0.1", modality.port),
                          "1.2.5", result)


# -- end to end ------------------------------------------------------------------------------------------


def _rows(ctx: AppContext, transaction: str) -> StorageCommitment | None:
    with ctx.sessions() as s:
        return s.scalars(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction)
                         ).one_or_none()


def _commitment_scenario(port: int, ctx: AppContext, modality: Modality, tmp: Path,
                         restart: Callable[[], None]) -> None:
    files = []
    for i in range(3):
        path = tmp / f"sc{i}.dcm"
        make_dataset(InstanceNumber=i + 1).save_as(path, enforce_file_format=True)
        files.append(path)
    stored = storescu(port, files, "-xe", aet=modality.ae_title)
    assert stored.status == 0 and stored.returncode == 0, stored.output[-2000:]
    from pydicom import dcmread

    refs = [SopRef(SC, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in files]

    # only stored instances: Event Type 1, every one of them named
    all_stored = modality.commit(port, refs)
    event_type, ds = modality.wait_report(all_stored)
    assert event_type == 1
    assert _pairs(ds, "ReferencedSOPSequence") == [(r.sop_class_uid, r.sop_instance_uid) for r in refs]
    assert "FailedSOPSequence" not in ds

    # stored + unknown + class mismatch: Event Type 2 with the reasons
    unknown = SopRef(SC, generate_uid())
    mismatch = SopRef(str(CTImageStorage), refs[2].sop_instance_uid)
    mixed = modality.commit(port, [refs[0], unknown, mismatch, refs[1]])
    event_type, ds = modality.wait_report(mixed)
    assert event_type == 2
    assert _pairs(ds, "ReferencedSOPSequence") == [(SC, refs[0].sop_instance_uid), (SC, refs[1].sop_instance_uid)]
    assert _pairs(ds, "FailedSOPSequence") == [(SC, unknown.sop_instance_uid, "0x0112"),
                                               (str(CTImageStorage), refs[2].sop_instance_uid, "0x0119")]

    # malformed requests: a failure status with a reason, and the server stays up
    assert modality.request(port, action_info(refs=[(SC, refs[0].sop_instance_uid)]))[0] == 0x0115
    status, comment = modality.request(port, action_info(generate_uid(), [(SC, "1.2.abc")]))
    assert status == 0x0115 and "invalid ReferencedSOPInstanceUID" in comment
    unknown_action = modality.request(port, action_info(generate_uid(), [(SC, refs[0].sop_instance_uid)]), 7)
    assert unknown_action[0] == 0x0123
    assert modality.request(port, None)[0] == 0x0115
    assert echoscu(port).returncode == 0

    # an unregistered requester: refused and recorded as failed with the reason (or, once the association
    # policy refuses unregistered AEs this service, not even associated)
    stranger = Modality("STRANGER")
    transaction = generate_uid()
    status, comment = stranger.request(port, action_info(transaction, [(SC, refs[0].sop_instance_uid)]))
    if status is not None:
        assert status == 0x0124 and "not registered" in comment
        row = _rows(ctx, transaction)
        assert row is not None and row.state == "failed" and "'STRANGER' is not registered" in row.last_error

    # the modality's listener is down: the report waits in the table (across our restart) and then arrives
    modality.stop_listening()
    waiting = modality.commit(port, refs[:2])
    wait_until(lambda: (row := _rows(ctx, waiting)) is not None and row.state == "pending" and row.attempts >= 2,
               timeout=20, what="a pending report retried while the modality is down")
    restart()
    row = _rows(ctx, waiting)
    assert row is not None and row.state == "pending" and "unreachable" in row.last_error
    modality.listen()
    event_type, ds = modality.wait_report(waiting, timeout=30)
    assert event_type == 1 and _pairs(ds, "ReferencedSOPSequence") == [(SC, r.sop_instance_uid) for r in refs[:2]]
    wait_until(lambda: (row := _rows(ctx, waiting)) is not None and row.state == "reported", timeout=10,
               what="the transaction marked reported")

    time.sleep(1.5)  # a few poll periods: nothing is reported twice
    for transaction in (all_stored, mixed, waiting):
        assert len(modality.reports_for(transaction)) == 1, transaction
        assert _rows(ctx, transaction).state == "reported"  # type: ignore[union-attr]


@pytest.mark.integration
def test_embedded_storage_commitment(tmp_path: Path) -> None:
    modality = Modality().listen()
    pacs = EmbeddedPacs(tmp_path, FAST)
    try:
        register_ae(pacs.ctx, modality.ae_title, "127.0.0.1", modality.port, archive_wide=True)
        _commitment_scenario(pacs.port, pacs.ctx, modality, tmp_path, pacs.restart)
    finally:
        modality.stop_listening()
        pacs.close()


@pytest.mark.integration
def test_scaled_storage_commitment(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """Two `pacs scp` processes on PostgreSQL + S3 share the table: each report is sent exactly once."""
    broker = REDIS_URL.rsplit("/", 1)[0] + "/12"  # not the other tests' broker database; no worker needed
    modality = Modality().listen()
    try:
        with ScaledStack(tmp_path, s3_server.url_for(f"pacs-stgcmt-{uuid.uuid4().hex[:10]}"), broker_url=broker,
                         extra_env=FAST) as stack:
            register_ae(stack.ctx, modality.ae_title, "127.0.0.1", modality.port, archive_wide=True)
            stack.start_scp()
            stack.start_scp("other", free_port())
            _commitment_scenario(stack.port, stack.ctx, modality, tmp_path, lambda: stack.restart("scp"))
            for name in ("scp", "other"):
                assert "report loop started" in stack.processes[name].log_path.read_text()
    finally:
        modality.stop_listening()

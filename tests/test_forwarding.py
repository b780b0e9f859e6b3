"""Forwarding rules: matching (pure), queueing at ingest, the sender against real DICOM peers, and
end to end in both configurations with DCMTK's bit-preserving storescp as the destination.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from bench.generate_ct import write_ct_series
from pacs.aes import add_ae
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import ForwardJob, Instance
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.forwarding.delivery import (
    DeliveryConfig,
    ForwardDelivery,
    is_delivered,
    queue_stats,
    retry_failed,
)
from pacs.forwarding.rules import RuleMatch, RuleRecord, add_rule, destinations_for, remove_rule, rule_matches
from pacs.ingest import Ingestor, IngestSource, IngestStatus
from pacs.jobs import retry_delay
from pacs.settings import Settings
from tests.support.datasets import dataset_bytes, make_instance
from tests.support.dcmtk import ReferenceStoreSCP, storescu
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import run_pacs
from tests.support.seaweed import SeaweedS3
from tests.support.stack import REDIS_URL, EmbeddedPacs, ScaledStack
from tests.support.tiers import starts_servers

CT = "1.2.840.10008.5.1.4.1.1.2"
MODALITY = IngestSource("dimse", calling_ae="MODALITY1", address="127.0.0.1:5000")

# Small waits so that retries, restarts and recoveries happen within seconds.
FAST = {"PACS_FORWARD_POLL_S": "0.2", "PACS_FORWARD_RETRY_BASE_S": "0.2", "PACS_FORWARD_RETRY_MAX_S": "1",
        "PACS_FORWARD_MAX_ATTEMPTS": "1000", "PACS_FORWARD_BATCH_SIZE": "4"}


# -- rule matching (pure) ------------------------------------------------------------------------


def _rule(name: str = "r", to: str = "DEST", **kw: str) -> RuleRecord:
    fields = {"source_ae": "", "modality": "", "body_part_examined": "", "sop_class_uid": "", **kw}
    return RuleRecord(name, to, fields["source_ae"], fields["modality"], fields["body_part_examined"],
                      fields["sop_class_uid"], True)


CHEST_CT = RuleMatch(source_ae="CT01", modality="CT", body_part_examined="CHEST", sop_class_uid=CT)


@pytest.mark.parametrize(("rule", "matches"), [
    (_rule(), True),  # no criteria: everything
    (_rule(modality="CT"), True),
    (_rule(modality="ct"), True),  # modality ignores case
    (_rule(modality="MR"), False),
    (_rule(body_part_examined="chest"), True),
    (_rule(body_part_examined="HEAD"), False),
    (_rule(source_ae="CT01"), True),
    (_rule(source_ae="ct01"), False),  # AE titles are case-sensitive
    (_rule(sop_class_uid=CT), True),
    (_rule(sop_class_uid=CT + ".1"), False),
    (_rule(modality="CT", body_part_examined="CHEST", source_ae="CT01", sop_class_uid=CT), True),
    (_rule(modality="CT", body_part_examined="ABDOMEN"), False),  # every criterion must hold
])
def test_rule_matching(rule: RuleRecord, matches: bool) -> None:
    assert rule_matches(rule, CHEST_CT) is matches


def test_destinations_skip_the_sender_disabled_rules_and_repeats() -> None:
    rules = [_rule("a", "AI"), _rule("b", "AI", modality="CT"), _rule("c", "CT01"), _rule("d", "TELE", modality="MR"),
             RuleRecord("e", "OFF", "", "", "", "", False)]
    assert destinations_for(rules, CHEST_CT) == {"AI": "a"}  # not back to CT01, not the disabled one


def test_backoff_doubles_up_to_the_cap_and_warnings_count_as_delivered() -> None:
    assert [retry_delay(n, 5, 600) for n in (1, 2, 3, 4, 7, 8, 50)] == [5, 10, 20, 40, 320, 600, 600]
    assert [is_delivered(s) for s in (0x0000, 0xB000, 0xB006, 0xB007)] == [True] * 4
    assert [is_delivered(s) for s in (0xA700, 0xA900, 0xC000, 0x0122, 0xB008)] == [False] * 5


# -- queueing at ingest and the sender, in process (SQLite + filesystem, real DICOM peers) ---------


@dataclass
class Archive:
    ctx: AppContext
    ingestor: Ingestor

    def jobs(self, **where: str) -> list[ForwardJob]:
        with self.ctx.sessions() as s:
            stmt = select(ForwardJob).order_by(ForwardJob.id)
            for name, value in where.items():
                stmt = stmt.where(getattr(ForwardJob, name) == value)
            return list(s.scalars(stmt))

    def delivery(self, **kw: float) -> ForwardDelivery:
        config = {"calling_ae": "PACS", "poll_s": 0.1, "batch_size": 10, "max_attempts": 3, "retry_base_s": 0.05,
                  "retry_max_s": 0.2, "network_timeout_s": 5, **kw}
        return ForwardDelivery(self.ctx, DeliveryConfig(**config))  # type: ignore[arg-type]

    def make_due(self) -> None:
        """Skip the backoff wait (the loop's own timing is covered end to end)."""
        with self.ctx.sessions() as s, s.begin():
            for job in s.scalars(select(ForwardJob).where(ForwardJob.state == "pending")):
                job.next_attempt_at = datetime.now(UTC)


@pytest.fixture()
def archive(tmp_path: Path) -> Iterator[Archive]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(ctx.engine)
    try:
        yield Archive(ctx, Ingestor(ctx.sessions, ctx.store))
    finally:
        ctx.close()


def _uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


class StatusSCP:
    """A pynetdicom Storage SCP answering each SOP instance with the status the test chose (default Success)."""

    def __init__(self, sop_classes: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.statuses: dict[str, int] = {}
        self.received: list[str] = []
        self.callers: list[str] = []
        self.delay_s = 0.0
        ae = AE(ae_title="STATUSSCP")
        ae.supported_contexts = [cx for cx in StoragePresentationContexts
                                 if not sop_classes or cx.abstract_syntax in sop_classes]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> Dataset:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        self.received.append(sop_uid)
        self.callers.append(str(event.assoc.requestor.ae_title).strip())
        time.sleep(self.delay_s)
        status = Dataset()
        status.Status = self.statuses.get(sop_uid, 0)
        if status.Status not in (0, 0xB000):
            status.ErrorComment = "disk full"
        return status

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture()
@starts_servers
def status_scp() -> Iterator[StatusSCP]:
    scp = StatusSCP()
    yield scp
    scp.stop()


def test_ingest_queues_matching_instances_once_per_version(archive: Archive) -> None:
    with archive.ctx.sessions() as s, s.begin():
        add_ae(s, "AI", "127.0.0.1", 104)
        add_ae(s, "TELE", "127.0.0.1", 105)
        add_rule(s, "ct-ai", "AI", modality="ct")
        add_rule(s, "chest-tele", "TELE", body_part_examined="Chest")
        add_rule(s, "all-ai", "AI")  # second rule to the same destination: still one job
    v1 = make_instance(Modality="CT", BodyPartExamined="CHEST", SeriesDescription="v1")
    assert archive.ingestor.ingest(v1, MODALITY).status is IngestStatus.STORED
    sop_uid = _uid(v1)
    assert sorted(j.destination_ae for j in archive.jobs()) == ["AI", "TELE"]
    assert archive.ingestor.ingest(v1, MODALITY).status is IngestStatus.DUPLICATE
    assert len(archive.jobs()) == 2  # identical re-send: nothing new to forward

    v2 = make_instance(Modality="CT", BodyPartExamined="CHEST", SeriesDescription="v2", SOPInstanceUID=sop_uid)
    assert archive.ingestor.ingest(v2, MODALITY).status is IngestStatus.NEW_VERSION
    assert len(archive.jobs(destination_ae="AI")) == 2  # the new version is forwarded again

    with archive.ctx.sessions() as s, s.begin():  # v1 was delivered and failed elsewhere; it comes back (A-B-A)
        for job in s.scalars(select(ForwardJob).where(ForwardJob.destination_ae == "AI")):
            job.state, job.attempts = "sent", 3
    assert archive.ingestor.ingest(v1, MODALITY).status is IngestStatus.NEW_VERSION
    ai = archive.jobs(destination_ae="AI")
    assert len(ai) == 2 and [j.state for j in ai] == ["pending", "sent"]  # v1's job re-armed, not duplicated
    assert ai[0].attempts == 0

    from_ai = make_instance(Modality="CT")
    assert archive.ingestor.ingest(from_ai, IngestSource("dimse", calling_ae="AI")).ok
    other = make_instance(Modality="OT")
    assert archive.ingestor.ingest(other, MODALITY).ok
    uids = {_uid(from_ai), _uid(other)}
    by_uid = {j.sop_instance_uid: j.destination_ae for j in archive.jobs() if j.sop_instance_uid in uids}
    # the AI's own result is not sent back to it; the OT object only matched the catch-all rule
    assert sorted(by_uid.values()) == ["AI"] and len(by_uid) == 1


def test_rule_validation(archive: Archive) -> None:
    with archive.ctx.sessions() as s, s.begin():
        with pytest.raises(InvalidInput, match="not a registered AE"):
            add_rule(s, "r", "NOWHERE")
        add_ae(s, "DEST", "127.0.0.1", 104)
        add_rule(s, "r", "DEST")
        with pytest.raises(InvalidInput, match="SOP Class UID"):
            add_rule(s, "r2", "DEST", sop_class_uid="1.2.x")
    with archive.ctx.sessions() as s, s.begin(), pytest.raises(Conflict):
        add_rule(s, "r", "DEST")
    with archive.ctx.sessions() as s, s.begin():
        remove_rule(s, "r")
        with pytest.raises(NotFound):
            remove_rule(s, "r")


def test_sender_statuses_retries_and_failure(archive: Archive, status_scp: StatusSCP) -> None:
    with archive.ctx.sessions() as s, s.begin():
        add_ae(s, "DEST", "127.0.0.1", status_scp.port)
        add_rule(s, "all", "DEST")
    objects = [make_instance(Modality="CT") for _ in range(4)]
    uids = [_uid(b) for b in objects]
    for data in objects:
        assert archive.ingestor.ingest(data, MODALITY).ok
    status_scp.statuses = {uids[1]: 0xB000, uids[2]: 0xA700}  # a warning is delivered; out of resources is not
    delivery = archive.delivery()
    delivery.run_once()
    state = {j.sop_instance_uid: (j.state, j.attempts) for j in archive.jobs()}
    assert state == {uids[0]: ("sent", 0), uids[1]: ("sent", 0), uids[2]: ("pending", 1), uids[3]: ("sent", 0)}
    assert status_scp.received == uids  # one association, in queue order

    for _ in range(2):  # max_attempts=3: two more refusals and it is failed
        archive.make_due()
        delivery.run_once()
    failed = archive.jobs(sop_instance_uid=uids[2])[0]
    assert (failed.state, failed.attempts) == ("failed", 3)
    assert failed.last_error == "C-STORE status 0xA700: disk full"
    with archive.ctx.sessions() as s:
        [stats] = queue_stats(s)
    assert (stats.destination_ae, stats.pending, stats.sent, stats.failed) == ("DEST", 0, 3, 1)

    status_scp.statuses = {}
    with archive.ctx.sessions() as s, s.begin():
        assert retry_failed(s, "DEST") == 1
    delivery.run_once()
    assert [j.state for j in archive.jobs()] == ["sent"] * 4


@pytest.mark.integration
def test_unreachable_destination_and_superseded_versions(archive: Archive) -> None:
    closed = free_port()
    with archive.ctx.sessions() as s, s.begin():
        add_ae(s, "DOWN", "127.0.0.1", closed)
        add_rule(s, "all", "DOWN")
    v1 = make_instance(Modality="CT", SeriesDescription="v1")
    sop_uid = _uid(v1)
    assert archive.ingestor.ingest(v1, MODALITY).ok
    assert archive.ingestor.ingest(make_instance(Modality="CT"), MODALITY).ok
    delivery = archive.delivery(retry_base_s=30, retry_max_s=30)
    delivery.run_once()
    jobs = archive.jobs()
    assert [(j.state, j.attempts) for j in jobs] == [("pending", 1)] * 2
    assert all("is unreachable" in j.last_error for j in jobs)
    assert all(j.next_attempt_at.replace(tzinfo=UTC) > datetime.now(UTC) for j in jobs)  # backed off
    archive.make_due()
    delivery.run_once()  # this process leaves a down destination alone during the backoff
    assert [j.attempts for j in archive.jobs()] == [1, 1]

    # v1 is replaced before it could be sent: sending it late would leave the destination with the old one
    assert archive.ingestor.ingest(make_instance(Modality="CT", SeriesDescription="v2", SOPInstanceUID=sop_uid),
                                   MODALITY).status is IngestStatus.NEW_VERSION
    archive.make_due()
    archive.delivery().run_once()
    [old] = archive.jobs(sop_instance_uid=sop_uid, sha256=hashlib.sha256(v1).hexdigest())
    assert old.state == "failed" and "superseded" in old.last_error


@pytest.mark.integration
def test_objects_the_destination_does_not_take_count_against_themselves(archive: Archive) -> None:
    scp = StatusSCP(sop_classes=(CT,))
    try:
        with archive.ctx.sessions() as s, s.begin():
            add_ae(s, "CTONLY", "127.0.0.1", scp.port)
            add_rule(s, "all", "CTONLY")
        ct, sc = make_instance(SOPClassUID=CT, Modality="CT"), make_instance(Modality="OT")
        for data in (ct, sc):
            assert archive.ingestor.ingest(data, MODALITY).ok
        delivery = archive.delivery(max_attempts=2)
        delivery.run_once()  # one association: the CT goes, the secondary capture has no context
        state = {j.sop_instance_uid: (j.state, j.attempts) for j in archive.jobs()}
        assert state == {_uid(ct): ("sent", 0), _uid(sc): ("pending", 1)}
        archive.make_due()
        delivery.run_once()  # alone: every context refused (pynetdicom aborts); not a destination outage
        [job] = archive.jobs(sop_instance_uid=_uid(sc))
        assert (job.state, job.attempts) == ("failed", 2) and "no presentation context" in job.last_error
        assert scp.received == [_uid(ct)]
    finally:
        scp.stop()


def test_stop_hands_back_the_rest_of_a_claimed_batch(archive: Archive, status_scp: StatusSCP) -> None:
    with archive.ctx.sessions() as s, s.begin():
        add_ae(s, "DEST", "127.0.0.1", status_scp.port)
        add_rule(s, "all", "DEST")
    for _ in range(6):
        assert archive.ingestor.ingest(make_instance(Modality="CT"), MODALITY).ok
    status_scp.delay_s = 0.3
    delivery = archive.delivery(lease_s=600).start()
    wait_until(lambda: len(status_scp.received) >= 2, timeout=10, what="the batch being sent")
    delivery.stop()
    jobs = archive.jobs()
    sent = [j for j in jobs if j.state == "sent"]
    waiting = [j for j in jobs if j.state == "pending"]
    assert 2 <= len(sent) < 6 and len(sent) + len(waiting) == 6
    # not left to the 10-minute lease: a restarted sender takes them at once
    assert all(j.next_attempt_at.replace(tzinfo=UTC) < datetime.now(UTC) + timedelta(seconds=5) for j in waiting)
    assert all(j.attempts == 0 for j in waiting)


@pytest.mark.integration
def test_two_senders_on_postgresql_share_the_queue_without_sending_twice(
    fresh_pg_url: str, tmp_path: Path, status_scp: StatusSCP
) -> None:
    ctx = AppContext.create(Settings(database_url=fresh_pg_url, data_dir=tmp_path / "data"))
    try:
        migrate.upgrade(ctx.engine)
        archive = Archive(ctx, Ingestor(ctx.sessions, ctx.store))
        with ctx.sessions() as s, s.begin():
            add_ae(s, "DEST", "127.0.0.1", status_scp.port)
            add_rule(s, "all", "DEST")
        uids = []
        for _ in range(12):
            data = make_instance(Modality="CT")
            assert archive.ingestor.ingest(data, MODALITY).ok
            uids.append(_uid(data))
        status_scp.delay_s = 0.05
        senders = [archive.delivery(calling_ae=f"PACS{i}", batch_size=3).start() for i in (1, 2)]
        try:
            wait_until(lambda: all(j.state == "sent" for j in archive.jobs()), timeout=30, what="12 jobs sent")
        finally:
            for sender in senders:
                sender.stop()
        assert sorted(status_scp.received) == sorted(uids)  # each exactly once: claims never overlap
        assert set(status_scp.callers) == {"PACS1", "PACS2"}  # and both took batches
    finally:
        ctx.close()


@pytest.mark.integration
def test_cli_rules_and_retry(archive: Archive) -> None:
    env = {"PACS_DATA_DIR": str(archive.ctx.settings.data_dir)}
    with archive.ctx.sessions() as s, s.begin():
        add_ae(s, "AI", "10.0.0.9", 104)
        s.add(ForwardJob(destination_ae="AI", sop_instance_uid="1.2.3", sha256="0" * 64, state="failed", attempts=20,
                         next_attempt_at=datetime.now(UTC), last_error="C-STORE status 0xA700"))
    added = run_pacs(["forward", "add", "chest-ai", "--to", "AI", "--modality", "ct", "--body-part", "chest",
                      "--source-ae", "CT01", "--sop-class", CT], env)
    assert added.returncode == 0, added.stderr
    assert json.loads(run_pacs(["forward", "list", "--json"], env).stdout) == [
        {"name": "chest-ai", "destination_ae": "AI", "source_ae": "CT01", "modality": "CT",
         "body_part_examined": "CHEST", "sop_class_uid": CT, "enabled": True}]
    retried = run_pacs(["forward", "retry", "--destination", "AI"], env)  # processes: the commands an operator runs
    assert retried.returncode == 0 and "1 failed delivery queued again" in retried.stdout
    assert [(j.state, j.attempts) for j in archive.jobs()] == [("pending", 0)]
    removed = run_pacs(["forward", "remove", "nope"], env)  # a process: its exit code
    assert removed.returncode == 1 and "no forwarding rule named 'nope'" in removed.stderr


# -- end to end: real `pacs` processes, DCMTK sender, DCMTK storescp as the destination ------------


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _jobs(ctx: AppContext, sop_uids: set[str]) -> list[ForwardJob]:
    with ctx.sessions() as s:
        return list(s.scalars(select(ForwardJob).where(ForwardJob.sop_instance_uid.in_(sop_uids))))


def _assert_received_exactly(ctx: AppContext, ref: ReferenceStoreSCP, expected: set[str]) -> None:
    """The destination got exactly these instances, each dataset byte for byte as we stored it."""
    received = {_sop_uid(p): p for p in ref.received()}
    assert set(received) == expected
    with ctx.sessions() as s:
        keys = {uid: key for uid, key in s.execute(select(Instance.sop_instance_uid, Instance.object_key)
                                                   .where(Instance.sop_instance_uid.in_(expected)))}
    for uid, path in received.items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(ctx.store.get_bytes(keys[uid])), uid


def _forwarding_scenario(port: int, ctx: AppContext, ref: ReferenceStoreSCP, env: dict[str, str], tmp: Path,
                         restart: Callable[[], None]) -> None:
    ct = write_ct_series(tmp / "ct", slices=10, size=64)
    other = tmp / "ot.dcm"
    other.write_bytes(make_instance(Modality="OT"))
    result = storescu(port, [*ct, other], "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-2000:]
    first = {_sop_uid(p) for p in ct}
    try:
        wait_until(lambda: len(ref.received()) >= 10 and all(j.state == "sent" for j in _jobs(ctx, first)),
                   timeout=30, what="10 CT instances at the destination")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; {ref.status()}") from exc
    time.sleep(0.5)  # nothing else (the OT object) follows
    _assert_received_exactly(ctx, ref, first)
    assert not _jobs(ctx, {_sop_uid(other)})

    ref.stop()  # destination down: the jobs wait, attempts grow
    ref.clear()
    more = write_ct_series(tmp / "more", slices=5, size=64)
    assert storescu(port, more, "-xe").status == 0
    second = {_sop_uid(p) for p in more}
    wait_until(lambda: (len(jobs := _jobs(ctx, second)) == 5 and all(j.state == "pending" and j.attempts >= 2
                                                                      for j in jobs)),
               timeout=20, what="pending forward jobs retried while the destination is down")
    restart()  # the queue is the table: it survives the sender's restart
    assert all(j.state == "pending" for j in _jobs(ctx, second))
    ref.start()
    wait_until(lambda: all(j.state == "sent" for j in _jobs(ctx, second)), timeout=30,
               what="queued instances delivered after the destination came back")
    _assert_received_exactly(ctx, ref, second)

    queue = run_pacs(["forward", "queue", "--json"], env)
    assert queue.returncode == 0, queue.stderr
    [row] = json.loads(queue.stdout)
    assert (row["destination_ae"], row["pending"], row["sent"], row["failed"]) == ("REFSCP", 0, 15, 0)


def _setup_rule(ctx: AppContext, ref_port: int) -> None:
    """Schema, destination AE and a CT rule, written directly (the CLI for them is tested above)."""
    migrate.upgrade(ctx.engine)
    with ctx.sessions() as s, s.begin():
        add_ae(s, "REFSCP", "127.0.0.1", ref_port)
        add_rule(s, "ct-to-ref", "REFSCP", modality="ct")


@pytest.fixture()
def reference_scp(tmp_path: Path) -> Iterator[ReferenceStoreSCP]:
    ref = ReferenceStoreSCP(tmp_path / "reference", free_port()).start()
    yield ref
    ref.stop()


@pytest.mark.integration
def test_embedded_forwarding_end_to_end(tmp_path: Path, reference_scp: ReferenceStoreSCP) -> None:
    pacs = EmbeddedPacs(tmp_path, FAST)
    try:
        _setup_rule(pacs.ctx, reference_scp.port)
        _forwarding_scenario(pacs.port, pacs.ctx, reference_scp, pacs.env, tmp_path, pacs.restart)
    finally:
        pacs.close()


@pytest.mark.integration
def test_scaled_forwarding_end_to_end(tmp_path: Path, reference_scp: ReferenceStoreSCP,
                                      s3_server: SeaweedS3) -> None:
    broker = REDIS_URL.rsplit("/", 1)[0] + "/13"  # not the other tests' broker database
    with ScaledStack(tmp_path, s3_server.url_for(f"pacs-fwd-{uuid.uuid4().hex[:10]}"), broker_url=broker,
                     extra_env=FAST) as stack:
        _setup_rule(stack.ctx, reference_scp.port)
        stack.up("worker", "scp", worker_concurrency=2)

        def restart() -> None:
            stack.restart("worker")

        _forwarding_scenario(stack.port, stack.ctx, reference_scp, stack.env, tmp_path, restart)
        # one delivery loop per worker node (main process, not each pool process), none in `pacs scp`
        assert stack.worker.log_path.read_text().count("delivery loop started") == 2  # two worker runs
        assert "delivery loop started" not in stack.scp.log_path.read_text()

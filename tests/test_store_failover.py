"""No single object-store endpoint (issue 17): an S3 store URL listing several endpoints fails over between them.

Unit tier: the URL form, which errors count as the endpoint failing (never an S3 answer), the endpoint pool's
order (sticky preference, cool-down), the store's failover loop with stand-in operations, and the replay of a
put's bytes.

Integration tier, on a SeaweedFS cluster of separate processes (one master with replication 001, two volume
servers, one filer, two S3 gateways: :class:`tests.support.seaweed.SeaweedCluster`) and `pacs serve` whose
``PACS_STORAGE_URL`` lists both gateways:

- a gateway stopped mid-ingest: the store fails over to the other one, every image is acknowledged, indexed and
  readable through the surviving gateway;
- a volume server stopped mid-ingest: SeaweedFS refuses writes while a replica is missing, so ingest fails
  cleanly (C-STORE 0xA7xx, nothing indexed without its object), acknowledged images stay readable from the
  other replica, and `pacs check` finds no error once the volume server is back;
- in-process: a put whose endpoint is cut while it streams a multipart object is sent again, from the start,
  to the other endpoint (seekable and non-seekable sources).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Iterator

import pytest
from minio.error import S3Error
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from sqlalchemy import select
from urllib3.exceptions import (
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)

from pacs.db.models import Instance
from pacs.maintenance.check import check
from storage import ObjectNotFound, ObjectStore, StorageUnavailable, open_store, s3
from storage.failover import EndpointPool, is_connection_error
from storage.s3 import S3Store, _replayable
from tests.support.datasets import make_dataset
from tests.support.fault_proxy import FaultProxy
from tests.support.seaweed import SeaweedCluster
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

# -- unit: the URL ------------------------------------------------------------------------------------------------


def test_url_lists_several_endpoints() -> None:
    store = open_store("s3://AK:s3cr%40t@Gw1.example:9000,gw2.example:9001,[fd00::2]:9000/pacs?cooldown=5&retries=0")
    assert isinstance(store, S3Store)
    assert store.endpoints == ("gw1.example:9000", "gw2.example:9001", "[fd00::2]:9000")
    assert store.endpoint == "gw1.example:9000,gw2.example:9001,[fd00::2]:9000"
    assert store.describe() == "s3://AK:***@gw1.example:9000,gw2.example:9001,[fd00::2]:9000/pacs"
    assert store.endpoint_status() == [(e, True) for e in store.endpoints]
    # IPv6 addresses in brackets, several of them (a netloc some Python versions' urlsplit refuses)
    ipv6 = open_store("s3+https://AK:secret@[fd00::2]:9000,[FD00::3]:9000/pacs")
    assert isinstance(ipv6, S3Store) and ipv6.endpoints == ("[fd00::2]:9000", "[fd00::3]:9000") and ipv6.secure
    single = open_store("s3://AK:secret@gw1.example:9000/pacs")
    assert isinstance(single, S3Store) and single.endpoints == ("gw1.example:9000",)
    assert single._pool is None  # one endpoint: the direct path, as before


@pytest.mark.parametrize("url, message", [
    ("s3://a:topsecret@h1:9000,,h2:9000/bkt", "empty host"),
    ("s3://a:topsecret@h1:9000,h2:9000,/bkt", "empty host"),
    ("s3://a:topsecret@h1:9000,H1:9000/bkt", "listed twice"),
    ("s3://a:topsecret@h1:9000,h2:x/bkt", "invalid port"),
    ("s3://a:topsecret@h1:9000,h2:9000/bkt?cooldown=-1", "cooldown"),
    ("s3://a:topsecret@h1:9000,h2:9000/bkt?cooldown=soon", "soon"),
    ("s3://h1:9000,h2:9000/bkt", "credentials"),
    ("s3://a:topsecret@h1:9000,h2:9000/", "bucket"),
])
def test_bad_endpoint_lists_are_refused_without_the_secret(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    assert message in str(info.value) and "topsecret" not in str(info.value)


# -- unit: what counts as the endpoint failing ---------------------------------------------------------------------


def _s3_error(code: str) -> S3Error:
    return S3Error(None, code, "message", "/bkt/key", "req", "host")  # type: ignore[arg-type]


@pytest.mark.parametrize("exc, expected", [
    (NewConnectionError(None, "refused"), True),  # type: ignore[arg-type]
    (MaxRetryError(None, "/", NewConnectionError(None, "refused")), True),  # type: ignore[arg-type]
    (MaxRetryError(None, "/", ReadTimeoutError(None, "/", "timed out")), True),  # type: ignore[arg-type]
    (ReadTimeoutError(None, "/", "timed out"), True),  # type: ignore[arg-type]
    (ProtocolError("Connection aborted.", ConnectionResetError()), True),
    (ConnectionRefusedError(), True),
    (MaxRetryError(None, "/", ResponseError("too many 503 error responses")), False),  # type: ignore[arg-type]
    (_s3_error("NoSuchKey"), False),
    (_s3_error("AccessDenied"), False),
    (_s3_error("InternalError"), False),
    (ValueError("stream ended early"), False),
])
def test_only_connection_level_errors_fail_over(exc: BaseException, expected: bool) -> None:
    assert is_connection_error(exc) is expected


# -- unit: the endpoint pool ---------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pool_prefers_the_endpoint_that_last_worked_and_cools_failed_ones_down() -> None:
    clock = _Clock()
    pool = EndpointPool(["a", "b", "c"], cooldown_s=30, clock=clock)
    assert pool.order() == [0, 1, 2]
    pool.failed(0, ConnectionRefusedError())
    assert pool.order() == [1, 2, 0]  # a cooling endpoint is still the last resort
    pool.succeeded(1)
    assert pool.preferred == "b"
    clock.now += 31  # a's cool-down is over: usable again, but b stays first (sticky)
    assert pool.order() == [1, 2, 0]
    assert pool.status() == [("a", True), ("b", True), ("c", True)]
    pool.failed(1, ConnectionRefusedError())
    assert pool.order() == [2, 0, 1]
    assert pool.status() == [("a", True), ("b", False), ("c", True)]


def test_pool_with_every_endpoint_down_tries_the_one_back_soonest_first() -> None:
    clock = _Clock()
    pool = EndpointPool(["a", "b"], cooldown_s=30, clock=clock)
    pool.failed(1, ConnectionRefusedError())
    clock.now += 5
    pool.failed(0, ConnectionRefusedError())
    assert pool.order() == [1, 0]
    pool.succeeded(0)  # a answered after all
    assert pool.order() == [0, 1] and pool.status() == [("a", True), ("b", False)]


def test_pool_refuses_bad_configuration() -> None:
    for endpoints, cooldown in (([], 1.0), (["a", "a"], 1.0), (["a"], -1.0)):
        with pytest.raises(ValueError):
            EndpointPool(endpoints, cooldown_s=cooldown)


# -- unit: the store's failover loop (stand-in operations, no server) ------------------------------------------


def _two_endpoint_store() -> S3Store:
    return S3Store(["127.0.0.1:1", "127.0.0.1:2"], "ak", "sk", "bkt", cooldown=60)


def test_store_fails_over_on_connection_errors_and_sticks_to_the_one_that_worked() -> None:
    store = _two_endpoint_store()
    tried: list[str] = []

    def first_refuses(endpoint: object) -> str:
        name = endpoint.name  # type: ignore[attr-defined]
        tried.append(name)
        if name == "127.0.0.1:1":
            raise MaxRetryError(None, "/", NewConnectionError(None, "refused"))  # type: ignore[arg-type]
        return "answer"

    assert store._call("k", first_refuses) == "answer"
    assert tried == ["127.0.0.1:1", "127.0.0.1:2"]
    assert store.endpoint_status() == [("127.0.0.1:1", False), ("127.0.0.1:2", True)]
    tried.clear()
    assert store._call("k", first_refuses) == "answer"
    assert tried == ["127.0.0.1:2"]  # sticky: the failed one is not tried first again


def test_store_never_fails_over_on_an_s3_answer() -> None:
    store = _two_endpoint_store()
    tried: list[str] = []

    def not_found(endpoint: object) -> None:
        tried.append(endpoint.name)  # type: ignore[attr-defined]
        raise _s3_error("NoSuchKey")

    with pytest.raises(ObjectNotFound):
        store._call("k", not_found)
    assert tried == ["127.0.0.1:1"]
    assert store.endpoint_status() == [("127.0.0.1:1", True), ("127.0.0.1:2", True)]


def test_store_with_every_endpoint_unreachable_is_unavailable() -> None:
    store = _two_endpoint_store()
    tried: list[str] = []

    def refused(endpoint: object) -> None:
        tried.append(endpoint.name)  # type: ignore[attr-defined]
        raise ProtocolError("Connection aborted.", ConnectionResetError())

    with pytest.raises(StorageUnavailable) as info:
        store._call("k", refused)
    assert tried == ["127.0.0.1:1", "127.0.0.1:2"] and "every S3 endpoint of" in str(info.value)


class _OneWayStream(io.RawIOBase):
    """Readable once, not seekable: what a put must spool before it can send it twice."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("kind", ["bytes", "seekable", "one-way", "one-way-unknown-length"])
def test_a_put_replays_the_same_bytes_on_every_attempt(kind: str) -> None:
    payload = bytes(range(256)) * 40
    prefix = b"not-part-of-the-object"
    data: bytes | io.BufferedIOBase | _OneWayStream
    if kind == "bytes":
        data = payload
    elif kind == "seekable":
        data = io.BytesIO(prefix + payload)
        data.seek(len(prefix))  # the put starts where the stream is, not at 0
    else:
        data = _OneWayStream(payload)
    length = None if kind == "one-way-unknown-length" else len(payload)
    with _replayable(data, length) as fresh:  # type: ignore[arg-type]
        for _ in range(3):
            source, n = fresh()
            assert source.read() == payload and n in (len(payload), None)


def test_a_short_one_way_stream_fails_before_any_request() -> None:
    with pytest.raises(ValueError), _replayable(_OneWayStream(b"abc"), 10) as fresh:  # type: ignore[arg-type]
        fresh()


# -- integration: the cluster --------------------------------------------------------------------------------------

IMAGES = 16
STOP_AFTER = 4  # acknowledged images before the member is stopped
OUT_OF_RESOURCES = range(0xA700, 0xA800)
# the pacs process: no urllib3 retry on the same endpoint (the other endpoint is the retry), short timeouts
PROCESS_QUERY = "retries=0&connect_timeout=1&read_timeout=3&cooldown=60"


@pytest.fixture(scope="module")
@starts_servers
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with SeaweedCluster(tmp_path_factory.mktemp("seaweed-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def bucket() -> str:
    return "pacs-failover"


@pytest.fixture(scope="module")
def pacs(cluster: SeaweedCluster, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    url = cluster.url_for(bucket, query=PROCESS_QUERY)
    with EmbeddedPacs(tmp_path_factory.mktemp("failover"), {"PACS_STORAGE_URL": url}) as server:
        yield server


def _images(count: int) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=i + 1,
                         PatientID="FAILOVER-1") for i in range(count)]


class _Sender(threading.Thread):
    """Sends the images on one association and records each C-STORE status (None: no answer).

    After ``pause_after`` answers it says so (:attr:`reached`) and sends one more image, in flight while the
    test stops a cluster member, then waits for :meth:`go_on`; it stops at the first failure when
    ``stop_at_failure``.
    """

    def __init__(self, port: int, images: list[Dataset], pause_after: int, stop_at_failure: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.images = port, images
        self.pause_after, self.stop_at_failure = pause_after, stop_at_failure
        self.statuses: list[int | None] = []
        self.reached = threading.Event()
        self._resume = threading.Event()
        self.error: BaseException | None = None

    def go_on(self) -> None:
        self._resume.set()

    def run(self) -> None:
        try:
            ae = AE(ae_title="FAILOVER")
            ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
            ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
            assoc = ae.associate("127.0.0.1", self.port, ae_title="PACS")
            assert assoc.is_established, "association refused"
            try:
                for i, ds in enumerate(self.images):
                    if i == self.pause_after:
                        self.reached.set()
                    if i == self.pause_after + 1:
                        assert self._resume.wait(60), "the test never said go on"
                    status = assoc.send_c_store(ds)
                    code = int(status.Status) if status and "Status" in status else None
                    self.statuses.append(code)
                    if code != 0 and self.stop_at_failure:
                        break
            finally:
                assoc.release()
        except BaseException as exc:
            self.error = exc
        finally:
            self.reached.set()


def _send_and_stop(pacs: EmbeddedPacs, images: list[Dataset], stop: Callable[[], None],
                   stop_at_failure: bool) -> list[int | None]:
    sender = _Sender(pacs.port, images, STOP_AFTER, stop_at_failure)
    sender.start()
    assert sender.reached.wait(60), f"the sender never got {STOP_AFTER} answers"
    stop()  # while image STOP_AFTER (the fifth) is in flight; the sixth waits for the stop
    sender.go_on()
    sender.join(120)
    assert not sender.is_alive() and sender.error is None, sender.error
    assert sender.statuses[:STOP_AFTER] == [0] * STOP_AFTER
    return sender.statuses


def _indexed(pacs: EmbeddedPacs, sop_uids: list[str]) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (object key, SHA-256) of the index rows of ``sop_uids``."""
    with pacs.ctx.sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.object_key, Instance.sha256)
                               .where(Instance.sop_instance_uid.in_(sop_uids))).all()
    return {uid: (key, sha256) for uid, key, sha256 in rows}


def _assert_readable(store: ObjectStore, ds: Dataset, indexed: dict[str, tuple[str, str]]) -> None:
    """The object the index names for ``ds`` is in ``store``, with the indexed content, and is ``ds``."""
    key, sha256 = indexed[ds.SOPInstanceUID]
    data = store.get_bytes(key)
    assert hashlib.sha256(data).hexdigest() == sha256
    assert dcmread(io.BytesIO(data)).SOPInstanceUID == ds.SOPInstanceUID


def test_a_gateway_stopped_mid_ingest_loses_nothing(pacs: EmbeddedPacs, cluster: SeaweedCluster,
                                                    bucket: str) -> None:
    images = _images(IMAGES)
    try:
        statuses = _send_and_stop(pacs, images, lambda: cluster.stop_member("s3a"), stop_at_failure=False)
        # exactly this: the store went on through s3b, so every image was acknowledged
        assert statuses == [0] * IMAGES, statuses
        indexed = _indexed(pacs, [ds.SOPInstanceUID for ds in images])
        assert len(indexed) == IMAGES
        survivor = open_store(cluster.url_for(bucket, gateways=("s3b",)))
        for ds in images:
            _assert_readable(survivor, ds, indexed)
        log = pacs.proc.log_path.read_text(errors="replace")
        assert f"S3 endpoint {cluster.endpoint('s3a')} unreachable" in log  # it did fail over
    finally:
        cluster.start_member("s3a")


def test_a_volume_server_stopped_mid_ingest_fails_cleanly(pacs: EmbeddedPacs, cluster: SeaweedCluster,
                                                          bucket: str) -> None:
    images = _images(IMAGES)
    try:
        statuses = _send_and_stop(pacs, images, lambda: cluster.stop_member("volume2"), stop_at_failure=True)
        # exactly this: with replication 001 SeaweedFS refuses writes while a replica is down, so the images
        # sent after the stop fail (out of resources); the one in flight during the stop may have made it
        assert statuses[-1] in OUT_OF_RESOURCES and len(statuses) <= STOP_AFTER + 2, statuses
        assert all(code == 0 for code in statuses[:-1]), statuses
        sent = images[:len(statuses)]
        acked = [ds for ds, code in zip(sent, statuses, strict=True) if code == 0]
        failed = [ds for ds, code in zip(sent, statuses, strict=True) if code != 0]
        indexed = _indexed(pacs, [ds.SOPInstanceUID for ds in sent])
        assert set(indexed) == {ds.SOPInstanceUID for ds in acked}  # nothing indexed without its object
        # acknowledged images are readable from the other replica while volume2 is still down
        store = open_store(cluster.url_for(bucket))
        for ds in acked:
            _assert_readable(store, ds, indexed)
    finally:
        cluster.start_member("volume2")
    # back to normal: the failed image is accepted when sent again, and the archive checks clean
    again = _Sender(pacs.port, failed, pause_after=len(failed), stop_at_failure=False)
    again.run()
    assert again.error is None and again.statuses == [0] * len(failed)
    indexed = _indexed(pacs, [ds.SOPInstanceUID for ds in sent])
    assert set(indexed) == {ds.SOPInstanceUID for ds in sent}
    summary = check(pacs.ctx.sessions, pacs.ctx.store)
    # no error, and no orphan either: a put that timed out and that SeaweedFS finished later stored the very
    # object (content-addressed key) the re-send indexed
    assert summary.ok and summary.problems == [], summary.problems
    assert summary.checked >= len(sent)


# -- integration: a put cut mid-stream, in process -----------------------------------------------------------------


class _CuttingStream(io.RawIOBase):
    """A seekable (or not) stream of ``size`` bytes that calls ``cut`` once, after ``cut_at`` bytes were read."""

    def __init__(self, data: bytes, cut_at: int, cut: Callable[[], None], seekable: bool) -> None:
        super().__init__()
        self._data = io.BytesIO(data)
        self._cut_at, self._cut, self._seekable = cut_at, cut, seekable
        self.reads_past_cut = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("tell")
        return self._data.tell()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        if self._data.tell() >= self._cut_at and self._cut is not None:
            cut, self._cut = self._cut, None  # type: ignore[assignment]
            cut()
        return len(chunk)


@pytest.mark.parametrize("seekable", [True, False])
def test_a_multipart_put_cut_mid_stream_is_sent_again_to_the_other_endpoint(
        cluster: SeaweedCluster, seekable: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "PART_SIZE", 5 * 1024 * 1024)  # minio's smallest part: a cheaper multipart object
    proxy = FaultProxy("127.0.0.1", cluster.port("s3a")).start()
    try:
        bucket = f"pacs-cut-{'seek' if seekable else 'oneway'}"
        url = cluster.url_for(bucket).replace(cluster.endpoint("s3a"), f"127.0.0.1:{proxy.port}")
        store = open_store(url + "?retries=0&connect_timeout=1&read_timeout=5")
        assert isinstance(store, S3Store)
        store.ping()  # the bucket exists, through the proxy
        payload = hashlib.sha256(b"seed").digest() * ((s3.PART_SIZE + 1024 * 1024) // 32)  # two parts
        # seekable: the cut comes while minio reads the second part, after the first was sent through the
        # proxy; one-way: the put spools the stream first, so the proxy is gone before the first request
        stream = _CuttingStream(payload, s3.PART_SIZE + 1, proxy.cut, seekable)
        store.put("big/object", stream, length=len(payload))  # type: ignore[arg-type]
        assert store.endpoint_status() == [(f"127.0.0.1:{proxy.port}", False), (cluster.endpoint("s3b"), True)]
        direct = open_store(cluster.url_for(bucket, gateways=("s3b",)))
        assert hashlib.sha256(direct.get_bytes("big/object")).digest() == hashlib.sha256(payload).digest()
        # the store keeps working through s3b for every operation
        store.put("small", b"x")
        assert store.exists("small") and store.size("big/object") == len(payload)
        assert [o.key for o in store.list("")] == ["big/object", "small"]
        store.delete("small")
        with pytest.raises(ObjectNotFound):
            store.get_bytes("small")
    finally:
        proxy.stop()


def test_cluster_members_restart_on_their_ports(cluster: SeaweedCluster) -> None:
    """The cluster helper itself: a restarted gateway serves the same data on the same port."""
    store = open_store(cluster.url_for("pacs-restart", gateways=("s3a",)))
    store.put("k", b"before")
    port = cluster.port("s3a")
    cluster.stop_member("s3a")
    assert not cluster.running("s3a")
    with pytest.raises(StorageUnavailable):
        open_store(cluster.url_for("pacs-restart", gateways=("s3a",)) + "?retries=0").get_bytes("k")
    cluster.start_member("s3a")
    assert cluster.port("s3a") == port and store.get_bytes("k") == b"before"

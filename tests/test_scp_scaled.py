"""Scaled mode end to end: `pacs scp` + `pacs worker` on PostgreSQL, the real S3 server and Redis.

The index is reached through a TCP proxy the test can cut, and the S3 server is stopped and
started, to show that an outage turns into a failure status, never into a lost image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db.models import Instance, Series
from pacs.settings import Settings
from storage.keys import thumbnail_key
from tests.conftest import REDIS_URL
from tests.support.dcmtk import echoscu, storescu
from tests.support.fault_proxy import FaultProxy
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.postgres import create_database, drop_database
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    scp: PacsProcess
    worker: PacsProcess
    port: int
    ctx: AppContext  # direct view of the same index (not through the proxy) and store
    db_proxy: FaultProxy
    s3: SeaweedS3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("scaled")
    db_name, db_url = create_database()
    url = make_url(db_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {
        "PACS_DATA_DIR": str(root / "data"),
        "PACS_DATABASE_URL": proxied,
        "PACS_STORAGE_URL": s3_server.url_for("pacs-scaled"),
        "PACS_BROKER_URL": REDIS_URL,
        "PACS_DICOM_PORT": str(free_port()),
        "PACS_OUTBOX_POLL_S": "1",
    }
    upgrade = run_pacs(["db", "upgrade"], env)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    worker = PacsProcess(["worker", "--concurrency", "2"], env, root / "worker.log").start()
    scp = PacsProcess(["scp"], env, root / "scp.log").start()
    port = int(env["PACS_DICOM_PORT"])
    ctx = AppContext.create(Settings(database_url=db_url, storage_url=env["PACS_STORAGE_URL"]))
    try:
        scp.wait_dicom(port)
        yield Stack(scp, worker, port, ctx, proxy, s3_server)
    finally:
        scp.stop()
        worker.stop()
        ctx.close()
        proxy.cut()
        drop_database(db_name)


def _count_series(stack: Stack, series_uid: str) -> int:
    with stack.ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance).join(Series)
                        .where(Series.series_instance_uid == series_uid)) or 0


def test_ct_series_is_archived_and_thumbnails_appear_in_s3(stack: Stack, tmp_path: Path) -> None:
    assert echoscu(stack.port).returncode == 0
    files = write_ct_series(tmp_path / "ct", slices=100, size=256)
    result = storescu(stack.port, files, "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-2000:]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert _count_series(stack, first.SeriesInstanceUID) == 100
    keys = [thumbnail_key(first.StudyInstanceUID, first.SeriesInstanceUID,
                          pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    wait_until(lambda: all(stack.ctx.store.exists(k) for k in keys), timeout=180,
               what="100 thumbnails in S3 from the Celery worker")
    assert stack.ctx.store.get_bytes(keys[50])[:2] == b"\xff\xd8"  # JPEG


def test_s3_outage_gives_failure_status_and_indexes_nothing(stack: Stack, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", slices=5, size=64)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    stack.s3.stop()
    try:
        result = storescu(stack.port, files, "-xe")
        assert result.status == 0xA700, result.output[-1500:]
        assert "object store unavailable" in result.error_comment
        assert _count_series(stack, series_uid) == 0
    finally:
        stack.s3.start()
    assert storescu(stack.port, files, "-xe").status == 0
    assert _count_series(stack, series_uid) == 5


def test_database_outage_gives_failure_status_and_stores_nothing(stack: Stack, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", slices=5, size=64)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    stack.db_proxy.cut()
    try:
        result = storescu(stack.port, files, "-xe")
        assert result.status == 0xA701, result.output[-1500:]
        assert "index database unavailable" in result.error_comment
    finally:
        stack.db_proxy.start()
    prefix = f"dicom/{first.StudyInstanceUID}/"
    assert list(stack.ctx.store.list(prefix)) == []  # nothing half-written
    assert _count_series(stack, first.SeriesInstanceUID) == 0
    assert storescu(stack.port, files, "-xe").status == 0
    assert _count_series(stack, first.SeriesInstanceUID) == 5
    assert len(list(stack.ctx.store.list(prefix))) == 5
    assert stack.scp.alive() and stack.worker.alive()

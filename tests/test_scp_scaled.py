"""Scaled mode end to end: `pacs scp` + `pacs worker` on PostgreSQL, the real S3 server and Redis.

The index is reached through a TCP proxy the test can cut, and the S3 server is stopped and
started, to show that an outage turns into a failure status, never into a lost image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from bench.generate_ct import write_ct_series
from pacs.db.models import Instance, Series
from storage.keys import instance_metadata_key, series_metadata_key, series_thumbnail_key
from tests.support.dcmtk import echoscu, storescu
from tests.support.net import wait_until
from tests.support.seaweed import SeaweedS3
from tests.support.stack import ScaledStack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> Iterator[ScaledStack]:
    """`pacs worker` + `pacs scp`, the index reached through a proxy (``db_proxy``; ``ctx`` goes direct)."""
    with ScaledStack(tmp_path_factory.mktemp("scaled"), s3_server.url_for("pacs-scaled"), db_proxy=True) as stack:
        stack.start_worker(concurrency=2)
        stack.start_scp()
        yield stack


def _count_series(stack: ScaledStack, series_uid: str) -> int:
    with stack.ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance).join(Series)
                        .where(Series.series_instance_uid == series_uid)) or 0


def test_ct_series_is_archived_and_thumbnails_appear_in_s3(stack: ScaledStack, tmp_path: Path) -> None:
    assert echoscu(stack.port).returncode == 0
    files = write_ct_series(tmp_path / "ct", slices=100, size=256)
    result = storescu(stack.port, files, "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-2000:]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert _count_series(stack, first.SeriesInstanceUID) == 100
    # the series' thumbnail (its middle slice) and document from the Celery worker; the fragments from ingest
    key = series_thumbnail_key(first.StudyInstanceUID, first.SeriesInstanceUID)
    wait_until(lambda: stack.ctx.store.exists(key), timeout=180, what="the series thumbnail in S3 from the worker")
    assert stack.ctx.store.get_bytes(key)[:2] == b"\xff\xd8"  # JPEG
    assert stack.ctx.store.exists(series_metadata_key(first.StudyInstanceUID, first.SeriesInstanceUID))
    assert all(stack.ctx.store.exists(instance_metadata_key(first.StudyInstanceUID, first.SeriesInstanceUID,
                                                            pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
               for f in files)


def test_s3_outage_gives_failure_status_and_indexes_nothing(stack: ScaledStack, tmp_path: Path,
                                                           s3_server: SeaweedS3) -> None:
    files = write_ct_series(tmp_path / "ct", slices=5, size=64)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    s3_server.stop()
    try:
        result = storescu(stack.port, files, "-xe")
        assert result.status == 0xA700, result.output[-1500:]
        assert "object store unavailable" in result.error_comment
        assert _count_series(stack, series_uid) == 0
    finally:
        s3_server.start()
    assert storescu(stack.port, files, "-xe").status == 0
    assert _count_series(stack, series_uid) == 5


def test_database_outage_gives_failure_status_and_stores_nothing(stack: ScaledStack, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", slices=5, size=64)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert stack.db_proxy is not None
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

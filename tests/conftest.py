"""Shared fixtures: the pydicom corpus, and real servers (PostgreSQL, Redis, SeaweedFS S3, `pacs`)."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support.postgres import create_database, drop_database
from tests.support.seaweed import SeaweedS3

REDIS_URL = os.environ.get("PACS_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")


def corpus_files() -> list[Path]:
    """Every file pydicom ships as test data (read from the installed folder: no downloads)."""
    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def corpus_dicom_files() -> list[Path]:
    """The corpus files that look like DICOM (a .dcm name or the DICM prefix)."""
    out = []
    for path in corpus_files():
        with path.open("rb") as fh:
            head = fh.read(132)
        if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
            out.append(path)
    return out


@pytest.fixture(autouse=True)
def _quiet_pydicom_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture()
def fresh_pg_url() -> Iterator[str]:
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3_url(s3_server: SeaweedS3) -> str:
    """A fresh bucket per test on the session's S3 server."""
    return s3_server.url_for(f"pacs-{uuid.uuid4().hex[:12]}")

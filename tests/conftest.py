"""Shared fixtures: real servers (PostgreSQL, SeaweedFS S3), and the hooks of the test tiers (tests/support/tiers.py).

Helpers live in tests/support/, never here: tests import them from there (no test imports conftest or
another test module).
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator

import pytest
from pynetdicom.association import Association

from tests.support.postgres import create_database, drop_database
from tests.support.pynetdicom_clients import hold_responses
from tests.support.scheduling import longest_modules_first
from tests.support.seaweed import SeaweedS3
from tests.support.tiers import pytest_collection_modifyitems as mark_tiers
from tests.support.tiers import (  # noqa: F401  (the tiers' hooks, registered by being here)
    pytest_configure,
    pytest_runtest_call,
    pytest_runtest_setup,
    starts_servers,
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker (tests/support/tiers.py)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tiers(items)
    longest_modules_first(items)  # tests/support/scheduling.py: for the xdist workers of `make test`


@pytest.fixture(autouse=True)
def _quiet_pydicom_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture(autouse=True, scope="session")
def _clients_keep_their_responses() -> Iterator[None]:
    """The tests' pynetdicom clients keep the response they wait for (tests/support/pynetdicom_clients.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Association, "_serve_request", hold_responses(Association._serve_request))
        yield


@pytest.fixture(scope="session")
@starts_servers
def pg_url() -> Iterator[str]:
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture()
@starts_servers
def fresh_pg_url() -> Iterator[str]:
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
@starts_servers
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

"""The loops of the associations the archive accepts wait for work instead of polling (dicom_scp.reactors), and
pynetdicom's accept loop no longer forces a full garbage collection every 60 connections (dicom_scp.server).

What a modality relies on stays as it was: one-image associations (store, release) one after the other, an abort,
a refused association, a C-ECHO on an association kept open between bursts, the network timeout ending an idle
association. And what the operator relies on: no thread and no file descriptor is left behind by an ended
association (each has an ``eventfd`` of its own while it runs).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification
from sqlalchemy import func, select

from dicom_scp import reactors
from dicom_scp.server import Listeners, start_scp
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import Instance
from pacs.ingest import Ingestor
from pacs.settings import Settings
from tests.support.datasets import make_dataset
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.integration

NETWORK_TIMEOUT_S = 2.0


@dataclass
class Scp:
    ctx: AppContext
    listeners: Listeners
    port: int


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scp]:
    root: Path = tmp_path_factory.mktemp("reactors")
    settings = Settings(data_dir=root / "data", dicom_host="127.0.0.1", dicom_port=free_port(),
                        network_timeout_s=NETWORK_TIMEOUT_S)
    ctx = AppContext.create(settings)
    migrate.upgrade(ctx.engine)
    listeners = start_scp(ctx, Ingestor(ctx.sessions, ctx.store))
    try:
        yield Scp(ctx, listeners, listeners.server_address[1])
    finally:
        listeners.shutdown()
        ctx.close()


def _associate(scp: Scp, *contexts: str, title: str = "MODALITY") -> Association:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = 30
    ae.network_timeout = 60  # the server's timeout ends an idle association, not ours
    for abstract_syntax in contexts:
        ae.add_requested_context(abstract_syntax, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", scp.port, ae_title="PACS")


def _server_associations(scp: Scp) -> list[Association]:
    return [a for a in scp.listeners.plain.ae.active_associations if a.is_acceptor]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled(scp: Scp, fds: int, threads: int) -> bool:
    return not _server_associations(scp) and _open_fds() <= fds and threading.active_count() <= threads


def _stored(scp: Scp) -> int:
    with scp.ctx.read_sessions() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


@pytest.mark.skipif(not hasattr(os, "eventfd") or not Path("/proc/self/fd").is_dir(), reason="Linux only")
def test_one_image_associations_end_without_leaving_threads_or_file_descriptors(scp: Scp) -> None:
    echo = _associate(scp, Verification)  # warm up (first connection of the process) and settle
    assert echo.is_established and echo.send_c_echo().Status == 0
    echo.release()
    wait_until(lambda: not _server_associations(scp), timeout=30, interval=0.05)
    fds, threads, before = _open_fds(), threading.active_count(), _stored(scp)

    for n in range(12):  # how a CR room sends: an association per image, released, one after the other
        assoc = _associate(scp, SecondaryCaptureImageStorage)
        assert assoc.is_established
        served = _server_associations(scp)
        assert served and all(getattr(a, "_pacs_woken", None) is not None for a in served)  # our loops
        assert assoc.send_c_store(make_dataset(PatientID=f"REACT{n}")).Status == 0
        if n % 4 == 3:
            assoc.abort()  # a modality giving up after its response: the server side ends all the same
        else:
            assoc.release()
            assert assoc.is_released
    refused = _associate(scp, StudyRootQueryRetrieveInformationModelFind, title="STRANGER")
    assert refused.is_rejected  # query is for registered AEs only: A-ASSOCIATE-RJ, then the server side ends

    assert _stored(scp) == before + 12
    wait_until(lambda: _settled(scp, fds, threads), timeout=30, interval=0.05,
               what="every server association ended, its threads and eventfd gone")


def test_an_association_kept_open_answers_at_once_and_ends_after_the_network_timeout(scp: Scp) -> None:
    assoc = _associate(scp, Verification, SecondaryCaptureImageStorage)
    assert assoc.is_established
    for _ in range(3):  # bursts on a kept-open association: each answered (the loops wake on the request)
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(make_dataset()).Status == 0
    # then nothing: the server's network timeout aborts it (checked by the waiting loop, not by a poll each ms)
    wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=NETWORK_TIMEOUT_S + 20, interval=0.1,
               what="the idle association aborted by the server")
    wait_until(lambda: not _server_associations(scp), timeout=30, interval=0.05)


def test_the_waiting_loops_end_with_the_association_even_when_nothing_wakes_them() -> None:
    """The DUL's eventfd is closed once (a late wake-up is ignored, never written to a reused descriptor)."""
    if not hasattr(os, "eventfd"):
        pytest.skip("Linux only")
    event_fd = reactors._EventFd()
    event_fd.wake()
    event_fd.close()
    reused = os.open(os.devnull, os.O_RDONLY)  # most likely the same number
    try:
        event_fd.wake()  # nothing written anywhere
        event_fd.close()  # closed once only: the reused descriptor stays open
        os.fstat(reused)
    finally:
        os.close(reused)

"""The AE registry (pacs.aes) as every DIMSE service asks it, and the host check seen from DCMTK peers.

Regression (issue: structure): an AE registered with ``--check-host`` that calls from another host is an
unknown AE for C-GET exactly as for C-FIND and C-MOVE, both when the association is requested and when a
request arrives (the per-request check of the retrieve services used to skip the host).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import update

from dicom_scp import get_service
from dicom_scp.server import Listeners, start_scp
from pacs import aes, dimse_status
from pacs.aes import AERegistry, add_ae
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import ApplicationEntity
from pacs.errors import IndexUnavailable
from pacs.ingest import Ingestor
from pacs.retrieve import Model
from pacs.settings import Settings
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.net import free_port

ELSEWHERE = "192.0.2.7"  # TEST-NET-1: never the address a test peer connects from
QR_KEYS = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4"]


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[AppContext]:
    context = AppContext.create(Settings(data_dir=tmp_path / "data", dicom_host="127.0.0.1", dicom_port=free_port()))
    migrate.upgrade(context.engine)
    with context.sessions() as session, session.begin():
        add_ae(session, "HOMEHOST", "127.0.0.1", 104, check_host=True)
        add_ae(session, "AWAY", ELSEWHERE, 104, check_host=True)
        add_ae(session, "ROAMING", ELSEWHERE, 11112, check_host=False)  # --no-check-host: welcome from anywhere
        add_ae(session, "NORETRIEVE", "127.0.0.1", 104, allow_retrieve=False)
        add_ae(session, "NOADDRESS", "", 104, check_host=False)  # no host to check
    try:
        yield context
    finally:
        context.close()


# -- the registry --------------------------------------------------------------------------------------


def test_registry_applies_the_host_check_to_every_right(ctx: AppContext) -> None:
    registry = AERegistry(ctx.read_sessions)
    assert registry.get("AWAY") is not None  # registered...
    assert registry.calling_peer("AWAY", "127.0.0.1") is None  # ...but not when calling from elsewhere
    assert registry.calling_peer("AWAY", ELSEWHERE) is not None
    for right in (registry.may_store, registry.may_query, registry.may_retrieve):
        assert right("HOMEHOST", "127.0.0.1") and right("HOMEHOST", "::ffff:127.0.0.1")
        assert not right("AWAY", "127.0.0.1")
        assert right("ROAMING", "127.0.0.1")
        assert not right("STRANGER", "127.0.0.1")
    assert not registry.may_retrieve("NORETRIEVE", "127.0.0.1") and registry.may_query("NORETRIEVE", "127.0.0.1")


def test_move_destination_needs_retrieve_rights_and_an_address(ctx: AppContext) -> None:
    registry = AERegistry(ctx.read_sessions)
    assert registry.move_destination("ROAMING") == aes.MoveDestination("ROAMING", ELSEWHERE, 11112)
    assert registry.move_destination("AWAY") is not None  # a destination is not a caller: no host check
    for title in ("NORETRIEVE", "NOADDRESS", "STRANGER", ""):
        assert registry.move_destination(title) is None


def test_sender_is_trusted_only_from_its_host(ctx: AppContext) -> None:
    with ctx.sessions() as session, session.begin():
        session.execute(update(ApplicationEntity).where(ApplicationEntity.ae_title == "HOMEHOST")
                        .values(facility="WARD-A"))
    registry = AERegistry(ctx.read_sessions)
    assert registry.sender("HOMEHOST", "127.0.0.1") == ("WARD-A", True, False)
    assert registry.sender("AWAY", "127.0.0.1") == ("", False, True)  # a registered title from elsewhere
    assert registry.sender("STRANGER", "127.0.0.1") == ("", False, False)


def test_an_unreadable_registry_is_index_unavailable(tmp_path: Path) -> None:
    broken = AppContext.create(Settings(data_dir=tmp_path / "empty"))  # no tables: every query fails
    try:
        registry = AERegistry(broken.read_sessions)
        with pytest.raises(IndexUnavailable):
            registry.calling_peer("HOMEHOST", "127.0.0.1")
        with pytest.raises(IndexUnavailable):
            registry.move_destination("ROAMING")
    finally:
        broken.close()


def test_retrieve_request_from_the_wrong_host_is_refused_even_past_the_association_policy(ctx: AppContext) -> None:
    """The per-request check of C-GET / C-MOVE (``get_service.prepare``) applies the host check itself."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3.4"

    def event(title: str) -> SimpleNamespace:
        return SimpleNamespace(identifier=identifier,
                               assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=title, address="127.0.0.1",
                                                                               port=40000)))

    refusal, retrieve = get_service.prepare(event("AWAY"), ctx, Model.STUDY_ROOT)  # type: ignore[arg-type]
    assert retrieve is None and refusal is not None
    assert refusal.Status == dimse_status.REFUSED_NOT_AUTHORIZED
    refusal, retrieve = get_service.prepare(event("HOMEHOST"), ctx, Model.STUDY_ROOT)  # type: ignore[arg-type]
    assert refusal is None and retrieve is not None and retrieve.count == 0


# -- a live SCP, DCMTK peers ---------------------------------------------------------------------------


@dataclass
class Scp:
    ctx: AppContext
    listeners: Listeners
    port: int


@pytest.fixture()
def scp(ctx: AppContext) -> Iterator[Scp]:
    listeners = start_scp(ctx, Ingestor(ctx.sessions, ctx.store))
    try:
        yield Scp(ctx, listeners, listeners.server_address[1])
    finally:
        listeners.shutdown()


def _run(tool: str, scp: Scp, aet: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), "-aet", aet, "-aec", "PACS", *args, "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env(), cwd=cwd)


@pytest.mark.integration
@pytest.mark.parametrize(("tool", "extra"), [("findscu", ["-S"]), ("getscu", ["-S"]),
                                             ("movescu", ["-S", "-aem", "HOMEHOST"])])
def test_check_host_ae_from_the_wrong_host_is_refused_for_every_service(scp: Scp, tmp_path: Path, tool: str,
                                                                        extra: list[str]) -> None:
    peer = tmp_path / "peer"
    peer.mkdir()
    refused = _run(tool, scp, "AWAY", *extra, *QR_KEYS, cwd=peer)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-1500:]
    assert "Association Rejected" in output, output[-1500:]  # (1, 1, 3): calling AE title not recognized
    assert list(peer.iterdir()) == []  # nothing was retrieved
    # the same AE title from its own host is served (no match: the study is not archived)
    served = _run(tool, scp, "HOMEHOST", *extra, *QR_KEYS, cwd=peer)
    assert "Association Rejected" not in served.stdout + served.stderr, (served.stdout + served.stderr)[-1500:]


@pytest.mark.integration
@pytest.mark.parametrize("model", ["get", "move"])
def test_retrieve_request_is_checked_against_the_registry_as_it_is_now(scp: Scp, model: str) -> None:
    """Past the association policy, each C-GET / C-MOVE request asks the registry again, host check
    included: an AE re-registered for another host while its association is open is refused (0x0124)."""
    with scp.ctx.sessions() as session, session.begin():
        add_ae(session, "SELF", "127.0.0.1", scp.port)  # a move destination that answers: the SCP itself
    ae = AE(ae_title="HOMEHOST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    get_model, move_model = StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove
    ae.add_requested_context(get_model if model == "get" else move_model)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACS")
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = "1.2.3.4"

        def final_status() -> int:
            responses = (assoc.send_c_get(identifier, get_model) if model == "get"
                         else assoc.send_c_move(identifier, "SELF", move_model))
            return int([status for status, _ in responses][-1].Status)

        assert final_status() == dimse_status.SUCCESS  # registered for this host: served (nothing matches)
        with scp.ctx.sessions() as session, session.begin():
            session.execute(update(ApplicationEntity).where(ApplicationEntity.ae_title == "HOMEHOST")
                            .values(host=ELSEWHERE))
        assert final_status() == dimse_status.REFUSED_NOT_AUTHORIZED
    finally:
        assoc.release()

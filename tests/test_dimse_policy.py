"""The DICOM network policy seen from DCMTK peers (issue 3 must-show 2): an unregistered AE cannot
C-FIND, C-MOVE or C-GET; a registered store-only AE cannot query or retrieve but can store; nobody
can C-MOVE to an unregistered destination. (TLS and mutual TLS: tests/test_dicom_tls.py.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs.db.models import AuditEvent
from tests.support.datasets import make_instance
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.inprocess import register_ae
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    server = EmbeddedPacs(tmp_path_factory.mktemp("policy"))
    register_ae(server.ctx, "STOREONLY", "127.0.0.1", 104, query=False, retrieve=False)
    register_ae(server.ctx, "VIEWER", "127.0.0.1", 104, archive_wide=True)
    try:
        yield server
    finally:
        server.close()


def _run(tool: str, pacs: EmbeddedPacs, aet: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), "-aet", aet, "-aec", "PACS", *args, "127.0.0.1", str(pacs.port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env(), cwd=cwd)


QR_KEYS = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4"]


@pytest.mark.parametrize(("tool", "extra"), [("findscu", ["-S"]), ("movescu", ["-S", "-aem", "VIEWER"]),
                                             ("getscu", ["-S"])])
@pytest.mark.parametrize("aet", ["STRANGER", "STOREONLY"])
def test_query_and_retrieve_need_a_registered_ae_with_rights(pacs: EmbeddedPacs, tmp_path: Path, tool: str,
                                                             extra: list[str], aet: str) -> None:
    result = _run(tool, pacs, aet, *extra, *QR_KEYS, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-1500:]
    if tool == "getscu" and aet == "STOREONLY":
        # getscu also proposes the storage classes (for its C-STORE sub-operations), which a store-only AE may
        # use: the association is accepted with the C-GET context refused, and nothing can be retrieved.
        assert "No adequate Presentation Contexts for sending C-GET" in output
        return
    assert "Association Rejected" in output, output[-1500:]
    reason = "(1, 1, 3)" if aet == "STRANGER" else "(1, 1, 1)"  # calling AE not recognized / no reason given
    assert f"association from {aet}@" in pacs.proc.log_tail(400) and f"rejected {reason}" in pacs.proc.log_tail(400)
    with pacs.ctx.read_sessions() as session:  # and the refusal is in the audit trail
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "dimse.association-rejected",
                                                        AuditEvent.actor == aet)).all()
    assert rows and rows[-1].outcome == "failure" and "reject=" in rows[-1].detail


def test_store_only_ae_can_still_store_and_echo(pacs: EmbeddedPacs, tmp_path: Path) -> None:
    path = tmp_path / "one.dcm"
    path.write_bytes(make_instance())
    stored = subprocess.run([dcmtk("storescu"), "-aet", "STOREONLY", "-aec", "PACS", "127.0.0.1", str(pacs.port),
                             str(path)], capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert stored.returncode == 0, stored.stderr
    assert _run("echoscu", pacs, "STOREONLY", cwd=tmp_path).returncode == 0


def test_registered_ae_may_not_move_to_an_unregistered_destination(pacs: EmbeddedPacs, tmp_path: Path) -> None:
    result = _run("movescu", pacs, "VIEWER", "-S", "-aem", "ELSEWHERE", *QR_KEYS, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "MoveDestinationUnknown" in output, output[-1500:]  # 0xA801

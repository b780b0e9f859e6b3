"""Decompression bombs against a live `pacs serve` (issue 12, finding 1).

Tiny JPEG 2000, JPEG-LS, JPEG baseline and RLE objects claiming 16000x16000 and 20000x20000 pixels
are C-STOREd (the thumbnail is built at ingest), then asked for through every decoding path. What each
path gets:

- C-STORE: Success; the object is archived as sent;
- the thumbnail built at ingest and ``/thumbnail``: the placeholder JPEG;
- ``/rendered``: 422 ``cannot_render`` naming the limit;
- ``/frames/1`` uncompressed (the default): 406 ``not_acceptable`` naming ``transfer-syntax=*``; with
  ``transfer-syntax=*``: 200 and the stored frame;
- WADO-RS retrieve in the default syntax (Explicit VR Little Endian) and WADO-URI with
  ``transferSyntax=1.2.840.10008.1.2.1``: 406 before any byte of a body; as stored (``*``): 200, the
  stored bytes;
- C-GET from an SCU that takes uncompressed syntaxes only: each bomb's sub-operation fails, the one
  ordinary image in the study is delivered; from an SCU that accepts the stored syntaxes: all delivered,
  byte-identical.

A legitimate 8000x8000 12-bit JPEG 2000 is rendered (reduced, 2000x2000) by two requests at once. Over
all of it the server's peak RSS (VmHWM, reset after a warm-up) grows by at most 300 MiB, and it still
answers C-ECHO and /health. Without the bound, the same run peaks gigabytes higher (see the report of
issue 12).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from sqlalchemy import select

from pacs.aes import add_ae
from pacs.db.models import DerivedTask
from pacs.derived.kinds import SERIES_METADATA_KIND
from pacs.imaging.render import placeholder
from tests.support.bombs import Bomb, make_bomb, make_large_j2k
from tests.support.datasets import dataset_bytes, make_dataset, to_bytes
from tests.support.http_api import bearer_client
from tests.support.net import wait_until
from tests.support.pacs_process import dicom_echo
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

MIB = 1024 * 1024
RSS_GROWTH_LIMIT = 300 * MIB
EXPLICIT_LE = str(ExplicitVRLittleEndian)
FACILITY = "HOSP-A"


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, field
    return int(match.group(1)) * 1024


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
@starts_servers
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("bombs"))
    with pacs.ctx.sessions() as session, session.begin():
        add_ae(session, "BOMBER", "127.0.0.1", 104, facility=FACILITY)
        add_ae(session, "GETTER", "127.0.0.1", 104, facility=FACILITY)
    try:
        yield pacs
    finally:
        pacs.close()


def _store(server: EmbeddedPacs, data: bytes) -> int | None:
    ds = pydicom.dcmread(io.BytesIO(data))
    return send_dataset(server.port, ds, str(ds.file_meta.TransferSyntaxUID), aet="BOMBER").status


def _c_get(port: int, study_uid: str, syntaxes: list[str]) -> tuple[Dataset, dict[str, tuple[str, bytes]]]:
    """C-GET a study as GETTER offering ``syntaxes`` for Secondary Capture (one context per syntax)."""
    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for syntax in syntaxes:
        ae.add_requested_context(SecondaryCaptureImageStorage, [syntax])
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax),
                                                               bytes(event.encoded_dataset(include_meta=False)))
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title="PACS", evt_handlers=[(evt.EVT_C_STORE, on_store)],
                         ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final = Dataset()
    try:
        for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status and status.Status not in (0xFF00, 0xFF01):
                final = status
    finally:
        assoc.release()
    return final, received


def _error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["code"], body["message"]


def test_bombs_are_archived_refused_for_decoding_and_the_server_stays_small(server: EmbeddedPacs) -> None:
    http = bearer_client(server.http_url, server.token("radiologist", facility=FACILITY), timeout=120)
    pid = server.proc.proc.pid  # type: ignore[union-attr]

    # Warm-up: an ordinary image through every path, so imports and pools are not counted as growth.
    bomb_study = make_bomb("rle", 16000).study_uid
    plain = make_dataset(StudyInstanceUID=bomb_study, PatientID="BOMB", PatientName="BOMB^RLE^16000",
                         Rows=64, Columns=64, PixelData=bytes(range(256)) * 16)
    assert _store(server, to_bytes(plain)) == 0
    plain_path = f"/dicom-web/studies/{bomb_study}/series/{plain.SeriesInstanceUID}/instances/{plain.SOPInstanceUID}"
    for suffix in ("/rendered", "/frames/1", "/thumbnail", ""):
        assert http.get(plain_path + suffix).status_code == 200, suffix
    _c_get(server.port, bomb_study, [EXPLICIT_LE])
    reset = _reset_peak(pid)
    baseline = _status_kib(pid, "VmRSS") if reset else _status_kib(pid, "VmHWM")

    # C-STORE every bomb into the same study: archived (Success); its series' thumbnail is rendered once it settles.
    bombs: list[Bomb] = [make_bomb(kind, side, study_uid=bomb_study)
                         for side in (16000, 20000) for kind in ("j2k", "jls", "jpeg", "rle")]
    for bomb in bombs:
        assert _store(server, bomb.data) == 0, f"{bomb.kind} {bomb.side}: archived as sent"

    series = {b.series_uid for b in bombs}

    def tasks_finished() -> list[tuple[str, int, str]]:
        with server.ctx.read_sessions() as session:
            return [tuple(row) for row in session.execute(  # type: ignore[misc]
                select(DerivedTask.state, DerivedTask.attempts, DerivedTask.last_error).where(
                    DerivedTask.kind == SERIES_METADATA_KIND, DerivedTask.subject_uid.in_(series))).all()]

    wait_until(lambda: len(tasks_finished()) == len(series) and all(state == "done" for state, _, _ in
                                                                     tasks_finished()),
               timeout=60, interval=0.3, what="the bombs' series work done")
    for state, attempts, note in tasks_finished():  # done with a placeholder, once: never retried in a loop
        assert state == "done" and attempts <= 1 and "placeholder thumbnail" in note and "limit" in note, note
    expected_placeholder = placeholder(server.ctx.settings.thumbnail_size)
    for bomb in bombs:  # the series' thumbnails are placeholders: no bomb was decoded
        thumb = http.get(f"/dicom-web/studies/{bomb.study_uid}/series/{bomb.series_uid}/thumbnail")
        assert thumb.status_code == 200 and thumb.content == expected_placeholder, bomb.kind

    for bomb in bombs:
        what = f"{bomb.kind} {bomb.side}"
        path = f"/dicom-web/studies/{bomb.study_uid}/series/{bomb.series_uid}/instances/{bomb.sop_uid}"
        # the instance's thumbnail, asked for now
        thumb = http.get(path + "/thumbnail")
        assert thumb.status_code == 200 and thumb.content == expected_placeholder, what
        status, code, message = _error(http.get(path + "/rendered"))
        assert (status, code) == (422, "cannot_render") and "limit" in message, (what, message)
        status, code, message = _error(http.get(path + "/frames/1"))
        assert (status, code) == (406, "not_acceptable") and "transfer-syntax=*" in message, (what, message)
        as_stored = http.get(path + "/frames/1", headers={
            "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
        assert as_stored.status_code == 200, what
        frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(io.BytesIO(bomb.data)).PixelData,
                                                    number_of_frames=1))
        assert frame in as_stored.content, what
        # WADO-RS retrieve: decompressing it (the default syntax) is refused before the body starts
        status, code, message = _error(http.get(path))
        assert (status, code) == (406, "not_acceptable") and "transfer-syntax=*" in message, (what, message)
        whole = http.get(path, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert whole.status_code == 200 and dataset_bytes(bomb.data) in whole.content, what  # as stored
        # WADO-URI
        uri = {"requestType": "WADO", "studyUID": bomb.study_uid, "seriesUID": bomb.series_uid,
               "objectUID": bomb.sop_uid, "contentType": "application/dicom"}
        status, code, message = _error(http.get("/wado", params={**uri, "transferSyntax": EXPLICIT_LE}))
        assert (status, code) == (406, "not_acceptable"), (what, message)
        stored = http.get("/wado", params={**uri, "transferSyntax": "*"})
        assert (stored.status_code == 200 and stored.content[132:] == bomb.data[132:]) or \
            dataset_bytes(stored.content) == dataset_bytes(bomb.data), what
        status, code, _ = _error(http.get("/wado", params={**uri, "contentType": "image/jpeg"}))
        assert (status, code) == (422, "cannot_render"), what

    # C-GET for a peer taking uncompressed only: every bomb's sub-operation fails, the plain image goes.
    final, received = _c_get(server.port, bomb_study, [EXPLICIT_LE, str(ImplicitVRLittleEndian)])
    assert set(received) == {str(plain.SOPInstanceUID)}
    assert final.Status == 0xB000, f"0x{final.Status:04X}"  # sub-operations complete, some failed
    assert final.NumberOfFailedSuboperations == len(bombs) and final.NumberOfCompletedSuboperations == 1
    # ... and for a peer accepting the stored syntaxes: everything, byte-identical.
    final, received = _c_get(server.port, bomb_study, [b.transfer_syntax for b in bombs[:4]] + [EXPLICIT_LE])
    assert final.Status == 0x0000 and len(received) == len(bombs) + 1
    for bomb in bombs:
        syntax, data = received[bomb.sop_uid]
        assert syntax == bomb.transfer_syntax and data == dataset_bytes(bomb.data), bomb.kind

    # A large legitimate image is rendered, reduced, by two requests at once.
    large = make_large_j2k(8000)
    assert _store(server, large.data) == 0
    large_path = f"/dicom-web/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}"
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda params: http.get(large_path + "/rendered", params=params),
                                [{}, {"viewport": "512,512"}]))
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    assert Image.open(io.BytesIO(answers[0].content)).size == (2000, 2000)
    assert Image.open(io.BytesIO(answers[1].content)).size == (512, 512)
    # the large image is over the bound for a full decode: WADO-RS refuses to decompress it (406)
    assert http.get(large_path).status_code == 406

    growth = _status_kib(pid, "VmHWM") - baseline
    print(f"peak RSS growth over all bomb paths: {growth / MIB:.0f} MiB (baseline {baseline / MIB:.0f} MiB)")
    assert growth <= RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / MIB:.0f} MiB"
    assert server.proc.alive()
    assert dicom_echo(server.port)
    assert httpx.get(f"{server.http_url}/health", timeout=10).status_code == 200

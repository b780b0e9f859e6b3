"""Objects whose headers lie about their frames (NumberOfFrames far beyond the pixel data) cannot make
WADO-RS allocate or loop for the claimed frames (a stored object is attacker-controlled input too)."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource
from pacs.security.accounts import create_token
from pacs.settings import Settings
from tests.support.datasets import make_dataset, to_bytes
from viewer_api.app import create_app


def test_a_header_claiming_twenty_million_frames_serves_the_one_frame_present(tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    try:
        migrate.upgrade(ctx.engine)
        ds = make_dataset(NumberOfFrames=20_000_000)  # 16×16×8 bits: the pixel data holds exactly one frame
        assert Ingestor(ctx.sessions, ctx.store).ingest(to_bytes(ds), IngestSource("import")).ok
        with ctx.sessions() as session, session.begin():
            token = create_token(session, "t", "radiologist", days=1).secret
        client = TestClient(create_app(ctx), headers={"Authorization": f"Bearer {token}"})
        instance = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/" \
                   f"{ds.SOPInstanceUID}"
        started = time.monotonic()
        bulk = client.get(f"{instance}/bulkdata/7FE00010")
        assert bulk.status_code == 200
        assert bulk.content.count(b"Content-Type: application/octet-stream") == 1  # one part: the one frame
        assert bytes(range(256)) in bulk.content
        assert client.get(f"{instance}/frames/2").status_code == 404  # claimed, but not in the data
        assert client.get(f"{instance}/frames/1").status_code == 200
        assert time.monotonic() - started < 10
    finally:
        ctx.close()

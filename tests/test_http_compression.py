"""gzip of text answers and raw frames (viewer_api.compression) and the viewer's cache headers (issue 13: OHIF time
to first image).

The API app in-process on a migrated index with a real file store and a small CT ingested through the core: QIDO-RS,
series ``/metadata`` and frames of uncompressed pixel data come gzipped to a client that asks, byte-identical after
decompression to the identity answer, with ``Vary: Accept-Encoding``; DICOM instances (multipart application/dicom)
and rendered JPEG/PNG never; nor a small answer, a HEAD, or a client that refuses gzip. The middleware itself on a
streamed answer and on answers it must leave alone. OHIF's hashed assets are ``immutable``; the files the installer
writes are ``no-cache``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource
from pacs.settings import Settings
from pacs.viewer import MARKER_FILE
from tests.support.inprocess import new_token
from viewer_api.app import create_app
from viewer_api.compression import GzipText, compressible

SLICES = 4
GZIP = {"Accept-Encoding": "gzip"}
IDENTITY = {"Accept-Encoding": "identity"}
HASHED_JS = "1180.bundle.762993518ea30ae3.js"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str], Path]]:
    root = tmp_path_factory.mktemp("compression")
    viewer = _fake_viewer(root / "ohif")
    ctx = AppContext.create(Settings(data_dir=root / "data", ohif_dir=viewer))
    try:
        migrate.upgrade(ctx.engine)
        files = write_ct_series(root / "ct", slices=SLICES, size=256)
        others = [p for i in range(3) for p in write_ct_series(root / f"other{i}", slices=1, size=32,
                                                                patient_id=f"OTHER-{i}")]
        ingestor = Ingestor(ctx.sessions, ctx.store)
        for path in [*files, *others]:
            assert ingestor.ingest(path.read_bytes(), IngestSource("import")).ok
        import pydicom

        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        uids = {"study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID),
                "sop": str(first.SOPInstanceUID)}
        token = new_token(ctx, "radiologist")
        with TestClient(create_app(ctx), headers={"Authorization": f"Bearer {token}"}) as client:
            yield client, uids, viewer
    finally:
        ctx.close()


def _fake_viewer(folder: Path) -> Path:
    """An installed viewer's layout (what ViewerSite looks at), not OHIF's bytes: tests/test_ohif.py has those."""
    folder.mkdir(parents=True)
    (folder / MARKER_FILE).write_text(json.dumps({"package": "@ohif/app"}))
    (folder / "index.html").write_text("<!doctype html><title>OHIF</title>" + "<!-- padding -->" * 200)
    (folder / "app-config.js").write_text("window.config = {};\n" + "/* padding */\n" * 200)
    bundle = ("console.log('chunk');\n" * 400).encode()
    (folder / HASHED_JS).write_bytes(bundle)
    (folder / f"{HASHED_JS}.gz").write_bytes(gzip.compress(bundle))
    return folder


def _raw(client: TestClient, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the body as sent (not decoded by the client)."""
    with client.stream("GET", url, headers=headers) as response:
        return response.status_code, dict(response.headers), b"".join(response.iter_raw())


def _boundary(content_type: str) -> str:
    return next(p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary="))


def _vary(headers: dict[str, str]) -> list[str]:
    return [v.strip().lower() for v in headers.get("vary", "").split(",")]


@pytest.mark.parametrize("kind", ["qido-studies", "qido-instances", "series-metadata"])
def test_dicom_json_is_gzipped_when_asked_and_identical_after_decompression(
        api: tuple[TestClient, dict[str, str], Path], kind: str) -> None:
    client, uids, _ = api
    url = {"qido-studies": "/dicom-web/studies?includefield=all",
           "qido-instances": f"/dicom-web/studies/{uids['study']}/series/{uids['series']}/instances",
           "series-metadata": f"/dicom-web/studies/{uids['study']}/series/{uids['series']}/metadata"}[kind]
    accept = {"Accept": "application/dicom+json"}
    status, plain_headers, plain = _raw(client, url, {**accept, **IDENTITY})
    assert status == 200 and "content-encoding" not in plain_headers
    assert "accept-encoding" in _vary(plain_headers)
    assert len(plain) >= 1024, f"the {kind} answer is too small to show compression ({len(plain)} bytes)"

    status, headers, body = _raw(client, url, {**accept, **GZIP})
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["content-type"].startswith("application/dicom+json")
    assert "accept-encoding" in _vary(headers)
    assert body[:2] == b"\x1f\x8b" and len(body) < len(plain) / 3
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body)
    assert gzip.decompress(body) == plain
    assert len(json.loads(plain)) >= (SLICES if kind != "qido-studies" else 1)


def test_refused_gzip_small_answers_and_head_are_sent_as_they_are(
        api: tuple[TestClient, dict[str, str], Path]) -> None:
    client, uids, _ = api
    url = f"/dicom-web/studies/{uids['study']}/series/{uids['series']}/metadata"
    for refusal in ("gzip;q=0", "br", ""):
        _, headers, body = _raw(client, url, {"Accept-Encoding": refusal})
        assert "content-encoding" not in headers, refusal
        assert json.loads(body)
    _, headers, body = _raw(client, "/health", GZIP)  # a few bytes of JSON: not worth it
    assert "content-encoding" not in headers and len(body) < 1024 and json.loads(body)
    head = client.head(url, headers=GZIP)
    assert head.status_code in (200, 405) and "content-encoding" not in head.headers


def test_images_and_multipart_dicom_are_never_compressed(api: tuple[TestClient, dict[str, str], Path]) -> None:
    client, uids, _ = api
    instance = f"/dicom-web/studies/{uids['study']}/series/{uids['series']}/instances/{uids['sop']}"
    cases = [
        (instance, 'multipart/related; type="application/dicom"; transfer-syntax=*', "multipart/related"),
        (f"/dicom-web/studies/{uids['study']}", 'multipart/related; type="application/dicom"', "multipart/related"),
        (f"{instance}/rendered", "image/jpeg", "image/jpeg"),
        (f"{instance}/rendered", "image/png", "image/png"),
    ]
    for url, accept, media in cases:
        status, headers, body = _raw(client, url, {"Accept": accept, **GZIP})
        assert status == 200, (url, accept, body[:200])
        assert headers["content-type"].startswith(media), (url, headers["content-type"])
        assert "content-encoding" not in headers, (url, accept)
        assert "accept-encoding" not in _vary(headers), (url, accept)
        assert len(body) > 1024


def test_raw_frames_are_gzipped_when_asked_and_identical_after_decompression(
        api: tuple[TestClient, dict[str, str], Path]) -> None:
    """A frame of uncompressed pixel data (``type="application/octet-stream"``), as OHIF asks for it."""
    client, uids, _ = api
    url = f"/dicom-web/studies/{uids['study']}/series/{uids['series']}/instances/{uids['sop']}/frames/1"
    accept = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    status, plain_headers, plain = _raw(client, url, {**accept, **IDENTITY})
    assert status == 200 and "content-encoding" not in plain_headers
    assert 'type="application/octet-stream"' in plain_headers["content-type"].replace("'", '"')
    assert len(plain) > 256 * 256 * 2 and "accept-encoding" in _vary(plain_headers)
    status, headers, body = _raw(client, url, {**accept, **GZIP})
    assert status == 200 and headers["content-encoding"] == "gzip"
    mine, theirs = _boundary(headers["content-type"]), _boundary(plain_headers["content-type"])
    assert headers["content-type"].replace(mine, theirs) == plain_headers["content-type"]
    # the same frame (each answer has a boundary of its own) in less than half the bytes
    assert gzip.decompress(body).replace(mine.encode(), theirs.encode()) == plain and len(body) < len(plain) / 2
    if "etag" in plain_headers:
        assert headers["etag"] == f"W/{plain_headers['etag'].removeprefix('W/')}"
        # the weak tag still answers a revalidation with 304
        again = client.get(url, headers={**accept, **GZIP, "If-None-Match": headers["etag"]})
        assert again.status_code == 304


def test_the_viewers_hashed_assets_are_immutable_and_its_written_files_revalidated(
        api: tuple[TestClient, dict[str, str], Path]) -> None:
    client, _, viewer = api
    _, headers, body = _raw(client, f"/ohif/{HASHED_JS}", GZIP)
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["content-encoding"] == "gzip"  # the installer's .gz, sent once (not gzipped again)
    assert gzip.decompress(body) == (viewer / HASHED_JS).read_bytes()
    assert "accept-encoding" in _vary(headers)
    for name in ("index.html", "app-config.js"):
        _, headers, body = _raw(client, f"/ohif/{name}", GZIP)
        assert headers["cache-control"] == "no-cache", name
        if name.endswith(".html"):  # HTML is never gzipped (pages carry CSRF tokens beside reflected input)
            assert "content-encoding" not in headers and body == (viewer / name).read_bytes(), name
        else:  # no .gz of its own: gzipped by the middleware
            assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == (viewer / name).read_bytes()
        assert "etag" in headers or "last-modified" in headers, name  # revalidated, not downloaded again


# -- the middleware on its own ----------------------------------------------------------------------------------


def _app() -> Starlette:
    def streamed(request: Request) -> Response:
        parts = [json.dumps({"n": i, "text": "x" * 300}).encode() + b"\n" for i in range(200)]
        return StreamingResponse(iter(parts), media_type="application/dicom+json", headers={"ETag": '"v1"'})

    def encoded(request: Request) -> Response:
        return Response(gzip.compress(b"{}" * 2000), media_type="application/json",
                        headers={"Content-Encoding": "gzip"})

    def partial(request: Request) -> Response:
        return Response(b"a" * 5000, status_code=206, media_type="text/plain")

    def octets(request: Request) -> Response:
        return Response(b"\x00" * 5000, media_type="application/octet-stream")

    app = Starlette(routes=[Route("/streamed", streamed), Route("/encoded", encoded), Route("/partial", partial),
                            Route("/octets", octets)])
    app.add_middleware(GzipText)
    return app


def test_a_streamed_answer_is_compressed_as_it_streams() -> None:
    client = TestClient(_app())
    expected = b"".join(json.dumps({"n": i, "text": "x" * 300}).encode() + b"\n" for i in range(200))
    status, headers, body = _raw(client, "/streamed", GZIP)
    assert status == 200 and headers["content-encoding"] == "gzip" and "content-length" not in headers
    assert headers["etag"] == 'W/"v1"'  # another representation than the identity one
    assert gzip.decompress(body) == expected and len(body) < len(expected) / 10
    _, headers, body = _raw(client, "/streamed", IDENTITY)
    assert body == expected and headers["etag"] == '"v1"' and "accept-encoding" in _vary(headers)


def test_already_encoded_partial_and_binary_answers_pass_untouched() -> None:
    client = TestClient(_app())
    _, headers, body = _raw(client, "/encoded", GZIP)
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == b"{}" * 2000  # not gzipped twice
    status, headers, body = _raw(client, "/partial", GZIP)
    assert status == 206 and "content-encoding" not in headers and body == b"a" * 5000
    _, headers, body = _raw(client, "/octets", GZIP)
    assert "content-encoding" not in headers and body == b"\x00" * 5000 and "vary" not in headers


def test_which_media_types_are_compressible() -> None:
    for yes in ("application/dicom+json", "application/json; charset=utf-8", "application/fhir+json",
                "text/javascript; charset=utf-8", "text/css", "image/svg+xml"):
        assert compressible(yes), yes
    assert compressible('multipart/related; type="application/octet-stream"; boundary=x')  # raw frames
    for no in ('multipart/related; type="application/dicom"', 'multipart/related; type="image/jls"',
               'multipart/related; type="image/jpeg"', "application/dicom", "image/jpeg", "image/png",
               "application/octet-stream", "application/wasm", "application/zip", "text/html; charset=utf-8", ""):
        assert not compressible(no), no

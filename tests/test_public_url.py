"""PACS_PUBLIC_URL: the absolute URLs in DICOMweb and FHIR answers use the configured external base URL
(behind a reverse proxy, or for clients that send Host without the port); otherwise the request's own."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource
from pacs.security.accounts import create_token
from pacs.settings import Settings
from tests.support.datasets import make_dataset, to_bytes
from viewer_api.app import create_app


def _client(tmp_path: Path, public_url: str) -> tuple[TestClient, str, AppContext]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", public_url=public_url))
    migrate.upgrade(ctx.engine)
    ds = make_dataset()
    assert Ingestor(ctx.sessions, ctx.store).ingest(to_bytes(ds), IngestSource("import")).ok
    with ctx.sessions() as session, session.begin():
        token = create_token(session, "t", "radiologist", days=1).secret
    client = TestClient(create_app(ctx), base_url="http://internal-host:8000",
                        headers={"Authorization": f"Bearer {token}"})
    return client, ds.StudyInstanceUID, ctx


def test_configured_public_url_is_used_in_retrieve_urls_and_fhir(tmp_path: Path) -> None:
    client, study, ctx = _client(tmp_path, "https://pacs.example.org/")
    try:
        found = client.get("/dicom-web/studies").json()
        assert found[0]["00081190"]["Value"] == [f"https://pacs.example.org/dicom-web/studies/{study}"]
        bundle = client.get("/fhir/ImagingStudy", params={"patient.identifier": "P-001"}).json()
        assert "https://pacs.example.org/" in str(bundle) and "internal-host" not in str(bundle)
    finally:
        ctx.close()


def test_without_a_public_url_the_request_base_is_used(tmp_path: Path) -> None:
    client, study, ctx = _client(tmp_path, "")
    try:
        found = client.get("/dicom-web/studies").json()
        assert found[0]["00081190"]["Value"] == [f"http://internal-host:8000/dicom-web/studies/{study}"]
    finally:
        ctx.close()


def test_an_untrusted_host_is_refused_before_any_url_is_built(tmp_path: Path) -> None:
    """Without PACS_PUBLIC_URL the URLs come from Host: a Host that does not name this server gets 400."""
    client, _, ctx = _client(tmp_path, "")
    try:
        for host in ("evil.example", "evil.example:8000", "internal-host.evil.example", "10.9.9.9"):
            answer = client.get("/dicom-web/studies", headers={"Host": host})
            assert answer.status_code == 400 and "evil" not in answer.text, (host, answer.text)
        assert client.get("/dicom-web/studies", headers={"Host": "localhost:8000"}).status_code == 200
    finally:
        ctx.close()


def test_trusted_hosts_setting_and_public_url_name_the_server(tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", public_url="https://pacs.example.org",
                                     trusted_hosts=["*.hospital.example"]))
    migrate.upgrade(ctx.engine)
    try:
        client = TestClient(create_app(ctx), base_url="http://internal-host:8000")
        for host, status in (("pacs.example.org", 200), ("ct.hospital.example", 200), ("hospital.example", 400),
                             ("evil.example", 400)):
            assert client.get("/health", headers={"Host": host}).status_code == status, host
    finally:
        ctx.close()

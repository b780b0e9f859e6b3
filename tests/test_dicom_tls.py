"""DICOM over TLS (PS3.15 B.1) with DCMTK's echoscu/storescu, mutual TLS on: certificates made by openssl."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db.models import Instance
from pacs.settings import Settings
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.net import free_port
from tests.support.pacs_process import PacsProcess
from tests.support.pki import make_pki
from tests.support.stack import embedded_env

pytestmark = pytest.mark.integration


@dataclass
class TlsServer:
    pki: Path
    plain_port: int
    tls_port: int
    data_dir: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("tls")
    pki = root / "pki"
    make_pki(pki, "hospital-ca", ("server", "modality"))
    make_pki(pki, "other-ca", ("stranger",))
    env = embedded_env(root / "data")
    env.update({"PACS_DICOM_TLS_PORT": str(free_port()), "PACS_TLS_CERT_FILE": str(pki / "server.crt"),
                "PACS_TLS_KEY_FILE": str(pki / "server.key"), "PACS_TLS_CA_FILE": str(pki / "hospital-ca.crt"),
                "PACS_TLS_REQUIRE_CLIENT_CERT": "true"})
    proc = PacsProcess(["serve"], env, root / "serve.log").start()
    try:
        proc.wait_dicom(int(env["PACS_DICOM_PORT"]))
        yield TlsServer(pki, int(env["PACS_DICOM_PORT"]), int(env["PACS_DICOM_TLS_PORT"]), root / "data")
    finally:
        proc.stop()


def _tls_args(server: TlsServer, client: str | None) -> list[str]:
    cert = ["+tls", str(server.pki / f"{client}.key"), str(server.pki / f"{client}.crt")] if client else ["+tla"]
    return [*cert, "+cf", str(server.pki / "hospital-ca.crt")]


def _run(tool: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), "-aec", "PACS", *args], capture_output=True, text=True, env=dcmtk_env(),
                          timeout=60)


def test_echo_and_store_over_mutual_tls(server: TlsServer, tmp_path: Path) -> None:
    assert _run("echoscu", [*_tls_args(server, "modality"), "127.0.0.1", str(server.tls_port)]).returncode == 0
    files = write_ct_series(tmp_path, slices=3, size=64)
    stored = _run("storescu", [*_tls_args(server, "modality"), "127.0.0.1", str(server.tls_port), *map(str, files)])
    assert stored.returncode == 0, stored.stdout + stored.stderr
    ctx = AppContext.create(Settings(data_dir=server.data_dir))
    try:
        sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        with ctx.read_sessions() as s:
            assert set(s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(sops)))) == sops
    finally:
        ctx.close()


def test_peer_without_a_certificate_is_refused(server: TlsServer) -> None:
    result = _run("echoscu", [*_tls_args(server, None), "127.0.0.1", str(server.tls_port)])
    assert result.returncode != 0


def test_certificate_from_another_ca_is_refused(server: TlsServer) -> None:
    args = ["+tls", str(server.pki / "stranger.key"), str(server.pki / "stranger.crt"),
            "+cf", str(server.pki / "hospital-ca.crt"), "127.0.0.1", str(server.tls_port)]
    assert _run("echoscu", args).returncode != 0


def test_plain_listener_still_answers(server: TlsServer) -> None:
    assert _run("echoscu", ["127.0.0.1", str(server.plain_port)]).returncode == 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"tls_cert_file": "/x.crt"}, "both tls_cert_file and tls_key_file"),
    ({"tls_cert_file": "/x.crt", "tls_key_file": "/x.key", "tls_require_client_cert": True}, "needs tls_ca_file"),
])
def test_incomplete_tls_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**settings)

"""deploy/ stays true: the compose file parses, and every PACS_* variable it sets is a real setting."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pacs.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package) is needed to check deploy/docker-compose.yml"
    result = subprocess.run([tool, "--env-file", str(DEPLOY / "env.example"), "-f", str(DEPLOY / "docker-compose.yml"),
                             "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_has_every_process_role(compose: dict) -> None:
    services = compose["services"]
    assert {"minio1", "minio2", "minio3", "minio4", "postgres", "redis", "migrate", "scp", "api", "worker",
            "hl7", "dicom-lb"} <= set(services)
    assert services["hl7"]["command"] == ["hl7", "listen"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["command"][0] == "worker" and services["scp"]["command"] == ["scp"]


def test_compose_sets_only_real_settings(compose: dict) -> None:
    fields = {f"PACS_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for var in service.get("environment", {}) or {}:
            if var.startswith("PACS_"):
                assert var in fields, f"{name} sets {var}, which no setting reads"


def test_compose_configuration_is_accepted_by_settings(compose: dict) -> None:
    env = compose["services"]["scp"]["environment"]
    # complex settings (dicts, lists) come as JSON from the environment, as pydantic-settings reads them
    settings = Settings(**{k.removeprefix("PACS_").lower(): json.loads(v) if v[:1] in "{[" and v else v
                           for k, v in env.items()})
    assert settings.effective_database_url.startswith("postgresql+psycopg://pacs:")
    assert settings.effective_storage_url.endswith("@minio1:9000/dicom") and not settings.embedded_workers

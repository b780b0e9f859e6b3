"""The `pacs` command line, run as a real process the way an operator would (a test of one command family's
logic alone may run it in-process with tests.support.pacs_process.invoke_pacs, when another test here runs that
family as a process)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacs.context import AppContext
from pacs.db.models import Instance, Series, Study
from pacs.settings import Settings
from tests.support.corpus import corpus_files
from tests.support.datasets import make_dataset
from tests.support.net import wait_until
from tests.support.pacs_process import invoke_pacs, run_pacs

pytestmark = pytest.mark.integration  # every test runs `pacs` (as a process, or its commands on a real index)


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    return {"PACS_DATA_DIR": str(tmp_path / "data")}


def test_help_lists_the_commands() -> None:
    out = run_pacs(["--help"], {}).stdout
    for command in ("serve", "scp", "api", "worker", "db", "ae", "import", "config"):
        assert command in out


def test_config_show_masks_secrets(env: dict[str, str]) -> None:
    env = {**env, "PACS_DATABASE_URL": "postgresql+psycopg://pacs:hunter2@db:5432/pacs",
           "PACS_STORAGE_URL": "s3://minio:topsecret@minio:9000/dicom", "PACS_AE_TITLE": "ARCHIVE1"}
    result = run_pacs(["config", "show"], env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["ae_title"] == "ARCHIVE1"
    assert "hunter2" not in result.stdout and "topsecret" not in result.stdout
    assert shown["database_url"] == "postgresql+psycopg://pacs:***@db:5432/pacs"


def test_invalid_configuration_is_a_clear_error(env: dict[str, str]) -> None:
    result = run_pacs(["config", "show"], {**env, "PACS_AE_TITLE": "THIS-TITLE-IS-FAR-TOO-LONG"})
    assert result.returncode == 2 and "AE title" in result.stderr


def test_ae_add_list_remove(env: dict[str, str]) -> None:
    """`ae add`, `ae list` and `ae remove` each run once as a process; their refusals and repeats in-process
    (the same command code; exit statuses as a process are tested by the tests around this one)."""
    assert invoke_pacs(["db", "upgrade"], env).returncode == 0  # a process in test_db_upgrade_on_postgresql
    added = run_pacs(["ae", "add", "CT01", "10.0.0.5", "104", "--description", "Ward CT", "--no-query",
                      "--facility", "HOSP-A"], env)
    assert added.returncode == 0, added.stderr
    again = invoke_pacs(["ae", "add", "CT01", "10.0.0.6", "104", "--archive-wide"], env)
    assert again.returncode == 1 and "already registered" in again.stderr
    assert invoke_pacs(["ae", "add", "BAD\\AE", "h", "104"], env).returncode == 1
    listed = json.loads(run_pacs(["ae", "list", "--json"], env).stdout)
    assert listed == [{"ae_title": "CT01", "host": "10.0.0.5", "port": 104, "description": "Ward CT",
                       "allow_store": True, "allow_query": False, "allow_retrieve": True, "check_host": True,
                       "facility": "HOSP-A", "archive_wide": False, "tls_subject": ""}]
    assert run_pacs(["ae", "remove", "CT01"], env).returncode == 0
    assert invoke_pacs(["ae", "remove", "CT01"], env).returncode == 1
    assert json.loads(invoke_pacs(["ae", "list", "--json"], env).stdout) == []


def test_ae_identity_host_check_by_default_and_a_loud_opt_out(env: dict[str, str]) -> None:
    """Issue 12 finding 3: `ae add` checks the host unless --no-check-host, which warns and is flagged by
    `ae list` and `pacs check` (a warning: exit status unchanged) until `ae identity` turns a check on.
    In-process (the `ae` commands' logic; test_ae_add_list_remove runs them as processes)."""
    assert invoke_pacs(["db", "upgrade"], env).returncode == 0
    opened = invoke_pacs(["ae", "add", "OPEN", "10.0.0.5", "104", "--archive-wide", "--no-check-host"], env)
    assert opened.returncode == 0 and "believed from any address" in opened.stderr
    bad = invoke_pacs(["ae", "add", "TLS1", "10.0.0.6", "104", "--archive-wide", "--tls-subject", "*.ward"], env)
    assert bad.returncode == 1 and "invalid TLS subject" in bad.stderr  # no wildcards
    listed = invoke_pacs(["ae", "list"], env)
    assert "NONE" in listed.stdout and "believed from any address" in listed.stderr and "OPEN" in listed.stderr
    checked = invoke_pacs(["check"], env)
    assert checked.returncode == 0 and "believed from any address" in checked.stderr, checked.stderr
    changed = invoke_pacs(["ae", "identity", "OPEN", "--tls-subject", "ct01.ward.example"], env)
    assert changed.returncode == 0 and "TLS ct01.ward.example" in changed.stdout
    assert "PACS_TLS_CA_FILE is not set" in changed.stderr  # a binding no certificate can ever satisfy here
    (row,) = json.loads(invoke_pacs(["ae", "list", "--json"], env).stdout)
    assert (row["check_host"], row["tls_subject"]) == (False, "ct01.ward.example")
    assert "believed from any address" not in invoke_pacs(["ae", "list"], env).stderr
    assert invoke_pacs(["ae", "identity", "NOSUCH", "--check-host"], env).returncode == 1


def test_commands_refuse_an_unmigrated_database(env: dict[str, str]) -> None:
    result = run_pacs(["ae", "list"], env)
    assert result.returncode == 2 and "pacs db upgrade" in result.stderr


def test_db_upgrade_on_postgresql(fresh_pg_url: str, env: dict[str, str]) -> None:
    env = {**env, "PACS_DATABASE_URL": fresh_pg_url}
    assert run_pacs(["db", "upgrade"], env).returncode == 0
    assert invoke_pacs(["db", "upgrade"], env).returncode == 0  # idempotent (its logic: in-process)
    assert invoke_pacs(["ae", "list", "--json"], env).stdout.strip() == "[]"


def test_worker_without_broker_explains_embedded_mode(env: dict[str, str]) -> None:
    result = run_pacs(["worker"], env)
    assert result.returncode == 2 and "PACS_BROKER_URL" in result.stderr


def _import(path: Path, env: dict[str, str], process: bool = True) -> dict:
    """`pacs import --json` as a process, or in-process (``process=False``) where it already ran as one."""
    args = ["import", "--json", str(path)]
    result = run_pacs(args, env, timeout=600) if process else invoke_pacs(args, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def test_import_whole_corpus_reports_stored_duplicates_and_refusals(env: dict[str, str]) -> None:
    """`pacs import` over every file pydicom ships (DICOM or not): a summary, and a reason per refusal."""
    corpus = Path(corpus_files()[0]).parent
    summary = _import(corpus, env)
    counts = summary["counts"]
    assert counts["stored"] > 80 and counts["new-version"] > 0  # corpus files share SOP Instance UIDs
    assert sum(counts.values()) == len(corpus_files())
    reasons = {Path(name).name: reason for name, reason in summary["rejected"]}
    assert "not a DICOM object" in reasons["README.txt"]
    assert "truncated" in reasons["MR_truncated.dcm"]
    assert "media index" in reasons["DICOMDIR"]
    assert reasons["meta_missing_tsyntax.dcm"] == "File Meta Information has no Transfer Syntax UID"
    ctx = AppContext.create(Settings(data_dir=Path(env["PACS_DATA_DIR"])))
    with ctx.sessions() as s:
        instances = s.scalar(select(func.count()).select_from(Instance))
        # The series' documents and thumbnails were made in-process before the command returned.
        assert s.scalar(select(func.count()).select_from(Series).where(Series.thumbnail_key.is_(None))) == 0
        assert s.scalar(select(func.count()).select_from(Series).where(Series.metadata_key.is_(None))) == 0
    assert instances == counts["stored"]
    # Importing again stores nothing new.
    again = _import(corpus, env, process=False)["counts"]  # the same command again: its logic, in-process
    assert again.get("stored", 0) == 0 and again["rejected"] == counts["rejected"]
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == instances
    ctx.close()


def test_import_zip(env: dict[str, str], tmp_path: Path) -> None:
    zpath = tmp_path / "study.zip"
    study = make_dataset().StudyInstanceUID
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(3):
            ds = make_dataset(StudyInstanceUID=study, InstanceNumber=i)
            path = tmp_path / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            zf.write(path, f"dir/{i}.dcm")
        zf.writestr("dir/notes.txt", "not an image")
    summary = _import(zpath, env, process=False)  # `pacs import` runs as a process in the corpus test
    assert summary["counts"] == {"stored": 3, "rejected": 1}
    assert summary["rejected"][0][0] == "dir/notes.txt" and "not a DICOM object" in summary["rejected"][0][1]
    ctx = AppContext.create(Settings(data_dir=Path(env["PACS_DATA_DIR"])))
    with ctx.sessions() as s:
        assert s.scalars(select(Study.number_of_instances)).one() == 3
    ctx.close()


def test_import_missing_path_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    result = invoke_pacs(["import", str(tmp_path / "nope")], env)  # exit statuses as a process: tests above
    assert result.returncode == 2 and "neither a folder nor a file" in result.stderr


def test_serve_prints_where_it_listens(env: dict[str, str], tmp_path: Path) -> None:
    from tests.support.pacs_process import PacsProcess
    from tests.support.stack import embedded_env

    env = embedded_env(tmp_path / "d")
    proc = PacsProcess(["serve"], env, tmp_path / "serve.log").start()
    try:
        proc.wait_dicom(int(env["PACS_DICOM_PORT"]))
        wait_until(lambda: "PACS ready" in proc.log_tail(), what="banner")
        import httpx

        from tests.support.http_api import wait_http

        wait_http(f"http://127.0.0.1:{env['PACS_HTTP_PORT']}")  # the banner comes just before HTTP binds
        health = httpx.get(f"http://127.0.0.1:{env['PACS_HTTP_PORT']}/health", timeout=5).json()
        assert health == {"status": "ok", "checks": {"index": "ok", "storage": "ok"}}
    finally:
        proc.stop()


def test_config_file_is_read_and_environment_wins(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "pacs.toml"
    config.write_text('ae_title = "FROMFILE"\ndicom_port = 4242\nduplicate_policy = "reject"\n')
    shown = json.loads(invoke_pacs(["config", "show"], {**env, "PACS_CONFIG_FILE": str(config)}).stdout)
    assert (shown["ae_title"], shown["dicom_port"], shown["duplicate_policy"]) == ("FROMFILE", 4242, "reject")
    shown = json.loads(invoke_pacs(["config", "show"], {**env, "PACS_CONFIG_FILE": str(config),
                                                      "PACS_AE_TITLE": "FROMENV"}).stdout)
    assert (shown["ae_title"], shown["dicom_port"]) == ("FROMENV", 4242)

"""Backups that restore (issue 17): `pacs backup create|verify|restore`.

The restore drill on PostgreSQL + the S3 server: an archive with studies (one with a prior version), a user,
an API token, a signed and amended report and its audit trail is backed up by a real `pacs backup create`
process (pg_dump), restored by `pacs backup restore` (pg_restore; run in this process to spare an interpreter
start) into another empty database and another empty bucket, and everything is shown to be back: every index
row and object, the report's versions, the user's login and session, the token, `pacs check` clean, the audit
chain intact (in-process, then by real `pacs check` and `pacs audit verify` processes on the restored archive).
Damaged, unfinished and foreign folders and non-empty targets are refused with nothing written.
The embedded archive (SQLite + filesystem) makes the same round trip in-process, and a backup of an older
schema is migrated by its restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from pydicom.uid import generate_uid
from sqlalchemy import func, inspect, select
from typer.testing import CliRunner

from pacs import audit
from pacs.backup import BackupDamaged, BackupRefused, create_backup, restore_backup, verify_backup
from pacs.backup.postgres import find_tool
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent as AuditEventRow
from pacs.db.models import Instance, InstanceVersion, Series, Study
from pacs.ingest import Ingestor, IngestSource
from pacs.maintenance.check import check
from pacs.reports import lifecycle
from pacs.reports.models import Report, ReportVersion
from pacs.security.accounts import check_password, create_token, create_user
from pacs.security.authenticate import Authenticator
from pacs.security.models import User
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.settings import Settings
from tests.support.datasets import make_instance
from tests.support.pacs_process import run_pacs
from tests.support.postgres import create_database, drop_database
from tests.support.seaweed import SeaweedS3

SECRET = "backup-drill-" + "x" * 40  # PACS_AUTH_SECRET: kept outside the backup, the same on both sides
PASSWORD = "correct horse battery"
RAD = Principal(subject="rad-a", role=Role.RADIOLOGIST, capabilities=capabilities_of(Role.RADIOLOGIST),
                scope=scope_for(Role.RADIOLOGIST, "A"), facility="A", source_address="127.0.0.1:1")


def _populate(ctx: AppContext, studies: int = 3) -> dict[str, str]:
    """Studies (one instance replaced by a new version), a user, a token, an amended report; returns secrets."""
    ingestor = Ingestor(ctx.sessions, ctx.store)
    source = IngestSource("stow", user="test", facility="A")
    first_study = ""
    for n in range(studies):
        study, series = generate_uid(), generate_uid()
        first_study = first_study or study
        for i in range(2):
            sop = generate_uid()
            outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                                                    SOPInstanceUID=sop, PatientID=f"P{n}", InstanceNumber=i + 1,
                                                    PatientName="Nguyễn^Văn An"), source)
            assert outcome.ok, outcome.message
    # the same SOP Instance UID with other content: the old object stays as a prior version
    outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                            PatientID=f"P{n}", PatientName="Nguyễn^Văn Bình"), source)
    assert outcome.ok, outcome.message
    ctx.store.put("derived/thumbnails/extra.jpg", b"\xff\xd8 not only dicom/ objects \xff\xd9")
    with ctx.sessions() as session, session.begin():
        create_user(session, "dr.lan", PASSWORD, Role.RADIOLOGIST, facility="A")
        token = create_token(session, "emr", Role.EMR, days=30, facility="A")
        audit.append(session, action="config.user-add", actor="os:test", role="operator", detail="user=dr.lan")
    with ctx.sessions() as session, session.begin():
        report = lifecycle.create_draft(session, RAD, first_study, "Phổi sáng.", "Bình thường.", "vi")
    with ctx.sessions() as session, session.begin():
        lifecycle.sign(session, RAD, report.id)
    with ctx.sessions() as session, session.begin():
        lifecycle.amend(session, RAD, report.id, "Sai bên", "Phổi phải sáng.", "Bình thường.")
    with ctx.sessions() as session, session.begin():
        lifecycle.sign(session, RAD, report.id)
    return {"token": token.secret}


def _fingerprint(ctx: AppContext) -> dict[str, object]:
    """What must come back: every row that identifies an image or a report, every object, the audit head."""
    with ctx.read_sessions() as s:
        uids = s.execute(select(Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid,
                                Instance.sha256, Instance.object_key)
                         .join(Series, Series.study_fk == Study.id).join(Instance, Instance.series_fk == Series.id)
                         .order_by(Instance.sop_instance_uid)).all()
        versions = s.execute(select(InstanceVersion.sop_instance_uid, InstanceVersion.sha256)
                             .order_by(InstanceVersion.sop_instance_uid)).all()
        reports = s.execute(select(Report.study_instance_uid, Report.status, ReportVersion.version,
                                   ReportVersion.status, ReportVersion.findings, ReportVersion.amend_reason,
                                   ReportVersion.signed_by, ReportVersion.signed_at)
                            .join(ReportVersion, ReportVersion.report_fk == Report.id)
                            .order_by(ReportVersion.version)).all()
        users = s.execute(select(User.username, User.password_hash, User.role)).all()
        counts = {t: s.execute(select(func.count()).select_from(t)).scalar_one()  # type: ignore[arg-type]
                  for t in (Study.__table__, Series.__table__, Instance.__table__)}
    objects = [(o.key, o.size) for o in ctx.store.list("")]
    rows = hashlib.sha256(json.dumps([list(map(str, r)) for r in uids]).encode()).hexdigest()
    return {"instances": len(uids), "uids": rows, "versions": [tuple(v) for v in versions],
            "reports": [tuple(r) for r in reports], "users": [tuple(u) for u in users],
            "counts": {t.name: n for t, n in counts.items()}, "objects": objects}


def _context(data_dir: Path, database_url: str = "", storage_url: str = "") -> AppContext:
    return AppContext.create(Settings(data_dir=data_dir, database_url=database_url, storage_url=storage_url,
                                      auth_secret=SECRET))


def _env(ctx: AppContext) -> dict[str, str]:
    return {"PACS_DATA_DIR": str(ctx.settings.data_dir), "PACS_DATABASE_URL": ctx.settings.database_url,
            "PACS_STORAGE_URL": ctx.settings.storage_url, "PACS_AUTH_SECRET": SECRET, "PACS_LOG_LEVEL": "WARNING"}


def _pacs(args: list[str], ctx: AppContext, expect: int) -> tuple[str, str]:
    """Run `pacs` on ``ctx``'s archive; (stdout, stderr)."""
    result = run_pacs(args, _env(ctx), timeout=120)
    assert result.returncode == expect, f"pacs {args} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                        f"{result.stderr[-3000:]}"
    return result.stdout, result.stderr


def _cli(args: list[str], ctx: AppContext, expect: int) -> tuple[str, str]:
    """The same command in this process (no interpreter start): (stdout, stderr with its line wraps undone)."""
    from pacs.cli.main import app

    umask = os.umask(0o022)  # the CLI's callback narrows the umask of this (the test) process: put it back
    os.umask(umask)
    try:
        result = CliRunner().invoke(app, args, env=_env(ctx))
    finally:
        os.umask(umask)
    assert result.exit_code == expect, f"pacs {args} exited {result.exit_code}:\n{result.output[-3000:]}"
    return result.stdout, " ".join(result.stderr.split())


def _is_empty(ctx: AppContext) -> bool:
    with ctx.engine.connect() as conn:
        tables = inspect(conn).get_table_names()
    return not tables and next(iter(ctx.store.list("")), None) is None


def _assert_restored(source: dict[str, object], ctx: AppContext, secrets: dict[str, str]) -> None:
    assert _fingerprint(ctx) == source
    assert migrate.is_current(ctx.engine)
    summary = check(ctx.sessions, ctx.store)
    assert summary.ok and summary.problems == [], summary.as_dict()  # no error, and no orphan either
    assert summary.checked == source["counts"]["instance"] + len(source["versions"])  # type: ignore[index]
    checked, problems, _ = audit.verify(ctx.read_sessions)
    assert problems == [] and checked > 0
    with ctx.sessions() as session:
        user = check_password(session, "dr.lan", PASSWORD)
        assert user is not None and user.role == Role.RADIOLOGIST.value
    authenticator = Authenticator(ctx.settings, ctx.sessions)
    assert authenticator.authenticate(secrets["token"]).subject == "token:emr"
    session_token, _ = authenticator.issue_session_token(user)
    assert authenticator.authenticate(session_token).subject == "dr.lan"


@pytest.fixture()
def pg_s3(s3_server: SeaweedS3, tmp_path: Path):
    """A factory of fresh (database, bucket) archives on the real servers; the databases are dropped after."""
    made: list[tuple[str, AppContext]] = []

    def archive(name: str) -> AppContext:
        db, url = create_database()
        ctx = _context(tmp_path / name, url, s3_server.url_for(f"pacs-{uuid.uuid4().hex[:12]}"))
        made.append((db, ctx))
        return ctx

    yield archive
    for db, ctx in made:
        ctx.close()
        drop_database(db)


@pytest.mark.integration
def test_restore_drill_on_postgresql_and_s3(pg_s3, tmp_path: Path) -> None:
    source = pg_s3("source")
    migrate.upgrade(source.engine)
    secrets = _populate(source)
    before = _fingerprint(source)
    assert before["instances"] == 6 and len(before["versions"]) == 1 and len(before["reports"]) == 2  # type: ignore[arg-type]

    backup = tmp_path / "backup"
    made = json.loads(_pacs(["backup", "create", "--json", str(backup)], source, 0)[0])
    assert made["complete"] and made["missing"]["count"] == 0
    assert made["objects"] == len(before["objects"]) and made["tables"]["instance"] == 6  # type: ignore[arg-type]
    assert verify_backup(backup).intact
    after_backup = _fingerprint(source)  # the backup's own audit row aside, the source is untouched
    assert after_backup == before

    target = pg_s3("target")
    restored = json.loads(_cli(["backup", "restore", "--json", str(backup)], target, 0)[0])
    assert restored["objects"] == made["objects"] and restored["migrated_from"] == []
    _assert_restored(before, target, secrets)
    with source.read_sessions() as s, target.read_sessions() as t:
        # the whole chain came back (the backup's own row included) and continues with the restore's
        source_chain = list(s.scalars(select(AuditEventRow.entry_hash).order_by(AuditEventRow.id)))
        target_chain = list(t.scalars(select(AuditEventRow.entry_hash).order_by(AuditEventRow.id)))
        actions = list(t.scalars(select(AuditEventRow.action).order_by(AuditEventRow.id)))
    assert target_chain[:len(source_chain)] == source_chain and len(target_chain) == len(source_chain) + 1
    assert actions[-2:] == ["backup.create", "backup.restore"]
    # and as an operator proves it: `pacs check` and `pacs audit verify` on the restored archive, run as
    # processes side by side (each an interpreter start)
    with ThreadPoolExecutor(2) as pool:
        checked, verified = pool.map(lambda args: _pacs(args, target, 0)[0],
                                     [["check", "--json"], ["audit", "verify"]])
    summary = json.loads(checked)
    assert summary["ok"] and summary["errors"] == summary["warnings"] == 0, summary
    # every DICOM object and version; not the derived objects (the instances' fragments, a thumbnail)
    assert summary["checked"] == before["counts"]["instance"] + len(before["versions"])  # type: ignore[index, arg-type]
    assert 0 < summary["checked"] < len(before["objects"])  # type: ignore[arg-type]
    assert re.fullmatch(rf"audit trail intact: {len(target_chain)} rows, last hash {target_chain[-1]}\s*",
                        verified), verified

    # a target that is not empty (the one just restored) is refused, and nothing in it changes
    _, err = _cli(["backup", "restore", str(backup)], target, 2)
    assert "is not empty" in err and "restore needs an empty database" in err, err
    assert _fingerprint(target) == before

    # one byte flipped in one DICOM object: verify names it, restore refuses it and writes nothing
    key = next(k for k, _ in before["objects"] if k.startswith("dicom/"))  # type: ignore[attr-defined]
    victim = backup / "objects" / key
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    out, _ = _cli(["backup", "verify", "--json", str(backup)], source, 1)
    report = json.loads(out)
    assert not report["intact"] and report["problems"] == [
        f"objects/{key}: SHA-256 differs from the list (changed or corrupt)"]
    fresh = pg_s3("fresh")
    with pytest.raises(BackupDamaged, match="SHA-256 differs"):
        restore_backup(fresh.settings, backup)
    assert _is_empty(fresh)

    # a backup without its manifest (interrupted) and a folder that is no backup: refused, nothing written
    (backup / "MANIFEST.json").rename(tmp_path / "MANIFEST.json.saved")
    with pytest.raises(BackupRefused, match=r"incomplete backup: it has objects, objects\.jsonl"):
        restore_backup(fresh.settings, backup)
    _, err = _cli(["backup", "verify", str(backup)], source, 2)
    assert "incomplete backup" in err, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a backup")
    with pytest.raises(BackupRefused, match="is not a pacs backup"):
        restore_backup(fresh.settings, other)
    assert _is_empty(fresh)

    # a new backup is never mixed into a folder that holds anything
    with pytest.raises(BackupRefused, match="is not empty"):
        create_backup(source.settings, backup)
    assert not (backup / "MANIFEST.json").exists()


@pytest.mark.integration
def test_pg_dump_older_than_the_server_is_refused_with_the_package_to_install() -> None:
    installed = find_tool("pg_dump", 0)
    with pytest.raises(BackupRefused, match=rf"pg_dump must be of PostgreSQL {installed.major + 1} or newer.*"
                                            rf"install postgresql-client-{installed.major + 1}"):
        find_tool("pg_dump", installed.major + 1)


def test_embedded_round_trip_and_a_backup_of_a_store_missing_an_object(tmp_path: Path) -> None:
    source = _context(tmp_path / "source")
    migrate.upgrade(source.engine)
    secrets = _populate(source, studies=1)
    before = _fingerprint(source)
    made = create_backup(source.settings, tmp_path / "b1", actor="os:test")
    assert made.complete and made.index_kind == "sqlite" and made.objects == len(before["objects"])  # type: ignore[arg-type]
    target = _context(tmp_path / "target")
    restored = restore_backup(target.settings, tmp_path / "b1", actor="os:test")
    assert restored.objects == made.objects and restored.missing_at_creation == 0
    _assert_restored(before, target, secrets)
    with pytest.raises(BackupRefused, match="is not empty"):
        restore_backup(target.settings, tmp_path / "b1")

    # an indexed object lost from the store (by hand): the backup names it, verify and restore say so
    with source.read_sessions() as s:
        lost = s.scalars(select(Instance.object_key).order_by(Instance.id).limit(1)).one()
    source.store.delete(lost)
    made = create_backup(source.settings, tmp_path / "b2")
    assert not made.complete and made.missing.count == 1 and made.missing.keys == [lost]
    summary = verify_backup(tmp_path / "b2")
    assert summary.intact and summary.missing_at_creation == 1 and summary.as_dict()["missing_keys"] == [lost]
    again = restore_backup(_context(tmp_path / "target2").settings, tmp_path / "b2")
    assert again.missing_at_creation == 1

    # a manifest of something else, or one that was edited into nonsense: refused before anything is read
    manifest = tmp_path / "b2" / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "objects": {**data["objects"], "count": "many"}}))
    with pytest.raises(BackupRefused, match=r"lacks a valid objects\.count"):
        verify_backup(tmp_path / "b2")
    manifest.write_text(json.dumps({**data, "index": {**data["index"], "alembic_revisions": ["0999_future"]}}))
    with pytest.raises(BackupRefused, match="schema revision 0999_future, which this pacs does not know"):
        restore_backup(_context(tmp_path / "target3").settings, tmp_path / "b2")
    manifest.write_text(json.dumps({**data, "format": "someone-elses-backup/3"}))
    with pytest.raises(BackupRefused, match="not a manifest of this backup format"):
        restore_backup(_context(tmp_path / "target3").settings, tmp_path / "b2")
    assert not (tmp_path / "target3" / "index.sqlite3").exists()
    source.close()
    target.close()


def test_a_backup_of_an_older_schema_is_migrated_when_restored(tmp_path: Path) -> None:
    source = _context(tmp_path / "source")
    config = migrate.alembic_config(source.settings.effective_database_url)
    with source.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0013_rejections")
    with source.sessions() as session, session.begin():
        create_user(session, "dr.lan", PASSWORD, Role.RADIOLOGIST, facility="A")
        audit.append(session, action="config.user-add", actor="os:test", role="operator", detail="user=dr.lan")
    create_backup(source.settings, tmp_path / "old")
    assert json.loads((tmp_path / "old" / "MANIFEST.json").read_text())["index"]["alembic_revisions"] == [
        "0013_rejections"]
    target = _context(tmp_path / "target")
    restored = restore_backup(target.settings, tmp_path / "old")
    assert restored.migrated_from == ["0013_rejections"] and migrate.is_current(target.engine)
    with target.sessions() as session:
        assert check_password(session, "dr.lan", PASSWORD) is not None
    checked, problems, _ = audit.verify(target.read_sessions)
    assert (checked, problems) == (3, [])  # the user's row, the backup's, the restore's
    source.close()
    target.close()


def test_what_changes_between_the_dump_and_the_copy_is_accounted_for(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An object deleted after the dump is named missing; an image received after it is in the backup and comes
    back as an orphan that `pacs reindex --force` indexes."""
    import pacs.backup.create as backup_create
    from pacs.maintenance.reindex import reindex

    source = _context(tmp_path / "source")
    migrate.upgrade(source.engine)
    ingestor = Ingestor(source.sessions, source.store)
    arrival = IngestSource("stow", user="test", facility="A")
    study, series = generate_uid(), generate_uid()
    for _ in range(2):
        assert ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series), arrival).ok
    with source.read_sessions() as s:
        gone = s.scalars(select(Instance.object_key).order_by(Instance.id).limit(1)).one()
    late_sop = generate_uid()
    real_copy = backup_create.copy_store

    def copy_after_changes(store, folder, progress=None):  # type: ignore[no-untyped-def]
        store.delete(gone)  # e.g. a study deletion committed after the dump
        late = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=late_sop)
        assert ingestor.ingest(late, arrival).ok  # an image received after the dump
        return real_copy(store, folder, progress)

    monkeypatch.setattr(backup_create, "copy_store", copy_after_changes)
    made = create_backup(source.settings, tmp_path / "backup")
    assert made.missing.keys == [gone] and made.tables["instance"] == 2
    target = _context(tmp_path / "target")
    restore_backup(target.settings, tmp_path / "backup")
    found = check(target.sessions, target.store)
    assert [(p.kind.value, p.key) for p in found.errors] == [("missing", gone)]
    assert [(p.kind.value, p.key.split("/")[3]) for p in found.warnings] == [("orphan", late_sop)]
    assert reindex(target.sessions, target.store, force=True).instances == 1
    with target.read_sessions() as s:
        assert s.scalar(select(func.count()).where(Instance.sop_instance_uid == late_sop)) == 1
    assert check(target.sessions, target.store).warnings == []
    source.close()
    target.close()

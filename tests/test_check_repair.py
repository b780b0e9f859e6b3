"""`pacs import` finishes its derived work before it exits; `pacs check` lists what crashes leave behind
(orphans, temporary files) as warnings, and `pacs check --repair` collects only what is old and unreferenced
(issue 12, "Reliability"). Real `pacs` processes on the embedded configuration (a command run again within a
test, for its logic, runs in-process: tests.support.pacs_process.invoke_pacs)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db.models import AuditEvent, DerivedTask, Instance, InstanceVersion, Series, Study
from pacs.maintenance.repair import repair_refusal
from pacs.settings import Settings
from tests.support.pacs_process import invoke_pacs, run_pacs

pytestmark = pytest.mark.integration

OLD = time.time() - 3 * 3600  # older than the default grace period of 60 minutes


def _pacs(args: list[str], env: dict[str, str], expect: int = 0, process: bool = True) -> str:
    result = run_pacs(args, env, timeout=300) if process else invoke_pacs(args, env)
    assert result.returncode == expect, f"pacs {args} exited {result.returncode}:\n{result.stdout[-3000:]}" \
                                        f"\n{result.stderr[-3000:]}"
    return result.stdout


def _states(ctx: AppContext) -> dict[str, set[str]]:
    with ctx.sessions() as s:
        rows = s.execute(select(DerivedTask.kind, DerivedTask.state)).all()
    out: dict[str, set[str]] = {}
    for kind, state in rows:
        out.setdefault(kind, set()).add(state)
    return out


def test_import_drains_its_derived_work_and_reports_what_it_leaves(tmp_path: Path) -> None:
    env = {"PACS_DATA_DIR": str(tmp_path / "data"), "PACS_LOG_LEVEL": "WARNING"}
    write_ct_series(tmp_path / "ct", slices=10, size=64)
    result = json.loads(_pacs(["import", "--json", str(tmp_path / "ct")], env))
    # the series document and thumbnail (deferred while the series arrived) are done at exit; the instances'
    # fragments were made at ingest (their rows done at once, nothing for a worker)
    assert result["counts"] == {"stored": 10}
    assert (result["derived_tasks"], result["derived_tasks_remaining"]) == (1, 0)
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    try:
        assert _states(ctx) == {"thumbnail": {"done"}, "series-metadata": {"done"}}
        with ctx.sessions() as s:
            assert all(s.scalars(select(Series.thumbnail_key))) and all(s.scalars(select(Series.metadata_key)))

        # --no-wait (the default with a broker): a series that has not settled is reported, not waited for
        write_ct_series(tmp_path / "ct2", slices=3, size=64)
        text = _pacs(["import", "--no-wait", str(tmp_path / "ct2")], {**env, "PACS_SERIES_SETTLE_S": "3600"})
        assert "1 of 1 derived task(s) (thumbnails, metadata) still to run: see `pacs tasks status`" in text, text
        assert _states(ctx)["series-metadata"] == {"done", "pending"}  # left for the next `pacs serve`
    finally:
        ctx.close()


def test_check_lists_orphans_and_temporary_files_as_warnings_and_repair_takes_only_old_unreferenced_ones(
        tmp_path: Path) -> None:
    env = {"PACS_DATA_DIR": str(tmp_path / "data"), "PACS_LOG_LEVEL": "WARNING"}
    write_ct_series(tmp_path / "ct", slices=4, size=64)
    _pacs(["import", "--json", str(tmp_path / "ct")], env)
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    try:
        root = tmp_path / "data" / "objects"
        with ctx.sessions() as s:
            keys = list(s.scalars(select(Instance.object_key).order_by(Instance.id)))
        indexed = root / keys[0]
        os.utime(indexed, (OLD, OLD))  # an old, acknowledged object: never taken
        folder = indexed.parent
        data = indexed.read_bytes()
        # orphans, as an ingest killed between its object write and its index commit leaves them
        orphan = "dicom/1.2.3/1.2.3.4/1.2.3.4.5/" + "a" * 64 + ".dcm"
        young_orphan = "dicom/1.2.3/1.2.3.4/1.2.3.4.6/" + "b" * 64 + ".dcm"
        held = "dicom/1.2.3/1.2.3.4/1.2.3.4.7/" + "c" * 64 + ".dcm"  # named by a row other than an instance's
        for key in (orphan, young_orphan, held):
            ctx.store.put(key, data, length=len(data))
        for key in (orphan, held):
            os.utime(root / key, (OLD, OLD))
        with ctx.sessions() as s, s.begin():  # any *_key column protects its object (e.g. reconciliation queue)
            s.execute(update(Study).values(thumbnail_key=held))
        old_tmp, young_tmp = folder / ".tmp-0123456789abcdef", folder / ".tmp-fedcba9876543210"
        old_tmp.write_bytes(b"half an object")
        young_tmp.write_bytes(b"a write in flight")
        os.utime(old_tmp, (OLD, OLD))

        report = json.loads(_pacs(["check", "--json"], env, expect=0))  # warnings only: exit 0
        assert report["ok"] and (report["errors"], report["warnings"]) == (0, 5)
        listed = {(p["kind"], p["key"]) for p in report["problems"]}
        temp_dir = folder.relative_to(root)
        assert listed == {("orphan", orphan), ("orphan", young_orphan), ("orphan", held),
                          ("temporary", str(temp_dir / old_tmp.name)), ("temporary", str(temp_dir / young_tmp.name))}

        repaired = json.loads(_pacs(["check", "--repair", "--json"], env, expect=0, process=False))["repair"]
        assert repaired["removed_orphans"] == [orphan]
        assert repaired["removed_temporary"] == [str(temp_dir / old_tmp.name)]
        kept = dict(repaired["kept"])
        assert kept[held] == "an index row points at it now"
        assert kept[young_orphan].startswith("younger than the grace period")
        assert not (root / orphan).exists() and not old_tmp.exists()
        assert (root / held).exists() and (root / young_orphan).exists() and young_tmp.exists()
        assert indexed.read_bytes() == data  # every acknowledged object intact
        with ctx.sessions() as s:
            audited = list(s.scalars(select(AuditEvent.detail).where(AuditEvent.action.like("store.%"))))
        assert len(audited) == 2 and any(orphan in d for d in audited)

        text = _pacs(["check", "--repair"], env, expect=0, process=False)
        assert "removed 0 orphan(s) and 0 temporary file(s)" in text

        indexed.unlink()  # an index row without its object stays an error
        assert json.loads(_pacs(["check", "--json"], env, expect=1, process=False))["counts"]["missing"] == 1
    finally:
        ctx.close()


def test_repair_refuses_an_index_that_is_not_this_stores_account(tmp_path: Path) -> None:
    """An emptied (or wrong, or restored) index makes every object an orphan: --repair must refuse, not
    delete acknowledged images that `pacs reindex` would recover."""
    env = {"PACS_DATA_DIR": str(tmp_path / "data"), "PACS_LOG_LEVEL": "WARNING"}
    write_ct_series(tmp_path / "ct", slices=3, size=64)
    _pacs(["import", "--json", str(tmp_path / "ct")], env)
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    try:
        with ctx.sessions() as s, s.begin():
            keys = list(s.scalars(select(Instance.object_key)))
            s.execute(delete(InstanceVersion))
            s.execute(delete(Instance))
        root = tmp_path / "data" / "objects"
        for key in keys:
            os.utime(root / key, (OLD, OLD))
        result = run_pacs(["check", "--repair", "--grace-minutes", "1"], env, timeout=300)
        said = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 1 and "--repair refused" in said and "pacs reindex" in said, said
        assert all((root / key).exists() for key in keys)
    finally:
        ctx.close()


def test_repair_refusal_rules() -> None:
    assert repair_refusal(errors=0, indexed=100, listed=103, orphans=3) == ""
    assert "error" in repair_refusal(errors=1, indexed=100, listed=103, orphans=3)
    assert "no instance" in repair_refusal(errors=0, indexed=0, listed=3, orphans=3)
    assert "unreferenced" in repair_refusal(errors=0, indexed=10, listed=40, orphans=30)

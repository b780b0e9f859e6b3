"""`pacs check` verifies the objects held in the reconciliation queue like indexed ones: a held object is an
acknowledged image (its sender was answered) and, while it waits for a person, the archive's only copy. Missing,
cut short or corrupt, it is an error (exit 1), named by its ``reconciliation/`` key; a resolved row whose copy was
removed (filed, discarded) is not. An object under ``reconciliation/`` that no queue row names is an orphan (a
warning), which ``--repair`` collects like the others. SQLite + filesystem, the check's own function and the CLI
in-process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from pacs.context import AppContext
from pacs.db import migrate
from pacs.maintenance.check import ProblemKind, check
from pacs.maintenance.repair import repair
from pacs.reconciliation.models import DISCARDED, FILED, PENDING, SEPARATED, ReconciliationItem
from pacs.settings import Settings
from storage.keys import reconciliation_key
from tests.support.datasets import make_instance
from tests.support.pacs_process import invoke_pacs


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[AppContext]:
    context = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(context.engine)
    yield context
    context.close()


def _hold(ctx: AppContext, state: str, patient: str, *, put: bool = True) -> tuple[str, bytes]:
    """A held object as the queue keeps it: its bytes under reconciliation/ and a row naming them."""
    data = make_instance(PatientID=patient)  # a new SOP Instance UID each
    sha256 = hashlib.sha256(data).hexdigest()
    key = reconciliation_key(sha256)
    if put:
        ctx.store.put(key, data)
    with ctx.sessions() as session, session.begin():
        session.add(ReconciliationItem(
            state=state, facility="", reason="patient", detail="", study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4", sop_instance_uid=pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID,
            object_key=key, sha256=sha256, size=len(data), received_at=datetime.now(UTC)))
    return key, data


def test_check_reads_back_every_kept_held_object(ctx: AppContext) -> None:
    whole, _ = _hold(ctx, PENDING, "WHOLE")
    separated, _ = _hold(ctx, SEPARATED, "SEPARATED")
    missing, _ = _hold(ctx, PENDING, "MISSING", put=False)
    short, data = _hold(ctx, PENDING, "SHORT")
    ctx.store.put(short, data[:-10])
    corrupt, data = _hold(ctx, SEPARATED, "CORRUPT")
    ctx.store.put(corrupt, data[:-1] + bytes([data[-1] ^ 0xFF]))
    _hold(ctx, FILED, "FILED", put=False)  # resolved: its held copy was removed, as it should be
    _hold(ctx, DISCARDED, "DISCARDED", put=False)

    summary = check(ctx.sessions, ctx.store)
    assert summary.checked == 5 and not summary.ok
    assert {(p.kind, p.key) for p in summary.errors} == {
        (ProblemKind.MISSING, missing), (ProblemKind.SIZE, short), (ProblemKind.CORRUPT, corrupt)}
    assert whole not in {p.key for p in summary.problems} and separated not in {p.key for p in summary.problems}


def test_pacs_check_exits_1_on_a_lost_held_object(ctx: AppContext, tmp_path: Path) -> None:
    env = {"PACS_DATA_DIR": str(tmp_path / "data")}
    key, _ = _hold(ctx, PENDING, "HELD")
    clean = invoke_pacs(["check", "--json"], env)
    assert clean.returncode == 0 and json.loads(clean.stdout)["checked"] == 1, clean.stdout
    ctx.store.delete(key)
    lost = invoke_pacs(["check", "--json"], env)
    assert lost.returncode == 1, lost.stdout
    report = json.loads(lost.stdout)
    assert [(p["kind"], p["key"]) for p in report["problems"]] == [("missing", key)]


def test_a_held_object_no_queue_row_names_is_an_orphan_that_repair_collects_when_old(ctx: AppContext) -> None:
    """A hold that died between its put and its commit leaves an object under reconciliation/ that no row names:
    a warning, collected by --repair once older than the grace period; a held object a row names never is."""
    named, _ = _hold(ctx, PENDING, "NAMED")
    resolved, _ = _hold(ctx, FILED, "RESOLVED")  # resolved, its copy's removal failed: a row still names it
    data = make_instance(PatientID="DIED")
    orphan = reconciliation_key(hashlib.sha256(data).hexdigest())
    ctx.store.put(orphan, data)

    summary = check(ctx.sessions, ctx.store)
    assert summary.ok and summary.listed == 3
    assert [(p.kind, p.key) for p in summary.warnings] == [(ProblemKind.ORPHAN, orphan)]

    orphans = [p.key for p in summary.warnings]
    assert repair(ctx.sessions, ctx.store, orphans).removed_orphans == []  # too young: a hold may be in flight
    old = time.time() - 3 * 3600
    for key in (named, resolved, orphan):
        os.utime(ctx.store.root / key, (old, old))  # type: ignore[attr-defined]  # the embedded filesystem store
    assert repair(ctx.sessions, ctx.store, [*orphans, named, resolved]).removed_orphans == [orphan]
    assert not ctx.store.exists(orphan) and ctx.store.exists(named) and ctx.store.exists(resolved)

"""Crash drills, short form (CI): nothing acknowledged is ever lost (SPEC §4), on every change.

Each kill round arms one named failpoint (pacs.failpoints) in a live process, sends a small batch,
and lets the process SIGKILL itself there; each outage round takes the S3 server, PostgreSQL or
Redis away while a batch is sent. After every round, everything the sender was told was stored
(status 0x0000) is retrieved by C-GET from the next process life and compared by SHA-256 with what
was sent: zero missing, zero different. At the end the stack runs without failpoints: everything is
retrieved again, derived work completes, and `pacs check` finds no index row without its object
(orphans and temporary files are warnings; `pacs check --repair` collects them, never an
acknowledged object). The machinery is tests/support/drill.py; the long form is
``python -m bench.crash_drill --rounds 200``.

What each bad event gets:
- killed at ``ingest.after_receive`` / ``after_object_write`` / ``after_index_commit`` /
  ``before_response`` on the n-th C-STORE: exactly the n-1 instances before it were acknowledged
  (the n-th gets no response), and those n-1 come back byte-identical;
- killed at ``derived.before_write`` / ``after_write`` / ``before_done`` (in the batch's work or in
  the recovery of earlier work): the restarted process finishes every thumbnail and series document;
- S3 down: every C-STORE 0xA700, database down: every C-STORE 0xA701 (no Success while down); after
  restore the resent batch is acknowledged and retrievable;
- broker down: C-STOREs succeed (the broker is not on the ingest path), the images are retrievable at
  once, and their derived work completes once the broker is back.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pacs import failpoints
from pacs.failpoints import FAILPOINTS, FailpointError, parse
from tests.support.drill import (
    DERIVED_FAILPOINTS,
    INGEST_FAILPOINTS,
    OUTAGES,
    Drill,
    EmbeddedStack,
    Finish,
    Round,
    ScaledStack,
    report,
)
from tests.support.pacs_process import run_pacs
from tests.support.seaweed import SeaweedS3
from tests.support.stack import embedded_env

pytestmark = pytest.mark.integration

SLICES = 4  # per batch, each its own series: every armed hit count (1..3) is reached by one batch
ROOT = Path(__file__).resolve().parents[1]


def test_failpoints_are_named_test_only_and_refuse_unknown_names(tmp_path: Path) -> None:
    """Unset (this process, every production process) nothing is armed; a spec naming an unknown
    failpoint or a bad count is refused, and `pacs serve` refuses to start with one."""
    assert failpoints.armed() == {}
    failpoints.failpoint("ingest.after_receive")  # unarmed: returns, the test goes on
    assert parse("ingest.after_object_write=3, derived.before_done") == {
        "ingest.after_object_write": 3, "derived.before_done": 1}
    for bad in ("ingest.after_recieve=1", "ingest.after_receive=0", "ingest.after_receive=x", "nope"):
        with pytest.raises(FailpointError):
            parse(bad)
    # every call in the code names a known failpoint, and every known failpoint is called somewhere
    called = set()
    for folder in ("pacs", "workers", "dicom_scp", "viewer_api", "storage"):
        for path in (ROOT / folder).rglob("*.py"):
            called |= set(re.findall(r"\bfailpoint\(\"([^\"]+)\"\)", path.read_text()))
    assert called == set(FAILPOINTS)
    env = {**embedded_env(tmp_path / "data"), failpoints.ENV_VAR: "ingest.after_recieve=1"}
    try:
        refused = run_pacs(["serve"], env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("pacs serve started with an unknown failpoint armed")
    assert refused.returncode != 0
    assert "unknown failpoint 'ingest.after_recieve'" in refused.stdout + refused.stderr


def _assert_round(rnd: Round) -> None:
    """A kill round died at its failpoint; an ingest round acknowledged exactly the n-1 instances before
    the n-th hit; whatever was acknowledged came back byte-identical."""
    assert rnd.killed, f"{rnd.mode} {rnd.kind}={rnd.nth}: the process did not die there ({rnd.note})"
    if rnd.kind in INGEST_FAILPOINTS:
        assert len(rnd.acknowledged) == rnd.nth - 1, rnd
    assert rnd.missing == [] and rnd.different == [], rnd


def _assert_end(finish: Finish) -> None:
    assert finish.missing == [] and finish.different == [], report([finish])
    assert finish.index_rows_without_object == 0, finish.check
    assert finish.check_exit == 0, finish.check  # orphans and temporary files are warnings only
    assert finish.derived_not_done == 0 and finish.derived_failed == 0, report([finish])
    if finish.repair_available:
        assert finish.repair_exit == 0, report([finish])  # and everything was retrieved again after it


def test_crash_drill_embedded(tmp_path: Path) -> None:
    """`pacs serve` killed at every failpoint (ingest ones twice, at another hit count)."""
    stack = EmbeddedStack(tmp_path / "stack")
    try:
        drill = Drill(stack, tmp_path / "batches", slices=SLICES)
        plan = [(fp, 1 + i % 3) for i, fp in enumerate(FAILPOINTS)]
        plan += [(fp, 1 + (i + 1) % 3) for i, fp in enumerate(INGEST_FAILPOINTS)]
        for point, nth in plan:
            drill.kill_round(point, nth)
        finish = drill.finish()
    finally:
        stack.close()
    print(report([finish]))
    for rnd in finish.rounds:
        _assert_round(rnd)
    assert sum(len(r.acknowledged) for r in finish.rounds) >= 8  # the drill stored something to lose
    _assert_end(finish)


def test_crash_drill_scaled(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """`pacs scp` killed at the ingest failpoints and `pacs worker` at the derived ones; then the S3
    server, PostgreSQL and Redis each taken away while a batch arrives."""
    stack = ScaledStack(tmp_path / "stack", s3_server)
    try:
        drill = Drill(stack, tmp_path / "batches", slices=SLICES)
        plan = [(fp, 1 + i % 3) for i, fp in enumerate(FAILPOINTS)]
        plan += [("ingest.after_object_write", 1), ("derived.before_write", 2)]
        for point, nth in plan:
            drill.kill_round(point, nth)
        outages = {outage: drill.outage_round(outage) for outage in OUTAGES}
        finish = drill.finish()
    finally:
        stack.close()
    print(report([finish]))
    for rnd in finish.rounds:
        if rnd.kind in OUTAGES:
            continue
        _assert_round(rnd)
    # derived rounds run on a clean SCP: their whole batch is acknowledged before the worker dies
    assert all(len(r.acknowledged) == SLICES for r in finish.rounds if r.kind in DERIVED_FAILPOINTS)
    for outage in ("s3-down", "database-down"):
        rnd = outages[outage]
        assert rnd.refused_while_down == SLICES, rnd  # no Success while the server was away
        assert len(rnd.acknowledged) == SLICES and rnd.missing == [] and rnd.different == [], rnd
    assert "0xA700" in outages["s3-down"].note and "0xA701" in outages["database-down"].note
    broker = outages["broker-down"]
    assert broker.refused_while_down == 0 and broker.retrieved_while_down == SLICES, broker
    _assert_end(finish)

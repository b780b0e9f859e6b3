"""Who may change what on ingest (pacs.security.filing_rules): a sender never alters another facility's
study, series or instance — pure rules here, end to end through STOW-RS and C-STORE below."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource, IngestStatus
from pacs.reconciliation.service import list_items
from pacs.security.filing_rules import (
    HELD_PATIENT,
    HELD_SENDER,
    REFUSAL,
    Decision,
    Existing,
    Owner,
    Sender,
    Verdict,
    decide,
    refusal,
)
from pacs.settings import Settings
from pacs.studies.deletion import sweep_tombstones
from pacs.studies.tombstones import DeletedObject
from tests.support.datasets import make_instance

NOTHING = Existing(None, None, None, None)


def test_new_objects_anywhere_new_are_fine_for_anyone() -> None:
    for facility, trusted in (("", True), ("A", True), ("", False)):
        assert refusal(NOTHING, "1.2", facility, trusted, new_version=False) is None
        decision = decide(NOTHING, "1.2", Sender(facility, trusted), "P1", "", new_version=False)
        assert (decision.verdict, decision.facility, decision.provisional) == (Verdict.FILE, facility, not trusted)


def test_a_series_never_changes_study() -> None:
    existing = Existing(None, series_study_uid="1.9", instance_study_uid=None, instance_study_facility=None)
    assert refusal(existing, "1.2", "", True, new_version=False) == REFUSAL
    assert decide(existing, "1.2", Sender("", True), "P1", "", False).verdict is Verdict.REFUSE


def test_a_facilitys_study_takes_objects_only_from_that_facility_or_unrestricted_senders() -> None:
    """Before issue 12 another facility's (or an unregistered peer's) object was refused (0xA900), which told
    the sender that the study exists; now it is held for the study's facility to reconcile, and the sender
    is not told (warn=False): the same answer as for a study UID nobody has."""
    study_a = Existing("A", "1.2", None, None, study_owner=Owner("A", "PA"))
    assert decide(study_a, "1.2", Sender("A", True), "PA", "", False).verdict is Verdict.FILE
    assert decide(study_a, "1.2", Sender("", True), "PA", "", False).verdict is Verdict.FILE
    for sender in (Sender("B", True), Sender("", False)):  # another facility; an unregistered peer
        held = decide(study_a, "1.2", sender, "PA", "", False)
        assert (held.verdict, held.facility, held.reason, held.warn) == (Verdict.HOLD, "A", HELD_SENDER, False)
    unassigned = Existing("", "1.2", None, None, study_owner=Owner("", "PN"))
    assert decide(unassigned, "1.2", Sender("", False), "PN", "", False).verdict is Verdict.FILE


def test_an_order_pins_its_study_facility_and_patient_even_before_the_study_exists() -> None:
    order = Existing(None, None, None, None, order=Owner("A", "PA", "MRN-A"))
    assert decide(order, "1.2", Sender("A", True), "PA", "", False) == Decision(Verdict.FILE, facility="A")
    assert decide(order, "1.2", Sender("", True), "PA", "MRN-A", False).facility == "A"  # takes A's facility
    for sender in (Sender("B", True), Sender("", False)):
        assert decide(order, "1.2", sender, "PA", "", False).verdict is Verdict.HOLD
    wrong = decide(order, "1.2", Sender("A", True), "PX", "", False)  # A's own modality, another patient
    assert (wrong.verdict, wrong.reason, wrong.warn, wrong.expected) == (Verdict.HOLD, HELD_PATIENT, True,
                                                                         Owner("A", "PA", "MRN-A"))
    assert decide(order, "1.2", Sender("A", True), "PA", "MRN-B", False).verdict is Verdict.HOLD  # other issuer
    # a squatter's study row with this UID does not change whose study it is: the order decides
    squatted = Existing("B", "1.2", None, None, order=Owner("A", "PA"), study_owner=Owner("B", "EVIL"))
    assert decide(squatted, "1.2", Sender("A", True), "PA", "", False).verdict is Verdict.FILE
    assert decide(squatted, "1.2", Sender("B", True), "EVIL", "", False).verdict is Verdict.HOLD
    # a person of A filing a held object as it is: no patient check (that is the point), still A's only
    assert decide(order, "1.2", Sender("A", True, resolving=True), "PX", "", False).verdict is Verdict.FILE


def test_a_trusted_exam_claims_a_study_an_unregistered_peer_created() -> None:
    provisional = Existing("", "1.2", None, None, study_owner=Owner("", "EVIL"), study_provisional=True)
    assert decide(provisional, "1.2", Sender("A", True), "PA", "", False) == Decision(Verdict.CLAIM, facility="A")
    assert decide(provisional, "1.2", Sender("", False), "EVIL", "", False).verdict is Verdict.FILE
    assert decide(provisional, "1.2", Sender("", False), "PA", "", False).verdict is Verdict.HOLD
    # an unrestricted sender (the archive's own report SR, an admin) adds to it without taking its images away
    assert decide(provisional, "1.2", Sender("", True), "EVIL", "", False).verdict is Verdict.FILE


def test_new_versions() -> None:
    in_a = Existing("A", "1.2", "1.2", "A", "CT_A")
    assert refusal(in_a, "1.2", "A", True, new_version=True) is None
    assert refusal(in_a, "1.2", "B", True, new_version=True) == REFUSAL
    assert refusal(in_a, "1.2", "", False, new_version=True, sender_ae="CT_A") == REFUSAL
    moved = Existing(None, None, "1.2", "A", "CT_A")  # the new version names another (new) study
    assert refusal(moved, "1.3", "A", True, new_version=True) == REFUSAL  # a scoped sender may not move it
    assert refusal(moved, "1.3", "", True, new_version=True) is None  # an unrestricted one may (a correction)
    unassigned = Existing("", "1.2", "1.2", "", "CT_X")
    assert refusal(unassigned, "1.2", "", False, new_version=True, sender_ae="CT_X") is None  # own re-send
    assert refusal(unassigned, "1.2", "", False, new_version=True, sender_ae="OTHER") == REFUSAL


@pytest.fixture
def archive(tmp_path: Path):
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(ctx.engine)
    yield ctx, Ingestor(ctx.sessions, ctx.store)
    ctx.close()


def test_another_facility_cannot_overwrite_extend_or_empty_a_study(archive) -> None:
    ctx, ingestor = archive
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    original = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, PatientID="PB")
    assert ingestor.ingest(original, IngestSource("dimse", calling_ae="CT_B", facility="B")).status \
        is IngestStatus.STORED
    objects_before = sorted(o.key for o in ctx.store.list("dicom/"))
    attempts = {
        "overwrite": make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                   PatientID="PB", PatientName="EVIL^EVE"),
        "add to the study": make_instance(StudyInstanceUID=study, SeriesInstanceUID=generate_uid()),
        "add to the series": make_instance(StudyInstanceUID=study, SeriesInstanceUID=series),
        "move the instance out": make_instance(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                                               SOPInstanceUID=sop),
        "steal the series": make_instance(StudyInstanceUID=generate_uid(), SeriesInstanceUID=series),
    }
    # Into B's study: held for B's queue, acknowledged like any stored object (the sender is not told: issue 12
    # finding 4, a refusal was an existence oracle). Naming B's SOP instance or series under another study is
    # still refused, as before.
    held = {"overwrite", "add to the study", "add to the series"}
    for what, data in attempts.items():
        outcome = ingestor.ingest(data, IngestSource("stow", user="token:tech-a", facility="A"))
        unknown = ingestor.ingest(data, IngestSource("dimse", calling_ae="ROGUE", trusted=False))
        if what in held:
            assert (outcome.status, outcome.warn, outcome.message) == (IngestStatus.HELD, False, ""), what
            assert (unknown.status, unknown.warn) == (IngestStatus.HELD, False), what
        else:
            assert (outcome.status, outcome.message) == (IngestStatus.REJECTED, REFUSAL), what
            assert unknown.status is IngestStatus.REJECTED, what
    with ctx.read_sessions() as session:
        from sqlalchemy import func, select

        from pacs.db.models import Instance, InstanceVersion, Study
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(InstanceVersion)) == 0
        assert session.scalar(select(Study.number_of_instances).where(Study.study_instance_uid == study)) == 1
    # nothing else filed: the bytes put for the refused and held ones wait, unindexed, with a pending tombstone for
    # the retention sweep (an ingest of the same bytes might have shared the key: pacs.ingest.service.undo)
    with ctx.read_sessions() as session:
        pending = sorted(session.scalars(select(DeletedObject.object_key)))
    assert sorted(o.key for o in ctx.store.list("dicom/")) == sorted(objects_before + pending)
    assert sweep_tombstones(ctx, now=datetime.now(UTC) + timedelta(hours=2)) == len(pending)
    assert sorted(o.key for o in ctx.store.list("dicom/")) == objects_before
    assert len(list(ctx.store.list("reconciliation/"))) == len(held)  # the held ones, once each
    with ctx.read_sessions() as session:
        queue = list_items(session, frozenset({"B"}))
    assert sorted(i.reason for i in queue) == ["sender"] * len(held)
    # the owning facility (and an unrestricted sender) still can
    fixed = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, PatientID="PB",
                          PatientName="FIXED^NAME")
    assert ingestor.ingest(fixed, IngestSource("dimse", calling_ae="CT_B", facility="B")).status \
        is IngestStatus.NEW_VERSION


def test_a_failed_hold_leaves_the_held_object_another_hold_of_the_same_bytes_committed(
        archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two holds of the same bytes share their reconciliation/ key (content-addressed): the second commits (the
    sender is acknowledged), then the first one's transaction fails. Its object stays for the retention sweep,
    which keeps it while the queue's row names it."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    ctx, ingestor = archive
    study, series = generate_uid(), generate_uid()
    assert ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="PB"),
                           IngestSource("dimse", calling_ae="CT_B", facility="B")).ok
    intruder = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series)  # into B's series: held
    sender = IngestSource("stow", user="token:tech-a", facility="A")
    real_put = ctx.store.put
    second: list[IngestStatus] = []
    fail_next_commit = [False]

    def put_then_the_resend(key: str, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_put(key, *args, **kwargs)
        if key.startswith("reconciliation/") and not second:
            second.append(IngestStatus.HELD)  # (a placeholder while the resend runs: its own put comes here too)
            second[0] = ingestor.ingest(intruder, sender).status
            fail_next_commit[0] = True

    def fail_commit(_session) -> None:  # type: ignore[no-untyped-def]
        if fail_next_commit[0]:
            fail_next_commit[0] = False
            raise OperationalError("COMMIT", {}, Exception("injected: connection to the index lost"))

    monkeypatch.setattr(ctx.store, "put", put_then_the_resend)
    event.listen(ctx.sessions, "before_commit", fail_commit)
    try:
        first = ingestor.ingest(intruder, sender)
    finally:
        event.remove(ctx.sessions, "before_commit", fail_commit)
    assert second == [IngestStatus.HELD] and first.status is IngestStatus.INDEX_UNAVAILABLE
    (held,) = [o.key for o in ctx.store.list("reconciliation/")]
    with ctx.read_sessions() as session:
        assert [i.object_key for i in list_items(session, frozenset({"B"}))] == [held]
    sweep_tombstones(ctx, now=datetime.now(UTC) + timedelta(hours=2))
    assert ctx.store.get_bytes(held) == intruder  # the acknowledged hold's object stays


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def any_archive(request: pytest.FixtureRequest, tmp_path: Path):
    url = "" if request.param == "sqlite" else request.getfixturevalue("fresh_pg_url")
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", database_url=url))
    migrate.upgrade(ctx.engine)
    yield ctx, Ingestor(ctx.sessions, ctx.store)
    ctx.close()


def test_a_trusted_exam_claims_what_an_unregistered_peer_sent_first(any_archive) -> None:
    """Rule 3 end to end (SQLite and PostgreSQL): the unregistered peer's objects (with a prior version) leave the
    index and the ``dicom/`` keys for facility A's queue; the trusted object creates the study afresh."""
    from sqlalchemy import func, select

    from pacs.db.models import Instance, InstanceVersion, Patient, Study

    ctx, ingestor = any_archive
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    rogue = IngestSource("dimse", calling_ae="ROGUE", trusted=False)
    for name in ("EVIL^ONE", "EVIL^TWO"):  # the second is a new version of the same instance
        outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                                PatientID="EVIL", PatientName=name, StudyDescription="SQUAT"), rogue)
        assert outcome.ok, outcome.message
    claimed = ingestor.ingest(make_instance(StudyInstanceUID=study, PatientID="PA", StudyDescription="CT HEAD"),
                              IngestSource("dimse", calling_ae="MODA", facility="A"))
    assert claimed.status is IngestStatus.STORED, claimed.message
    with ctx.read_sessions() as session:
        row = session.execute(select(Study.facility, Study.provisional, Study.study_description, Patient.patient_id,
                                     Study.number_of_instances).join(Patient, Patient.id == Study.patient_fk)
                              .where(Study.study_instance_uid == study)).one()
        assert tuple(row) == ("A", False, "CT HEAD", "PA", 1)
        assert session.scalar(select(func.count()).select_from(Instance).where(Instance.sop_instance_uid == sop)) == 0
        assert session.scalar(select(func.count()).select_from(InstanceVersion)) == 0
        queue = list_items(session, frozenset({"A"}))
    assert sorted((i.reason, i.patient_id, i.sop_instance_uid) for i in queue) == [("untrusted-first", "EVIL", sop)] * 2
    assert len([o for o in ctx.store.list(f"dicom/{study}/")]) == 1
    for item in queue:
        assert ctx.store.exists(item.object_key)
    # the unregistered peer can no longer add to it: its next object is held for A, and it is not told
    again = ingestor.ingest(make_instance(StudyInstanceUID=study, PatientID="EVIL"), rogue)
    assert (again.status, again.warn, again.message) == (IngestStatus.HELD, False, "")

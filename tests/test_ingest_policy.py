"""Who may change what on ingest (pacs.security.ingest_policy): a sender never alters another facility's
study, series or instance — pure rules here, end to end through STOW-RS and C-STORE below."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource, IngestStatus
from pacs.security.ingest_policy import REFUSAL, Existing, refusal
from pacs.settings import Settings
from tests.support.datasets import make_instance

NOTHING = Existing(None, None, None, None)


def test_new_objects_anywhere_new_are_fine_for_anyone() -> None:
    for facility, trusted in (("", True), ("A", True), ("", False)):
        assert refusal(NOTHING, "1.2", facility, trusted, new_version=False) is None


def test_a_series_never_changes_study() -> None:
    existing = Existing(None, series_study_uid="1.9", instance_study_uid=None, instance_study_facility=None)
    assert refusal(existing, "1.2", "", True, new_version=False) == REFUSAL


def test_a_facilitys_study_takes_objects_only_from_that_facility_or_unrestricted_senders() -> None:
    study_a = Existing("A", "1.2", None, None)
    assert refusal(study_a, "1.2", "A", True, new_version=False) is None
    assert refusal(study_a, "1.2", "", True, new_version=False) is None
    assert refusal(study_a, "1.2", "B", True, new_version=False) == REFUSAL
    assert refusal(study_a, "1.2", "", False, new_version=False) == REFUSAL  # an unregistered peer
    assert refusal(Existing("", "1.2", None, None), "1.2", "", False, new_version=False) is None


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
    objects_before = sorted(o.key for o in ctx.store.list(""))
    attempts = {
        "overwrite": make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                   PatientID="PB", PatientName="EVIL^EVE"),
        "add to the study": make_instance(StudyInstanceUID=study, SeriesInstanceUID=generate_uid()),
        "add to the series": make_instance(StudyInstanceUID=study, SeriesInstanceUID=series),
        "move the instance out": make_instance(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                                               SOPInstanceUID=sop),
        "steal the series": make_instance(StudyInstanceUID=generate_uid(), SeriesInstanceUID=series),
    }
    for what, data in attempts.items():
        outcome = ingestor.ingest(data, IngestSource("stow", user="token:tech-a", facility="A"))
        assert (outcome.status, outcome.message) == (IngestStatus.REJECTED, REFUSAL), what
        unknown = ingestor.ingest(data, IngestSource("dimse", calling_ae="ROGUE", trusted=False))
        assert unknown.status is IngestStatus.REJECTED, what
    with ctx.read_sessions() as session:
        from sqlalchemy import func, select

        from pacs.db.models import Instance, InstanceVersion, Study
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(InstanceVersion)) == 0
        assert session.scalar(select(Study.number_of_instances).where(Study.study_instance_uid == study)) == 1
    assert sorted(o.key for o in ctx.store.list("")) == objects_before  # refused objects were removed again
    # the owning facility (and an unrestricted sender) still can
    fixed = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, PatientID="PB",
                          PatientName="FIXED^NAME")
    assert ingestor.ingest(fixed, IngestSource("dimse", calling_ae="CT_B", facility="B")).status \
        is IngestStatus.NEW_VERSION

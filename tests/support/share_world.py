"""An archive with two facilities' studies, a signed Vietnamese report and key images, for the share-link tests
(tests/test_share_links.py, tests/test_share_page_browser.py): the app in process on a real SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource
from pacs.reports import lifecycle
from pacs.reports.publish import mark_key_images
from pacs.security.accounts import create_token
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.settings import Settings
from tests.support.datasets import make_dataset, to_bytes

CT = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_A = "Nguyễn^Văn Ấn"
PATIENT_A_SHOWN = "Nguyễn Văn Ấn"
BIRTH_A = "19650415"
FINDINGS = "Gan kích thước bình thường, nhu mô đồng nhất.\nKhông có dịch ổ bụng."
IMPRESSION = "Không thấy tổn thương khu trú"
PATIENT_B = "Trần^Thị Bích"
FACILITY_NAMES = {"HOSP-A": "Bệnh viện Đa khoa Tỉnh"}


@dataclass
class StudyRef:
    uid: str
    patient_id: str
    patient_name: str
    series: str
    sops: list[str] = field(default_factory=list)


@dataclass
class ShareWorld:
    ctx: AppContext
    a: StudyRef
    b: StudyRef
    tokens: dict[str, str]

    def principal(self, name: str, role: Role, facility: str) -> Principal:
        return Principal(subject=name, role=role, capabilities=capabilities_of(role), scope=scope_for(role, facility),
                         kind="user", facility=facility, source_address="10.0.0.9:5000")


def _study(ctx: AppContext, facility: str, patient_id: str, name: str, birth: str, images: int) -> StudyRef:
    study, series = generate_uid(), generate_uid()
    ref = StudyRef(study, patient_id, name, series)
    ingestor = Ingestor(ctx.sessions, ctx.store)
    for i in range(images):
        rows = cols = 64
        pixels = (np.add.outer(np.arange(rows), np.arange(cols)) * (i + 1) * 16 % 4096).astype(np.uint16)
        ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=generate_uid(),
                          PatientID=patient_id, PatientName=name, PatientBirthDate=birth, Modality="CT",
                          SOPClassUID=CT, InstanceNumber=i + 1, StudyDate="20261205", StudyDescription="CT bụng",
                          Rows=rows, Columns=cols, BitsAllocated=16, BitsStored=12, HighBit=11,
                          PixelData=pixels.tobytes())
        ds.file_meta.MediaStorageSOPClassUID = CT
        outcome = ingestor.ingest(to_bytes(ds), IngestSource("import", facility=facility))
        assert outcome.ok, outcome.message
        ref.sops.append(ds.SOPInstanceUID)
    return ref


@contextmanager
def share_world(root: Path, **settings: object) -> Iterator[ShareWorld]:
    """:func:`populate` on a new archive in ``root`` (the app is then run in process on ``world.ctx``)."""
    ctx = AppContext.create(Settings(data_dir=root / "data", facility_names=FACILITY_NAMES,  # type: ignore[arg-type]
                                     **settings))
    try:
        migrate.upgrade(ctx.engine)
        yield populate(ctx)
    finally:
        ctx.close()


def populate(ctx: AppContext) -> ShareWorld:
    """Facility HOSP-A's study of "Nguyễn Văn Ấn" with a signed report and two key images; HOSP-B's study of
    another patient with its own signed report. API tokens per role and facility."""
    a = _study(ctx, "HOSP-A", "PAT-A", PATIENT_A, BIRTH_A, 3)
    b = _study(ctx, "HOSP-B", "PAT-B", PATIENT_B, "19700101", 1)
    world = ShareWorld(ctx, a, b, {})
    for ref, facility, findings, impression in ((a, "HOSP-A", FINDINGS, IMPRESSION),
                                                (b, "HOSP-B", "Phổi B bình thường.", "B không bất thường")):
        rad = world.principal(f"rad-{facility}", Role.RADIOLOGIST, facility)
        with ctx.sessions() as session, session.begin():
            view = lifecycle.create_draft(session, rad, ref.uid, findings, impression, "vi")
            lifecycle.sign(session, rad, view.id)
    mark_key_images(ctx, world.principal("rad-HOSP-A", Role.RADIOLOGIST, "HOSP-A"), a.uid, a.sops[:2])
    with ctx.sessions() as session, session.begin():
        for name, role, facility in (("rad-a", "radiologist", "HOSP-A"), ("rad-a2", "radiologist", "HOSP-A"),
                                     ("clin-a", "clinician", "HOSP-A"), ("rad-b", "radiologist", "HOSP-B"),
                                     ("tech-a", "technologist", "HOSP-A"), ("admin", "admin", "")):
            world.tokens[name] = create_token(session, name, role, days=1, facility=facility).secret
    return world

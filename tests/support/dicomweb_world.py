"""A small archive for the DICOMweb tests, in both configurations: two facilities' studies and the tokens
that look at them.

- facility HOSP-A (sent by AE ``MODA``): patient ``PAT-A`` "Nguyễn^Văn An", study A1 (two CT series, 2 + 1
  instances) and study A2 (one MR instance);
- facility HOSP-B (sent by AE ``MODB``): patient ``PAT-B`` "BRAVO^BINH", study B1 (one CT series of 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from pacs.aes import add_ae
from pacs.db.models import AuditEvent, DerivedTask, Instance
from pacs.security.accounts import create_token
from tests.support.datasets import make_dataset, to_bytes
from tests.support.net import wait_until
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs, ScaledStack, scaled_api

Server = EmbeddedPacs | ScaledStack
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class StudyRef:
    patient_id: str
    patient_name: str
    study: str
    series: list[str] = field(default_factory=list)
    sops: dict[str, list[str]] = field(default_factory=dict)  # series -> SOP Instance UIDs
    datasets: dict[str, Dataset] = field(default_factory=dict)  # SOP Instance UID -> what was sent

    @property
    def all_sops(self) -> list[str]:
        return [s for uids in self.sops.values() for s in uids]


@dataclass
class World:
    server: Server
    a1: StudyRef
    a2: StudyRef
    b1: StudyRef
    admin: str
    facility_b: str
    patient_a: str
    patient_a_no_images: str

    def client(self, token: str | None = None) -> DICOMwebClient:
        return DICOMwebClient(url=f"{self.server.http_url}/dicom-web",
                              headers={"Authorization": f"Bearer {token or self.admin}"})

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.server.http_url, timeout=60,
                            headers={"Authorization": f"Bearer {token or self.admin}"})


def start_server(kind: str, request: pytest.FixtureRequest, root: Path) -> Server:
    if kind == "scaled":
        return scaled_api(root, request.getfixturevalue("s3_server"))
    return EmbeddedPacs(root)


_WORLDS: dict[str, World] = {}


def shared_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    """The world of configuration ``request.param`` (``embedded`` or ``scaled``), started once per test session
    and shared by the DICOMweb test modules (starting the stacks is most of their run time); closed when
    the session ends. Tests that add data keep it apart (other patients, other facilities)."""
    kind = request.param
    if kind not in _WORLDS:
        server = start_server(kind, request, tmp_path_factory.mktemp(kind))
        request.session.addfinalizer(server.close)  # before the session's S3 server stops (LIFO)
        _WORLDS[kind] = build_world(server)
    return _WORLDS[kind]


def register(server: Server, aet: str, facility: str) -> None:
    """`pacs ae add AET 127.0.0.1 104 --facility F` (the same function, without starting a process)."""
    with server.ctx.sessions() as session, session.begin():
        add_ae(session, aet, "127.0.0.1", 104, facility=facility)


def token(server: Server, role: str, name: str, **kwargs: object) -> str:
    """`pacs token create NAME --role ROLE ...` (the same function, without starting a process)."""
    with server.ctx.sessions() as session, session.begin():
        return create_token(session, name, role, days=1, **kwargs).secret  # type: ignore[arg-type]


def _send_study(server: Server, aet: str, patient_id: str, name: str, study_date: str, accession: str,
                series_plan: list[tuple[str, str, int]]) -> StudyRef:
    ref = StudyRef(patient_id, name, generate_uid())
    for number, (modality, sop_class, count) in enumerate(series_plan, start=1):
        series = generate_uid()
        ref.series.append(series)
        ref.sops[series] = []
        for i in range(count):
            pixels = (np.arange(256, dtype=np.uint16) * (number + i + 1)).astype(np.uint16)
            ds = make_dataset(StudyInstanceUID=ref.study, SeriesInstanceUID=series, SOPInstanceUID=generate_uid(),
                              PatientID=patient_id, PatientName=name, StudyDate=study_date,
                              AccessionNumber=accession, Modality=modality, SOPClassUID=sop_class,
                              SeriesNumber=number, InstanceNumber=i + 1, StudyDescription=f"{modality} study",
                              SeriesDescription=f"{modality} series {number}", BitsAllocated=16, BitsStored=12,
                              HighBit=11, PixelData=pixels.tobytes(), WindowCenter=200, WindowWidth=400)
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            result = send_dataset(server.port, ds, ExplicitVRLittleEndian, aet=aet)
            assert result.status == 0, result
            ref.sops[series].append(ds.SOPInstanceUID)
            ref.datasets[ds.SOPInstanceUID] = ds
    return ref


def build_world(server: Server) -> World:
    register(server, "MODA", "HOSP-A")
    register(server, "MODB", "HOSP-B")
    a1 = _send_study(server, "MODA", "PAT-A", "Nguyễn^Văn An", "20240105", "ACC-A1", [("CT", CT, 2), ("CT", CT, 1)])
    a2 = _send_study(server, "MODA", "PAT-A", "Nguyễn^Văn An", "20240210", "ACC-A2", [("MR", MR, 1)])
    b1 = _send_study(server, "MODB", "PAT-B", "BRAVO^BINH", "20240301", "ACC-B1", [("CT", CT, 2)])
    return World(server, a1, a2, b1,
                 admin=token(server, "admin", "dicomweb-admin"),
                 facility_b=token(server, "radiologist", "radiologist-b", facility="HOSP-B"),
                 patient_a=token(server, "patient", "patient-a", facility="HOSP-A", patient_id="PAT-A", images=True),
                 patient_a_no_images=token(server, "patient", "patient-a-reports", facility="HOSP-A",
                                           patient_id="PAT-A"))


def stored_bytes(server: Server, sop_uid: str) -> bytes:
    with server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop_uid))
    assert key, f"{sop_uid} is not indexed"
    return server.ctx.store.get_bytes(key)


def audit_count(server: Server, action: str, study_uid: str = "") -> int:
    with server.ctx.read_sessions() as session:
        stmt = select(func.count(AuditEvent.id)).where(AuditEvent.action == action)
        if study_uid:
            stmt = stmt.where(AuditEvent.study_instance_uid == study_uid)
        return int(session.scalar(stmt) or 0)


def wait_derived_work(server: Server, timeout: float = 90) -> None:
    """Until every outbox row (thumbnails, metadata documents) is done."""
    def done() -> bool:
        with server.ctx.read_sessions() as session:
            return not session.scalar(select(func.count(DerivedTask.id)).where(DerivedTask.state != "done"))
    wait_until(done, timeout=timeout, interval=0.5, what="derived work (thumbnails, metadata documents)")


def part10(ds: Dataset) -> bytes:
    return to_bytes(ds)

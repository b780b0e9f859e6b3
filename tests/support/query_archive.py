"""A small archive of three patients and five studies (Vietnamese names, UTF-8), shared by the query engine
tests (tests/test_query_engine.py, ingested in-process) and the C-FIND tests (tests/test_cfind.py, sent with
DCMTK): the same data, so both suites check the same answers."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from tests.support.datasets import make_dataset

UID_ROOT = "1.2.826.0.1.3680043.10.1147"
PATIENTS = {  # PatientID: (name, birth date, sex)
    "VN001": ("Nguyễn^Văn An", "19800101", "M"),
    "VN002": ("NGUYEN^THI HA", "19900215", "F"),
    "EN003": ("SMITH^JOHN", "19751120", "M"),
}


@dataclass(frozen=True)
class StudySpec:
    key: str
    patient_id: str
    date: str
    accession: str
    description: str
    series: tuple[tuple[str, int, str], ...]  # (modality, instances, body part)

    @property
    def uid(self) -> str:
        return f"{UID_ROOT}.{self.key[1:]}"

    def series_uid(self, n: int) -> str:
        return f"{self.uid}.{n + 1}"


STUDIES = {
    s.key: s for s in [
        StudySpec("S1", "VN001", "20260105", "ACC-001", "CT Ngực", (("CT", 3, "CHEST"), ("MR", 1, "HEAD"))),
        StudySpec("S2", "VN001", "20260220", "ACC-002", "Siêu âm bụng", (("US", 2, "ABDOMEN"),)),
        StudySpec("S3", "VN002", "20251230", "ACC-003", "CT head", (("CT", 1, "HEAD"),)),
        StudySpec("S4", "EN003", "20260301", "XR-004", "Chest PA", (("CR", 2, "CHEST"),)),
        StudySpec("S5", "EN003", "", "XR-005", "", (("MR", 1, "KNEE"),)),  # no study date
    ]
}


def archive_datasets() -> list[Dataset]:
    """Every instance of the archive, as datasets (UTF-8, ISO_IR 192)."""
    out = []
    for spec in STUDIES.values():
        name, birth, sex = PATIENTS[spec.patient_id]
        for n, (modality, count, body) in enumerate(spec.series):
            for i in range(count):
                out.append(make_dataset(
                    PatientID=spec.patient_id, PatientName=name, PatientBirthDate=birth, PatientSex=sex,
                    StudyInstanceUID=spec.uid, StudyDate=spec.date, StudyTime="083000", AccessionNumber=spec.accession,
                    StudyDescription=spec.description, StudyID=spec.key, ReferringPhysicianName="Lê^Minh",
                    SeriesInstanceUID=spec.series_uid(n), Modality=modality, SeriesNumber=n + 1,
                    BodyPartExamined=body, SOPInstanceUID=f"{spec.series_uid(n)}.{i + 1}", InstanceNumber=i + 1,
                ))
    return out

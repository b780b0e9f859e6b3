"""``pacs demo``: a few made-up studies to look at on a new archive — a chest CT, a chest X-ray and an abdominal
ultrasound of three Vietnamese patients at two facilities, each with its order, the CT with a signed report.

Everything goes through the archive's own paths: orders through :func:`pacs.ris.orders.create_order` (as
``pacs order add``), images through the one ingest function (:meth:`pacs.ingest.service.Ingestor.ingest`, as
``pacs import``), the report through :mod:`pacs.reports.service` (as ``POST /api/reports/{id}/sign``: the SR and
the ORU follow). Running it again changes nothing: the images' UIDs are fixed (``2.25`` UIDs hashed from fixed
names), so they come back as duplicates; orders (by accession number), the report and the demo's radiologist
account are made only when missing.

The report is signed by the account ``demo_radiologist``, made disabled (no password anyone knows): it names
the signer on the report and cannot sign in.
"""

from __future__ import annotations

import io
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
)
from sqlalchemy import select

from pacs.context import AppContext
from pacs.errors import NotFound
from pacs.ingest.service import Ingestor
from pacs.ingest.source import IngestSource
from pacs.reports import lifecycle
from pacs.reports import service as reports
from pacs.ris.orders import NewOrder, create_order, get_order
from pacs.runtime import Pipeline
from pacs.security.accounts import create_user
from pacs.security.models import User
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.settings import Settings

FACILITY_NAMES = {"BVTINH": "Bệnh viện Đa khoa tỉnh", "TTYT-HUYEN": "Trung tâm Y tế huyện"}
RADIOLOGIST = "demo_radiologist"
RADIOLOGIST_NAME = "BS. Phạm Minh Đức (demo)"
CT_SLICES, CT_SIZE = 20, 256
UID_SEED = "filmless-pacs demo v1"


def demo_uid(*names: object) -> str:
    """A fixed UID for one of the demo's objects: ``2.25.`` + a name-based (version 5) UUID of the names, the
    same on every run."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join([UID_SEED, *map(str, names)])).int)


@dataclass(frozen=True)
class DemoStudy:
    key: str
    patient_name: str  # DICOM PN: Family^Given
    patient_id: str
    birth_date: str
    sex: str
    facility: str
    accession: str
    modality: str
    procedure: str
    description: str
    study_date: str
    referring: str
    images: Callable[[DemoStudy], Iterator[Dataset]]

    @property
    def study_uid(self) -> str:
        return demo_uid(self.key, "study")


@dataclass
class LoadedStudy:
    study: DemoStudy
    stored: int = 0
    duplicates: int = 0
    other: list[str] = field(default_factory=list)  # outcomes other than stored/duplicate: "status: message"
    order: str = ""  # "created" / "present"
    report: str = ""  # "signed" / "present" / ""


@dataclass
class DemoResult:
    studies: list[LoadedStudy]
    radiologist: str

    @property
    def ok(self) -> bool:
        return all(not s.other for s in self.studies)


# -- images ----------------------------------------------------------------------------------------------------


def _base(study: DemoStudy, sop_class: str, series: int, number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the names keep their diacritics
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = demo_uid(study.key, "series", series, "instance", number)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = demo_uid(study.key, "series", series)
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = study.accession
    ds.StudyID = "1"
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = study.referring
    ds.InstitutionName = FACILITY_NAMES.get(study.facility, study.facility)
    ds.Manufacturer = "filmless-pacs demo"
    ds.Modality = study.modality
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _grey(ds: Dataset, pixels: np.ndarray, bits: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()


def _ct_slice(size: int, z: float) -> np.ndarray:
    """A chest-like phantom (HU): body, ribs, two lungs whose size changes along z, the aorta with contrast."""
    y, x = np.mgrid[-1:1:complex(size), -1:1:complex(size)]
    img = np.full((size, size), -1000, dtype=np.int16)
    img[(x / 0.85) ** 2 + (y / 0.62) ** 2 < 1] = 40
    img[((x / 0.8) ** 2 + (y / 0.57) ** 2 < 1) & ((x / 0.75) ** 2 + (y / 0.52) ** 2 > 1)] = 700
    r = 0.2 + 0.08 * np.sin(np.pi * z)
    img[((x - 0.35) / 1.2) ** 2 + (y / 1.6) ** 2 < r**2] = -820
    img[((x + 0.35) / 1.2) ** 2 + (y / 1.6) ** 2 < r**2] = -820
    img[x**2 + (y + 0.15) ** 2 < 0.006] = 250
    img[(x**2 + (y - 0.45) ** 2 < 0.01)] = 900  # the spine
    return img


def ct_images(study: DemoStudy) -> Iterator[Dataset]:
    frame = demo_uid(study.key, "frame")
    for i in range(CT_SLICES):
        ds = _base(study, CTImageStorage, 1, i + 1)
        ds.SeriesDescription = "Ngực 5mm không cản quang"
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame
        ds.ImagePositionPatient = [-90.0, -90.0, float(-5 * i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 5.0
        ds.PixelSpacing = [0.7, 0.7]
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        _grey(ds, _ct_slice(CT_SIZE, i / (CT_SLICES - 1)), 16, signed=True)
        yield ds


def chest_xray(study: DemoStudy) -> Iterator[Dataset]:
    size = 512
    y, x = np.mgrid[-1:1:complex(size), -1:1:complex(size)]
    img = np.full((size, size), 3600.0)
    lungs = ((((x - 0.4) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1)
             | (((x + 0.4) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1))
    img[lungs] = 900.0
    img[((x + 0.12) / 0.25) ** 2 + ((y - 0.25) / 0.3) ** 2 < 1] = 2600.0  # the heart
    img[np.abs(x) < 0.06] = 3900.0  # the spine
    for rib in range(-5, 6):
        img[np.abs(y - rib * 0.11 - 0.2 * x**2) < 0.012] += 500.0
    img += np.random.default_rng(7).normal(0, 40, img.shape)
    ds = _base(study, ComputedRadiographyImageStorage, 1, 1)
    ds.SeriesDescription = "Ngực thẳng (PA)"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [0.35, 0.35]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    _grey(ds, np.clip(img, 0, 4095), 12, signed=False)
    yield ds


def ultrasound(study: DemoStudy) -> Iterator[Dataset]:
    rows, cols = 240, 320
    y, x = np.mgrid[0:rows, 0:cols]
    rng = np.random.default_rng(11)
    angle = np.arctan2(x - cols / 2, y + 20)
    radius = np.hypot(x - cols / 2, y + 20)
    fan = (np.abs(angle) < 0.6) & (radius < rows + 10)
    grey = np.where(fan, 70 + rng.normal(0, 25, (rows, cols)), 0)
    grey[fan & (((x - 150) / 60.0) ** 2 + ((y - 130) / 35.0) ** 2 < 1)] = 20  # the gallbladder
    pixels = np.clip(np.repeat(grey[:, :, None], 3, axis=2), 0, 255).astype(np.uint8)
    ds = _base(study, UltrasoundImageStorage, 1, 1)
    ds.SeriesDescription = "Gan mật"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    yield ds


def demo_studies(facilities: tuple[str, str] = ("BVTINH", "TTYT-HUYEN")) -> list[DemoStudy]:
    """The demo's studies; ``facilities``: the provincial hospital's code and the district centre's."""
    hospital, district = facilities
    return [
        DemoStudy("ct-chest", "Nguyễn^Văn An", "DEMO-0001", "19650412", "M", hospital, "DEMO-CT-0001", "CT",
                  "CT ngực không tiêm thuốc cản quang", "CT ngực", "20261201", "Hoàng^Thu Trang", ct_images),
        DemoStudy("cr-chest", "Trần^Thị Bích", "DEMO-0002", "19880923", "F", district, "DEMO-XR-0002", "CR",
                  "X-quang ngực thẳng", "X-quang ngực", "20261202", "Vũ^Đức Thắng", chest_xray),
        DemoStudy("us-abdomen", "Lê^Hoàng Phúc", "DEMO-0003", "19790130", "M", hospital, "DEMO-US-0003", "US",
                  "Siêu âm ổ bụng tổng quát", "Siêu âm bụng", "20261203", "Hoàng^Thu Trang", ultrasound),
    ]


REPORT_FINDINGS = ("Nhu mô hai phổi không thấy nốt hay đám mờ khu trú. Không tràn dịch, không tràn khí màng phổi.\n"
                   "Trung thất cân đối, không thấy hạch to. Tim không to. Khung xương lồng ngực bình thường.")
REPORT_IMPRESSION = "Chưa phát hiện bất thường trên CT ngực."


# -- loading ---------------------------------------------------------------------------------------------------


def load_demo(settings: Settings, facilities: tuple[str, str] = ("BVTINH", "TTYT-HUYEN"),
              progress: Callable[[str], None] = lambda _: None) -> DemoResult:
    """Load the demo into the archive of ``settings`` (its schema must be current); idempotent."""
    pipeline = Pipeline.start(settings)
    armed: set[int] = set()
    try:
        ctx = pipeline.ctx
        loaded = []
        for study in demo_studies(facilities):
            progress(f"{study.modality} {study.patient_name.replace('^', ' ')} ({study.accession})")
            result = LoadedStudy(study)
            result.order = _ensure_order(pipeline, study)
            _ingest(pipeline.ingestor, study, result, armed)
            loaded.append(result)
        if settings.embedded_workers and armed:
            pipeline.drain(armed)  # thumbnails, metadata and the order links, as `pacs import` waits for them
        radiologist = _ensure_radiologist(pipeline, facilities[0])
        ct = loaded[0]
        if not ct.other:
            ct.report = _ensure_report(ctx, ct.study, radiologist)
    finally:
        pipeline.stop()
    return DemoResult(loaded, RADIOLOGIST)


def _ensure_order(pipeline: Pipeline, study: DemoStudy) -> str:
    with pipeline.ctx.sessions() as session, session.begin():
        try:
            get_order(session, study.accession)
            return "present"
        except NotFound:
            pass
        create_order(session, NewOrder(
            patient_id=study.patient_id, patient_name=study.patient_name, modality=study.modality,
            station_ae_title="", start_date=study.study_date, start_time="0900", procedure_description=study.procedure,
            accession_number=study.accession, patient_birth_date=study.birth_date, patient_sex=study.sex,
            referring_physician_name=study.referring, facility=study.facility, source="cli"))
        return "created"


def _ingest(ingestor: Ingestor, study: DemoStudy, result: LoadedStudy, armed: set[int]) -> None:
    source = IngestSource("import", user="pacs-demo", address="local", facility=study.facility)
    for ds in study.images(study):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        outcome = ingestor.ingest(buffer.getvalue(), source)
        armed.update(outcome.derived_task_ids)
        status = outcome.status.value
        if status == "stored":
            result.stored += 1
        elif status in ("duplicate", "kept-existing"):
            result.duplicates += 1
        else:
            result.other.append(f"{status}: {outcome.message}")


def _ensure_radiologist(pipeline: Pipeline, facility: str) -> Principal:
    """The demo's radiologist: a disabled account (a random password nobody is told) that signs the report."""
    with pipeline.ctx.sessions() as session, session.begin():
        user = session.scalars(select(User).where(User.username == RADIOLOGIST)).one_or_none()
        if user is None:
            user = create_user(session, RADIOLOGIST, secrets.token_urlsafe(24), Role.RADIOLOGIST, facility=facility,
                               full_name=RADIOLOGIST_NAME)
        user.active = False
        role, facility = Role(user.role), user.facility
    return Principal(subject=RADIOLOGIST, role=role, capabilities=capabilities_of(role),
                     scope=scope_for(role, facility), kind="user", facility=facility, source_address="cli")


def _ensure_report(ctx: AppContext, study: DemoStudy, radiologist: Principal) -> str:
    with ctx.read_sessions() as session:
        existing = lifecycle.study_reports(session, radiologist.scope, study.study_uid)
    if existing:
        return "present"
    draft = reports.create_draft(ctx, radiologist, study.study_uid, REPORT_FINDINGS, REPORT_IMPRESSION, "vi")
    reports.sign(ctx, radiologist, draft.id)
    return "signed"

"""Black-box tests: the archive seen only through its public doors, with clients nobody here wrote (DCMTK's
echoscu/storescu/findscu/getscu/movescu, dicomweb-client, plain HTTP).

By default they run against a `pacs serve` the fixture starts; with PACS_TEST_TARGET_URL, PACS_TEST_TARGET_DICOM
and PACS_TEST_TARGET_TOKEN set they run against that running archive instead (see tests/support/blackbox.py and
the README's Tests section), e.g. after a deployment::

    PACS_TEST_TARGET_URL=http://pacs:8000 PACS_TEST_TARGET_DICOM=PACS@pacs:11112 PACS_TEST_TARGET_TOKEN=... \\
        .venv/bin/pytest tests/test_blackbox.py

Each run sends a new patient's study (fresh UIDs) and only reads what it sent.
"""

from __future__ import annotations

import io
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bench.generate_ct import write_ct_series
from tests.support.blackbox import DEFAULT_CALLING_AE, Target, target_from_environment
from tests.support.dcmtk import StoreResult, dcmtk, dcmtk_env, echoscu, storescu
from tests.support.inprocess import register_ae
from tests.support.net import free_port
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

SLICES = 3


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    configured = target_from_environment()
    if configured is not None:
        yield configured
        return
    move_port = free_port()
    with EmbeddedPacs(tmp_path_factory.mktemp("blackbox")) as pacs:
        register_ae(pacs.ctx, DEFAULT_CALLING_AE, "127.0.0.1", move_port, archive_wide=True)
        yield Target(http_url=pacs.http_url, host="127.0.0.1", port=pacs.port, ae_title="PACS",
                     token=pacs.token("admin"), calling_ae=DEFAULT_CALLING_AE, move_port=move_port)


@dataclass(frozen=True)
class SentStudy:
    patient_id: str
    study: str
    series: str
    files: dict[str, Path]  # SOP Instance UID -> the file sent
    store: StoreResult


@pytest.fixture(scope="module")
def sent(target: Target, tmp_path_factory: pytest.TempPathFactory) -> SentStudy:
    """A new patient's CT series (3 slices), sent with storescu from our registered AE title."""
    patient_id = f"BBX-{uuid.uuid4().hex[:10].upper()}"
    paths = write_ct_series(tmp_path_factory.mktemp("blackbox-ct"), slices=SLICES, size=32, patient_id=patient_id,
                            patient_name="BLACKBOX^TEST", accession_number=patient_id[-12:])
    files = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    result = storescu(target.port, paths, "-xe", aec=target.ae_title, aet=target.calling_ae, host=target.host)
    return SentStudy(patient_id, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), files, result)


def _dicomweb(target: Target) -> DICOMwebClient:
    return DICOMwebClient(url=target.dicomweb_url, headers={"Authorization": f"Bearer {target.token}"})


def _scu(target: Target, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk(tool), "-aet", target.calling_ae, "-aec", target.ae_title, *args, target.host, str(target.port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=120, cwd=cwd)


def _keys(**keys: str) -> list[str]:
    return [arg for key, value in keys.items() for arg in ("-k", f"{key}={value}")]


def _pixels(path: Path) -> bytes:
    return bytes(pydicom.dcmread(path).PixelData)


# -- DIMSE ------------------------------------------------------------------------------------------


def test_c_echo(target: Target) -> None:
    result = echoscu(target.port, aec=target.ae_title, aet=target.calling_ae, host=target.host)
    assert result.returncode == 0, result.stdout + result.stderr


def test_c_store_of_a_series(sent: SentStudy) -> None:
    assert sent.store.returncode == 0 and sent.store.status == 0, sent.store.output[-2000:]
    assert sent.store.output.count("Received Store Response") == SLICES


def test_c_find_at_study_and_image_level(target: Target, sent: SentStudy, tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    (tmp_path / "image").mkdir()
    study = _scu(target, "findscu", "-S", "-X", "-od", str(tmp_path / "study"),
                 *_keys(QueryRetrieveLevel="STUDY", PatientID=sent.patient_id, StudyInstanceUID="",
                        NumberOfStudyRelatedInstances="", ModalitiesInStudy=""))
    assert study.returncode == 0, study.stdout + study.stderr
    answers = [pydicom.dcmread(p) for p in sorted((tmp_path / "study").iterdir())]
    assert [(a.StudyInstanceUID, int(a.NumberOfStudyRelatedInstances), a.ModalitiesInStudy) for a in answers] == \
        [(sent.study, SLICES, "CT")]

    images = _scu(target, "findscu", "-S", "-X", "-od", str(tmp_path / "image"),
                  *_keys(QueryRetrieveLevel="IMAGE", StudyInstanceUID=sent.study, SeriesInstanceUID=sent.series,
                         SOPInstanceUID=""))
    assert images.returncode == 0, images.stdout + images.stderr
    found = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "image").iterdir()}
    assert found == set(sent.files)


def _received(folder: Path) -> dict[str, bytes]:
    return {str((ds := pydicom.dcmread(p)).SOPInstanceUID): bytes(ds.PixelData) for p in folder.iterdir()}


def test_c_get_returns_every_instance(target: Target, sent: SentStudy, tmp_path: Path) -> None:
    result = _scu(target, "getscu", "-S", "-od", str(tmp_path), *_keys(QueryRetrieveLevel="STUDY",
                                                                        StudyInstanceUID=sent.study))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _received(tmp_path) == {sop: _pixels(p) for sop, p in sent.files.items()}


def test_c_move_to_our_own_listener(target: Target, sent: SentStudy, tmp_path: Path) -> None:
    """The target opens an association back to our AE title's registered address (movescu listens there)."""
    result = _scu(target, "movescu", "-S", "-aem", target.calling_ae, "+P", str(target.move_port),
                  "-od", str(tmp_path), *_keys(QueryRetrieveLevel="SERIES", StudyInstanceUID=sent.study,
                                               SeriesInstanceUID=sent.series))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _received(tmp_path) == {sop: _pixels(p) for sop, p in sent.files.items()}


# -- DICOMweb ---------------------------------------------------------------------------------------


def test_qido_finds_the_study_its_series_and_instances(target: Target, sent: SentStudy) -> None:
    client = _dicomweb(target)
    studies = client.search_for_studies(search_filters={"PatientID": sent.patient_id})
    assert [s["0020000D"]["Value"][0] for s in studies] == [sent.study]
    series = client.search_for_series(sent.study)
    assert [(s["0020000E"]["Value"][0], s["00080060"]["Value"][0]) for s in series] == [(sent.series, "CT")]
    instances = client.search_for_instances(sent.study, sent.series)
    assert {i["00080018"]["Value"][0] for i in instances} == set(sent.files)


def test_wado_metadata_names_every_instance_with_pixel_data_as_bulk_data(target: Target, sent: SentStudy) -> None:
    metadata = _dicomweb(target).retrieve_series_metadata(sent.study, sent.series)
    assert {m["00080018"]["Value"][0] for m in metadata} == set(sent.files)
    assert all("BulkDataURI" in m["7FE00010"] and m["00100020"]["Value"] == [sent.patient_id] for m in metadata)


def test_wado_frames_are_the_pixels_sent(target: Target, sent: SentStudy) -> None:
    sop, path = next(iter(sent.files.items()))
    [frame] = _dicomweb(target).retrieve_instance_frames(sent.study, sent.series, sop, frame_numbers=[1])
    assert frame == _pixels(path)


def test_wado_rendered_is_a_jpeg_of_the_image(target: Target, sent: SentStudy) -> None:
    from PIL import Image

    sop = next(iter(sent.files))
    rendered = _dicomweb(target).retrieve_instance_rendered(sent.study, sent.series, sop, media_types=("image/jpeg",))
    image = Image.open(io.BytesIO(rendered))
    assert image.format == "JPEG" and image.size == (32, 32)


def test_wado_instance_comes_back_as_stored(target: Target, sent: SentStudy) -> None:
    sop, path = next(iter(sent.files.items()))
    instance = _dicomweb(target).retrieve_instance(sent.study, sent.series, sop)
    assert str(instance.SOPInstanceUID) == sop and bytes(instance.PixelData) == _pixels(path)


def test_stow_then_qido(target: Target, sent: SentStudy) -> None:
    """A new instance in the same study over STOW-RS; QIDO-RS finds it next to the C-STOREd ones."""
    ds = pydicom.dcmread(next(iter(sent.files.values())))
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = generate_uid(), generate_uid(), 2
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = (np.arange(32 * 32, dtype=np.uint16) % 4096).tobytes()
    client = _dicomweb(target)
    response: Dataset = client.store_instances([ds], study_instance_uid=sent.study)
    assert "FailedSOPSequence" not in response, response
    found = client.search_for_instances(sent.study, ds.SeriesInstanceUID)
    assert [i["00080018"]["Value"][0] for i in found] == [ds.SOPInstanceUID]


def test_http_without_a_token_is_refused(target: Target, sent: SentStudy) -> None:
    response = httpx.get(f"{target.dicomweb_url}/studies", params={"PatientID": sent.patient_id}, timeout=30)
    assert response.status_code == 401

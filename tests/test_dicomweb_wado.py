"""WADO-RS and WADO-URI end to end (issue 6), in the embedded mode and the scaled configuration (`pacs api` +
`pacs scp` + `pacs worker` on PostgreSQL, S3 and Redis), with dicomweb-client as the client where it can say it.

Besides tests.support.dicomweb_world (studies of PAT-A at HOSP-A, PAT-B at HOSP-B), this module stores
pydicom's compressed corpus objects (JPEG 2000, JPEG-LS, RLE; new UIDs, pixel data untouched) for patient
PAT-C at HOSP-A, and a CT series sent by DCMTK's storescu for patient PAT-W.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, update

from bench.generate_ct import write_ct_series
from pacs.db.models import AuditEvent, DerivedTask, Instance, Series
from pacs.dicomweb import metadata
from storage.keys import instance_metadata_key, series_metadata_key
from tests.support.datasets import dataset_bytes
from tests.support.dcmtk import storescu
from tests.support.dicomweb_world import World, audit_count, shared_world, stored_bytes, wait_derived_work
from tests.support.senders import send_file_raw
from tests.support.stack import ScaledStack
from viewer_api.security import COALESCED_READS

pytestmark = pytest.mark.integration

OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
LOSSLESS = {"jp2k": "MR_small_jp2klossless.dcm", "jpegls": "MR_small_jpeg_ls_lossless.dcm", "rle": "MR_small_RLE.dcm"}


@dataclass
class Compressed:
    name: str
    path: Path  # the file as sent (new UIDs, pixel data as in the corpus)
    study: str
    series: str
    sop: str
    syntax: str


@dataclass
class Extra:
    compressed: dict[str, Compressed]  # jp2k, jpegls, rle, cine (15-frame RLE)
    storescu_files: list[Path]


@pytest.fixture(scope="module", params=["embedded", "scaled"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    return shared_world(request, tmp_path_factory)


@pytest.fixture(scope="module")
def extra(world: World, tmp_path_factory: pytest.TempPathFactory) -> Extra:
    root = tmp_path_factory.mktemp("wado-data")
    study = generate_uid()
    compressed: dict[str, Compressed] = {}
    for name, corpus in [*LOSSLESS.items(), ("cine", "rtdose_rle.dcm")]:
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(corpus))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "PAT-C", "CHARLIE^CHAU"
        path = root / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)  # encapsulated pixel data written back as it was
        result = send_file_raw(world.server.port, path, aet="MODA")
        assert result.status == 0, result
        compressed[name] = Compressed(name, path, study, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                      str(ds.file_meta.TransferSyntaxUID))
    files = write_ct_series(root / "ct", slices=3, size=32, patient_name="WHISKEY^WU", patient_id="PAT-W")
    sent = storescu(world.server.port, files, "-xe", aet="STORESCU")
    assert sent.status == 0 and sent.returncode == 0, sent.output[-1500:]
    return Extra(compressed, files)


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response, parsed independently of any client."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n"), "multipart body not closed"
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        out.append((headers["Content-Type"], data[:-2] if data.endswith(b"\r\n") else data))
    return out


def _expected_metadata(world: World, study: str, series: str, sop: str) -> dict:
    document = json.loads(metadata.instance_metadata(io.BytesIO(stored_bytes(world.server, sop)), study, series, sop))
    base = f"{world.server.http_url}/dicom-web/"
    for element in document.values():
        if "BulkDataURI" in element:
            element["BulkDataURI"] = base + element["BulkDataURI"]
    return document


# -- retrieve -------------------------------------------------------------------------------------------------


def test_retrieve_study_series_and_instance_equal_what_was_stored(world: World) -> None:
    client, a1 = world.client(), world.a1
    study = client.retrieve_study(a1.study)
    assert {ds.SOPInstanceUID for ds in study} == set(a1.all_sops)
    for ds in study:
        sent = a1.datasets[ds.SOPInstanceUID]
        for element in sent:
            assert ds[element.tag].value == element.value, (ds.SOPInstanceUID, element.keyword)
    series = client.retrieve_series(a1.study, a1.series[0])
    assert {ds.SOPInstanceUID for ds in series} == set(a1.sops[a1.series[0]])
    sop = a1.sops[a1.series[1]][0]
    one = client.retrieve_instance(a1.study, a1.series[1], sop)
    assert one.SOPInstanceUID == sop and one.PixelData == a1.datasets[sop].PixelData
    with world.http() as http:  # byte for byte: each part is the stored object
        response = http.get(f"/dicom-web/studies/{a1.study}", headers={"Accept": 'multipart/related; '
                                                                       'type="application/dicom"; transfer-syntax=*'})
        assert response.status_code == 200
        parts = _parts(response)
        assert len(parts) == 3
        for content_type, body in parts:
            uid = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID
            assert body == stored_bytes(world.server, uid)
            assert content_type == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"


def test_storescu_study_is_found_by_qido_and_retrieved_by_wado(world: World, extra: Extra) -> None:
    first = pydicom.dcmread(extra.storescu_files[0], stop_before_pixels=True)
    client = world.client()
    found = client.search_for_studies(search_filters={"PatientID": "PAT-W"})
    assert [r["0020000D"]["Value"][0] for r in found] == [first.StudyInstanceUID]
    assert found[0]["00201208"]["Value"] == [3]
    retrieved = client.retrieve_study(first.StudyInstanceUID)
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in extra.storescu_files}
    assert {ds.SOPInstanceUID for ds in retrieved} == set(sent)
    with world.http() as http:
        response = http.get(f"/dicom-web/studies/{first.StudyInstanceUID}",
                            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    for _, body in _parts(response):
        uid = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(body) == dataset_bytes(sent[uid].read_bytes())  # the dataset storescu put on the wire


# -- metadata -------------------------------------------------------------------------------------------------


def test_metadata_of_study_series_and_instance(world: World) -> None:
    wait_derived_work(world.server)  # the series documents are built: they are what /metadata serves
    a1 = world.a1
    series_uid = a1.series[0]
    with world.http() as http:
        series = http.get(f"/dicom-web/studies/{a1.study}/series/{series_uid}/metadata")
        assert series.status_code == 200 and series.headers["content-type"].startswith("application/dicom+json")
        expected = [_expected_metadata(world, a1.study, series_uid, sop) for sop in a1.sops[series_uid]]
        assert series.json() == expected  # ordered by Instance Number, bulk data URIs absolute
        study = http.get(f"/dicom-web/studies/{a1.study}/metadata").json()
        assert [d["00080018"]["Value"][0] for d in study] == a1.all_sops
        sop = a1.sops[series_uid][1]
        instance = http.get(f"/dicom-web/studies/{a1.study}/series/{series_uid}/instances/{sop}/metadata").json()
        assert instance == [expected[1]]
        pixel_uri = instance[0]["7FE00010"]["BulkDataURI"]
        assert pixel_uri == f"{world.server.http_url}/dicom-web/studies/{a1.study}/series/{series_uid}/instances/" \
                            f"{sop}/bulkdata/7FE00010"
        bad = http.get(f"/dicom-web/studies/{a1.study}/metadata", headers={"Accept": "application/dicom+xml"})
        assert bad.status_code == 406
    client = world.client()
    assert [d["00080018"]["Value"][0] for d in client.retrieve_series_metadata(a1.study, series_uid)] \
        == a1.sops[series_uid]
    assert client.retrieve_instance_metadata(a1.study, series_uid, sop)["00100010"]["Value"] == \
        [{"Alphabetic": "Nguyễn^Văn An"}]
    assert len(client.retrieve_study_metadata(a1.study)) == 3
    assert client.retrieve_bulkdata(pixel_uri) == [a1.datasets[sop].PixelData]  # the URI the metadata gives


def test_metadata_is_complete_while_the_workers_are_behind(world: World, tmp_path: Path) -> None:
    """Scaled: the worker is stopped while a series arrives. Embedded (its workers run in-process): the
    series document is gone and the fragments are gone or cut short. Either way /metadata is whole."""
    server = world.server
    files = write_ct_series(tmp_path / "ct", slices=3, size=16, patient_name="DELTA^DUNG", patient_id="PAT-D")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID
    sops = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    scaled = isinstance(server, ScaledStack)
    if scaled:
        server.stop_worker()
    try:
        assert storescu(server.port, files, "-xe", aet="MODA").status == 0
        if not scaled:
            wait_derived_work(server)
            with server.ctx.sessions() as session, session.begin():
                session.execute(update(Series).where(Series.series_instance_uid == series_uid)
                                .values(metadata_key=None))
            server.ctx.store.delete(series_metadata_key(study, series_uid))
            # fragments are not forced to disk: after a power cut one may be gone, empty or holed with zeros
            keys = [instance_metadata_key(study, series_uid, sop) for sop in sops]
            holed = bytearray(server.ctx.store.get_bytes(keys[2]))
            holed[len(holed) // 3:len(holed) // 2] = bytes(len(holed) // 2 - len(holed) // 3)
            server.ctx.store.delete(keys[0])
            server.ctx.store.put(keys[1], b"", durable=False)
            server.ctx.store.put(keys[2], bytes(holed), durable=False)
        else:
            with server.ctx.read_sessions() as session:
                states = set(session.scalars(select(DerivedTask.state).where(DerivedTask.subject_uid == series_uid)))
            assert "done" not in states  # the document really is not built
        expected = [_expected_metadata(world, study, series_uid, sop) for sop in sops]
        with world.http() as http:
            response = http.get(f"/dicom-web/studies/{study}/series/{series_uid}/metadata")
            assert response.status_code == 200 and response.json() == expected
            assert http.get(f"/dicom-web/studies/{study}/metadata").json() == expected
    finally:
        if scaled:
            server.start_worker()
    if scaled:  # and once the worker has caught up, the same answer comes from its document
        wait_derived_work(server, timeout=120)
        with world.http() as http:
            assert http.get(f"/dicom-web/studies/{study}/series/{series_uid}/metadata").json() == expected


# -- frames and bulk data -------------------------------------------------------------------------------------


def test_frames_uncompressed_by_default_and_as_stored_on_request(world: World, extra: Extra) -> None:
    a1, client = world.a1, world.client()
    sop = a1.sops[a1.series[0]][0]
    assert client.retrieve_instance_frames(a1.study, a1.series[0], sop, [1]) == [a1.datasets[sop].PixelData]

    cine = extra.compressed["cine"]
    original = pydicom.dcmread(cine.path)
    decoded = original.pixel_array  # (15, rows, columns)
    url = f"/dicom-web/studies/{cine.study}/series/{cine.series}/instances/{cine.sop}/frames/1,3,15"
    with world.http() as http:
        default = http.get(url)
        assert default.status_code == 200
        assert [body for _, body in _parts(default)] == [decoded[i].tobytes() for i in (0, 2, 14)]
        uncompressed = f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
        assert {ct for ct, _ in _parts(default)} == {uncompressed}
        stored = http.get(url, headers={"Accept": OHIF_FRAMES})  # what OHIF asks for
        assert stored.status_code == 200
        frames = [get_frame(original.PixelData, i, number_of_frames=15) for i in (0, 2, 14)]
        assert [body for _, body in _parts(stored)] == frames
        assert {ct for ct, _ in _parts(stored)} == {f"application/octet-stream; transfer-syntax={cine.syntax}"}
        unknown = http.get(url.replace(cine.sop, "1.2.3.4"))  # no such instance in the series
        assert unknown.status_code == 404
        refused = http.get(url, headers={"Accept": 'multipart/related; type="image/jp2"'})
        assert refused.status_code == 406 and refused.json()["code"] == "not_acceptable"
        for frames_text, status in (("99", 404), ("0", 400), ("1,a", 400)):
            response = http.get(url.replace("1,3,15", frames_text))
            assert response.status_code == status and response.headers["content-type"] == "application/json"
        bulk = http.get(f"/dicom-web/studies/{cine.study}/series/{cine.series}/instances/{cine.sop}/bulkdata/zz")
        assert bulk.status_code == 400

    jp2k = extra.compressed["jp2k"]
    as_jp2 = client.retrieve_instance_frames(jp2k.study, jp2k.series, jp2k.sop, [1], media_types=("image/jp2",))
    assert as_jp2 == [get_frame(pydicom.dcmread(jp2k.path).PixelData, 0)]
    assert bytes(as_jp2[0][:4]) == b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream, untouched


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_compressed_objects_decode_to_the_same_pixels_or_come_as_stored(world: World, extra: Extra,
                                                                         name: str) -> None:
    item = extra.compressed[name]
    reference = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm")).pixel_array  # lossless source
    client = world.client()
    for media_types in ((("application/dicom", str(ExplicitVRLittleEndian)),), ("application/dicom",)):
        ds = client.retrieve_instance(item.study, item.series, item.sop, media_types=media_types)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, reference)
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(item.path).pixel_array)
        assert ds.SOPInstanceUID == item.sop and ds.PatientID == "PAT-C"
    as_stored = client.retrieve_instance(item.study, item.series, item.sop, media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == item.syntax
    with world.http() as http:
        url = f"/dicom-web/studies/{item.study}/series/{item.series}/instances/{item.sop}"
        raw = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        (content_type, body), = _parts(raw)
        assert body == stored_bytes(world.server, item.sop)  # byte-identical to the stored object
        assert dataset_bytes(body) == dataset_bytes(item.path.read_bytes())  # which is what was sent
        assert content_type == f"application/dicom; transfer-syntax={item.syntax}"
        plain = http.get(url)  # no Accept: PS3.18's default, Explicit VR Little Endian
        (content_type, body), = _parts(plain)
        assert content_type.endswith(str(ExplicitVRLittleEndian))
        assert np.array_equal(pydicom.dcmread(io.BytesIO(body)).pixel_array, reference)
        jpeg = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                'transfer-syntax=1.2.840.10008.1.2.4.50'})
        assert jpeg.status_code == 406 and "1.2.840.10008.1.2.4.50" in jpeg.json()["message"]


# -- rendered and thumbnails ----------------------------------------------------------------------------------


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_rendered_frames_and_thumbnails(world: World, extra: Extra) -> None:
    wait_derived_work(world.server)
    a1, client = world.a1, world.client()
    series, sop = a1.series[0], a1.sops[a1.series[0]][0]
    jpeg = client.retrieve_instance_rendered(a1.study, series, sop, media_types=("image/jpeg",))
    assert _image(jpeg).format == "JPEG" and _image(jpeg).size == (16, 16)
    big = client.retrieve_instance_rendered(a1.study, series, sop, media_types=("image/png",),
                                            params={"viewport": "64,64"})
    assert _image(big).format == "PNG" and _image(big).size == (64, 64)
    narrow = np.asarray(_image(client.retrieve_instance_rendered(
        a1.study, series, sop, media_types=("image/png",), params={"window": "300,1,linear"})))
    wide = np.asarray(_image(client.retrieve_instance_rendered(
        a1.study, series, sop, media_types=("image/png",), params={"window": "300,4000"})))
    assert not np.array_equal(narrow, wide) and set(np.unique(narrow)) <= {0, 255}  # a 1-wide window is binary
    cine = extra.compressed["cine"]
    frame = client.retrieve_instance_frames_rendered(cine.study, cine.series, cine.sop, [2],
                                                     media_types=("image/jpeg",))
    assert _image(frame).format == "JPEG"
    assert _image(client.retrieve_series_rendered(a1.study, series, media_types=("image/jpeg",))).format == "JPEG"

    base = f"/dicom-web/studies/{a1.study}"
    with world.http() as http:
        for path in (f"{base}/thumbnail", f"{base}/series/{series}/thumbnail",
                     f"{base}/series/{series}/instances/{sop}/thumbnail",
                     f"{base}/series/{series}/instances/{sop}/frames/1/thumbnail"):
            response = http.get(path)
            assert response.status_code == 200 and _image(response.content).format == "JPEG", path
        with world.server.ctx.read_sessions() as session:
            key = session.scalar(select(Series.thumbnail_key).where(Series.series_instance_uid == series))
            own = session.scalar(select(Instance.thumbnail_key).where(Instance.sop_instance_uid == sop))
        stored = http.get(f"{base}/series/{series}/thumbnail").content
        assert key and stored == world.server.ctx.store.get_bytes(key)  # the series task's thumbnail, as stored
        made = _image(http.get(f"{base}/series/{series}/instances/{sop}/thumbnail").content)
        # an instance's own thumbnail is not made at ingest (one per series is): rendered when asked for
        assert own is None and made.format == "JPEG" and max(made.size) <= world.server.ctx.settings.thumbnail_size
        small = http.get(f"{base}/series/{series}/thumbnail", params={"viewport": "8,8", "accept": "image/png"})
        assert _image(small.content).format == "PNG" and max(_image(small.content).size) <= 8
        for params, headers, status in (({"window": "abc"}, {}, 400), ({"viewport": "0,0"}, {}, 400),
                                        ({"quality": "101"}, {}, 400), ({"window": "1,2,cubic"}, {}, 400),
                                        ({}, {"Accept": "image/gif"}, 406)):
            response = http.get(f"{base}/series/{series}/instances/{sop}/rendered", params=params, headers=headers)
            assert response.status_code == status and response.headers["content-type"] == "application/json", params


# -- WADO-URI -------------------------------------------------------------------------------------------------


def test_wado_uri(world: World, extra: Extra) -> None:
    item = extra.compressed["jp2k"]
    uids = {"requestType": "WADO", "studyUID": item.study, "seriesUID": item.series, "objectUID": item.sop}
    with world.http() as http:
        stored = http.get("/wado", params={**uids, "contentType": "application/dicom", "transferSyntax": "*"})
        assert stored.status_code == 200 and stored.headers["content-type"] == "application/dicom"
        assert stored.content == stored_bytes(world.server, item.sop)
        plain = http.get("/wado", params={**uids, "contentType": "application/dicom"})
        assert pydicom.dcmread(io.BytesIO(plain.content)).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        image = http.get("/wado", params={**uids, "rows": "8", "columns": "8", "windowCenter": "500",
                                          "windowWidth": "1000"})
        assert image.status_code == 200 and _image(image.content).format == "JPEG"
        assert max(_image(image.content).size) == 8
        png = http.get("/wado", params={**uids, "contentType": "image/png", "frameNumber": "1"})
        assert _image(png.content).format == "PNG"
        for params, status, says in (({**uids, "windowCenter": "1"}, 400, "windowWidth"),
                                     ({**uids, "anonymize": "yes"}, 400, "anonymize"),
                                     ({k: v for k, v in uids.items() if k != "objectUID"}, 400, "objectUID"),
                                     ({**uids, "requestType": "XYZ"}, 400, "requestType"),
                                     ({**uids, "contentType": "text/html"}, 406, "contentType"),
                                     ({**uids, "frameNumber": "2"}, 404, "frame 2")):
            response = http.get("/wado", params=params)
            assert response.status_code == status and says in response.json()["message"], (params, response.text)
    with world.http(world.facility_b) as http:
        assert http.get("/wado", params={**uids, "contentType": "application/dicom"}).status_code == 404


# -- scope, path consistency, audit ---------------------------------------------------------------------------


def _wado_paths(study: str, series: str, sop: str) -> list[str]:
    base = f"/dicom-web/studies/{study}"
    instance = f"{base}/series/{series}/instances/{sop}"
    return [base, f"{base}/series/{series}", instance, f"{base}/metadata", f"{base}/series/{series}/metadata",
            f"{instance}/metadata", f"{instance}/frames/1", f"{instance}/bulkdata/7FE00010", f"{base}/rendered",
            f"{base}/series/{series}/rendered", f"{instance}/rendered", f"{instance}/frames/1/rendered",
            f"{base}/thumbnail", f"{base}/series/{series}/thumbnail", f"{instance}/thumbnail"]


def test_other_facility_and_other_patient_get_404_with_the_right_uids(world: World) -> None:
    a1, b1 = world.a1, world.b1
    a_paths = _wado_paths(a1.study, a1.series[0], a1.sops[a1.series[0]][0])
    for token in (world.facility_b, world.patient_a):
        hidden = a1 if token == world.facility_b else b1
        paths = a_paths if hidden is a1 else _wado_paths(b1.study, b1.series[0], b1.sops[b1.series[0]][0])
        with world.http(token) as http:
            for path in paths:
                response = http.get(path)
                assert response.status_code == 404, (path, response.status_code, response.text[:200])
                assert response.json()["code"] == "not_found"
                assert hidden.patient_id not in response.text and hidden.study not in response.text
    with world.http(world.facility_b) as http:  # the same routes do serve what is in scope
        for path in _wado_paths(b1.study, b1.series[0], b1.sops[b1.series[0]][0]):
            assert http.get(path).status_code == 200, path
    with world.http(world.patient_a) as http:
        assert http.get(f"/dicom-web/studies/{a1.study}/metadata").status_code == 200
    with world.http(world.patient_a_no_images) as http:
        assert http.get(f"/dicom-web/studies/{a1.study}").status_code == 403


def test_path_uids_must_belong_together(world: World) -> None:
    a1, b1 = world.a1, world.b1
    other_series_sop = a1.sops[a1.series[1]][0]
    with world.http() as http:
        for path in (f"/dicom-web/studies/{a1.study}/series/{b1.series[0]}",
                     f"/dicom-web/studies/{a1.study}/series/{b1.series[0]}/metadata",
                     f"/dicom-web/studies/{a1.study}/series/{a1.series[0]}/instances/{other_series_sop}",
                     f"/dicom-web/studies/{a1.study}/series/{a1.series[0]}/instances/{other_series_sop}/frames/1",
                     f"/dicom-web/studies/{b1.study}/series/{a1.series[1]}/instances/{other_series_sop}/rendered",
                     "/dicom-web/studies/1.2.3.4.5.6.7.8.9"):
            response = http.get(path)
            assert response.status_code == 404 and response.json()["code"] == "not_found", path
        invalid = http.get("/dicom-web/studies/1.2.3.x/metadata")
        assert invalid.status_code == 400 and "invalid StudyInstanceUID" in invalid.json()["message"]


def test_each_request_is_audited_once_with_study_and_patient(world: World, extra: Extra) -> None:
    a1 = world.a1
    series, sop = a1.series[0], a1.sops[a1.series[0]][0]
    instance = f"/dicom-web/studies/{a1.study}/series/{series}/instances/{sop}"
    cases = [("dicomweb.retrieve", f"/dicom-web/studies/{a1.study}", {}),
             ("dicomweb.metadata", f"{instance}/metadata", {}),
             ("dicomweb.frames", f"{instance}/frames/1", {}),
             ("dicomweb.bulkdata", f"{instance}/bulkdata/7FE00010", {}),
             ("dicomweb.rendered", f"{instance}/rendered", {}),
             ("dicomweb.thumbnail", f"{instance}/thumbnail", {}),
             ("wado-uri.retrieve", "/wado", {"requestType": "WADO", "studyUID": a1.study, "seriesUID": series,
                                             "objectUID": sop})]
    # A credential of its own: a viewer's repeated frame/rendered/thumbnail/bulk data reads of a study are
    # coalesced per credential (viewer_api.security.COALESCED_READS), so the first of each is the one audited.
    fresh = world.server.token("radiologist", name=f"audit-once-{uuid.uuid4().hex[:8]}")
    with world.http(fresh) as http:
        for action, path, params in cases:
            before = audit_count(world.server, action, a1.study)
            assert http.get(path, params=params).status_code == 200, path
            assert audit_count(world.server, action, a1.study) == before + 1, action
            if action in COALESCED_READS:  # the same read again within the window: covered by that row
                assert http.get(path, params=params).status_code == 200, path
                assert audit_count(world.server, action, a1.study) == before + 1, action
            with world.server.ctx.read_sessions() as session:
                row = session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                      .order_by(AuditEvent.id.desc()).limit(1)).one()
            assert (row.patient_id, row.study_instance_uid, row.outcome) == ("PAT-A", a1.study, "success")
    with world.http(world.facility_b) as http:  # refusals are audited too, without naming the patient
        before = audit_count(world.server, "dicomweb.retrieve", a1.study)
        assert http.get(f"/dicom-web/studies/{a1.study}").status_code == 404
        assert audit_count(world.server, "dicomweb.retrieve", a1.study) == before + 1
        with world.server.ctx.read_sessions() as session:
            row = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicomweb.retrieve")
                                  .order_by(AuditEvent.id.desc()).limit(1)).one()
        assert row.outcome == "failure" and row.patient_id == ""


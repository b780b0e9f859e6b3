"""The read path's shortcuts (issue 13) give the same answers as the long way, and never more than the asker may see:

- a search's first rows and their total from one statement (``QueryResult.head``) agree with the rows and
  ``count()`` of the same query, whatever the limit and offset;
- the grayscale pipeline as a lookup table over the stored values gives exactly the levels of the pixel-by-pixel
  pipeline;
- the cache of rendered images is bounded and least-recently-used;
- over HTTP: a small QIDO-RS answer is one body with its total, a paged one still counts every match, each
  search is audited once; a rendered image and a single frame carry an ETag and are ``304`` when the client holds
  them; a cached rendered image is served only after the asker's scope is checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs.db import migrate
from pacs.db.engine import make_engine, make_read_session_factory, make_session_factory
from pacs.imaging import render
from pacs.imaging.cache import RenderedCache
from pacs.ingest import Ingestor, IngestSource
from pacs.query.engine import Query, QueryEngine
from storage import open_store
from tests.support.datasets import to_bytes
from tests.support.dicomweb_world import World, audit_count, shared_world
from tests.support.query_archive import archive_datasets

# -- QueryResult.head --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryEngine]:
    tmp = tmp_path_factory.mktemp("read-path-index")
    db = make_engine(f"sqlite:///{tmp / 'index.sqlite3'}")
    try:
        migrate.upgrade(db)
        ingestor = Ingestor(make_session_factory(db), open_store(f"file://{tmp / 'objects'}"))
        for ds in archive_datasets():
            assert ingestor.ingest(to_bytes(ds), IngestSource("import")).ok
        yield QueryEngine(make_read_session_factory(db), batch_size=2)
    finally:
        db.dispose()


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
@pytest.mark.parametrize("limit", [None, 0, 1, 2, 3, 50])
@pytest.mark.parametrize("offset", [0, 1, 2, 40])
@pytest.mark.parametrize("size", [1, 2, 200])
def test_head_agrees_with_the_rows_and_the_count(engine: QueryEngine, level: str, limit: int | None, offset: int,
                                                 size: int) -> None:
    result = engine.search(Query(level, filters={}, limit=limit, offset=offset, relational=True))
    rows, total = list(result), result.count()
    head = result.head(size)
    assert head.rows == rows[:size]
    assert head.complete == (len(rows) <= size)
    if head.total is not None:  # when it says, it is right
        assert head.total == total
    fetched = size + 1 if limit is None else min(limit, size + 1)
    ended = len(rows) < fetched and (bool(rows) or offset == 0)  # the last match was read, and is not before offset
    assert (head.total is not None) == ended


# -- the grayscale lookup table ------------------------------------------------------------------------------


def _per_pixel(arr: np.ndarray, attrs: Dataset, window: tuple[float, float] | None, inverse: bool) -> np.ndarray:
    values = render._modality_values(arr, attrs)  # the pipeline the table stands in for
    return render._levels(render._voi(values, attrs, window), inverse=inverse)


@pytest.mark.parametrize(("dtype", "low", "high"), [(np.uint16, 0, 4095), (np.int16, -1024, 3071), (np.uint8, 0, 255),
                                                    (np.int32, -5000, 20000), (np.uint16, 100, 100)])
@pytest.mark.parametrize("rescale", [None, (1.0, -1024.0), (0.5, 3.0), (-1.0, 0.0), (2.5e-3, 1.0)])
@pytest.mark.parametrize("window", [None, (40.0, 400.0), (0.3, 0.5)])
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_the_lookup_table_gives_the_per_pixel_levels(dtype: type, low: int, high: int,
                                                     rescale: tuple[float, float] | None,
                                                     window: tuple[float, float] | None, function: str) -> None:
    rng = np.random.default_rng(abs(hash((low, high, rescale, window, function))) % 2**32)
    arr = rng.integers(low, high + 1, size=(256, 256), dtype=np.int64).astype(dtype)
    arr[:3] = low  # outliers at one end: the automatic window ignores them
    for own_window in (None, (300.0, 1500.0)):
        attrs = Dataset()
        attrs.VOILUTFunction = function
        if rescale is not None:
            attrs.RescaleSlope, attrs.RescaleIntercept = rescale
        if own_window is not None:
            attrs.WindowCenter, attrs.WindowWidth = own_window
        for inverse in (False, True):
            table = render._display_table(arr, attrs, window, inverse=inverse)
            assert table is not None, "a 12-16 bit frame goes through the table"
            got = render._grey_to_display(arr, attrs, window, inverse=inverse)
            np.testing.assert_array_equal(got, _per_pixel(arr, attrs, window, inverse))


def test_the_table_is_left_out_where_it_would_not_be_exact_or_smaller() -> None:
    wide = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # more distinct values than half the pixels
    assert render._display_table(wide, Dataset(), None, inverse=False) is None
    floats = np.zeros((64, 64), dtype=np.float32)
    assert render._display_table(floats, Dataset(), None, inverse=False) is None
    lut = Dataset()
    lut.ModalityLUTSequence = [Dataset()]
    small = np.zeros((64, 64), dtype=np.uint16)
    assert render._display_table(small, lut, None, inverse=False) is None


# -- the cache of rendered images -----------------------------------------------------------------------------


def test_the_rendered_cache_is_bounded_and_least_recently_used() -> None:
    cache = RenderedCache(max_bytes=10, max_item_bytes=6)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # "a" is now the most recently used
    cache.put("c", b"cccc")  # 12 bytes: the least recently used ("b") goes
    assert (cache.get("b"), cache.get("a"), cache.get("c")) == (None, b"aaaa", b"cccc")
    cache.put("big", b"x" * 7)  # over the item bound: not kept, nothing evicted
    assert cache.get("big") is None and len(cache) == 2 and cache.size_bytes == 8
    cache.put("a", b"a")  # replacing counts the new size only
    assert cache.size_bytes == 5


# -- over HTTP ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["embedded"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    return shared_world(request, tmp_path_factory)  # the DICOMweb modules' shared world


@pytest.mark.integration
def test_searches_answer_with_their_total_and_are_audited_once(world: World) -> None:
    with world.http() as http:
        before = audit_count(world.server, "dicomweb.search")
        # identity: the Content-Length compared with the body as sent (viewer_api.compression gzips it otherwise)
        small = http.get("/dicom-web/studies", params={"PatientID": "PAT-A"}, headers={"Accept-Encoding": "identity"})
        assert small.status_code == 200 and small.headers["x-total-count"] == "2"
        assert small.headers["content-length"] == str(len(small.content)) and len(small.json()) == 2
        paged = http.get("/dicom-web/studies", params={"PatientID": "PAT-A", "limit": "1", "offset": "0"})
        assert paged.headers["x-total-count"] == "2" and len(paged.json()) == 1
        assert "1 additional results" in paged.headers["warning"]
        past = http.get("/dicom-web/studies", params={"PatientID": "PAT-A", "offset": "5"})
        assert past.headers["x-total-count"] == "2" and past.json() == []
        none = http.get("/dicom-web/studies", params={"PatientID": f"NOBODY-{uuid.uuid4().hex[:6]}"})
        assert none.headers["x-total-count"] == "0" and none.json() == []
        assert audit_count(world.server, "dicomweb.search") == before + 4


@pytest.mark.integration
def test_rendered_images_and_frames_revalidate_and_never_leave_the_scope(world: World) -> None:
    series = world.a1.series[0]
    sop = world.a1.sops[series][0]
    instance = f"/dicom-web/studies/{world.a1.study}/series/{series}/instances/{sop}"
    with world.http() as http:
        first = http.get(f"{instance}/rendered", headers={"Accept": "image/jpeg"})
        assert first.status_code == 200 and first.content.startswith(b"\xff\xd8")
        # never kept on a shared PC's disk; the tag is weak (a multipart boundary differs between answers)
        assert first.headers["cache-control"] == "no-store" and first.headers["etag"].startswith('W/"')
        again = http.get(f"{instance}/rendered", headers={"Accept": "image/jpeg"})  # from the cache
        assert (again.content, again.headers["etag"]) == (first.content, first.headers["etag"])
        held = http.get(f"{instance}/rendered", headers={"Accept": "image/jpeg",
                                                         "If-None-Match": first.headers["etag"]})
        assert held.status_code == 304 and held.content == b""
        other = http.get(f"{instance}/rendered", params={"window": "100,50"}, headers={"Accept": "image/jpeg"})
        assert other.headers["etag"] != first.headers["etag"] and other.content != first.content
        frame = http.get(f"{instance}/frames/1",
                         headers={"Accept": 'multipart/related; type="application/octet-stream"'})
        assert frame.status_code == 200 and frame.headers["content-length"] == str(len(frame.content))
        assert http.get(f"{instance}/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"',
                                                         "If-None-Match": frame.headers["etag"]}).status_code == 304
    with world.http(world.facility_b) as http:  # HOSP-B may not see A1, cached or not, tag or no tag
        assert http.get(f"{instance}/rendered", headers={"Accept": "image/jpeg"}).status_code == 404
        assert http.get(f"{instance}/rendered", headers={"Accept": "image/jpeg",
                                                         "If-None-Match": first.headers["etag"]}).status_code == 404


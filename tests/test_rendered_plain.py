"""``/rendered`` of a plain grayscale image is rendered from its header walk (pacs.dicomweb.native_frames and
pacs.dicomweb.rendering.plain_image) and its pixels decoded without pydicom's decoder (pacs.imaging.render's native
grayscale decode): both must give the picture the full path gives (pydicom's parse of the whole object, pydicom's
decoder), grey level for grey level, for every input either path takes, and leave every other input to the full path.

The inputs: pydicom's bundled test corpus, and generated CT-like objects (rescale slope and intercept, signed and
unsigned pixels, bits stored below bits allocated with the unused bits set, MONOCHROME1, 8 bits, windows stored and
not, VOI LUT functions, Implicit VR).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

import pacs.imaging.render as render_module
from pacs.dicomweb.native_frames import native_frames
from pacs.dicomweb.rendering import RenderParams, plain_image, render
from pacs.dicomweb.rendering import parse_rendered as render_params
from pacs.imaging import limits
from pacs.imaging.render import RenderError, RenderTooLarge, render_frame
from tests.support.datasets import make_dataset, to_bytes
from tests.support.dicomweb_world import World, audit_count, shared_world, stored_bytes

CORPUS = sorted(p for p in (Path(DATA_ROOT) / "test_files").rglob("*") if p.is_file())
WINDOWS: list[tuple[float, float] | None] = [None, (40.0, 400.0), (-600.0, 1500.0), (0.5, 0.8)]
PARAMS = [
    RenderParams(),
    RenderParams(window=(40.0, 400.0)),
    RenderParams(window=(40.0, 400.0), function="SIGMOID"),
    RenderParams(window=(100.0, 3.0), function="LINEAR_EXACT"),
    RenderParams(viewport=(37, 23)),
    RenderParams(viewport=(64, 64), region=(1.0, 2.0, 5.0, 7.0)),
    RenderParams(quality=40),
]


def _full(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


def _plain(data: bytes) -> Dataset | None:
    layout = native_frames(io.BytesIO(data))
    return plain_image(layout) if layout is not None else None


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _reference(ds: Dataset, window: tuple[float, float] | None, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The frame rendered the way it was before the native decode: every frame through pydicom's decoder."""
    with monkeypatch.context() as patch:
        patch.setattr(render_module, "_native_grey", lambda *args: None)
        return _pixels(render_frame(ds, 0, window))


def _outcome(ds: Dataset, window: tuple[float, float] | None) -> np.ndarray | str:
    try:
        return _pixels(render_frame(ds, 0, window))
    except RenderError as exc:
        return f"{type(exc).__name__}: {exc}"


# -- generated CT-like objects --------------------------------------------------------------------------------------


def _ct(seed: int, *, signed: bool = True, bits: int = 16, stored: int = 12, slope: float | None = 1.0,
        intercept: float | None = -1024.0, window: tuple[object, object] | None = (40, 400),
        photometric: str = "MONOCHROME2", function: str | None = None, implicit: bool = False,
        garbage_high_bits: bool = True, size: tuple[int, int] = (48, 40), **extra: Any) -> bytes:
    rng = np.random.default_rng(seed)
    rows, columns = size
    if bits == 8:
        values = rng.integers(0, 1 << stored, (rows, columns), dtype=np.int64)
    else:
        low = -(1 << (stored - 1)) if signed else 0
        normal = rng.normal(low + (1 << (stored - 1)) * 1.2, (1 << stored) / 6, (rows, columns))
        values = np.clip(normal, low, low + (1 << stored) - 1).astype(np.int64)
    raw = values & ((1 << stored) - 1)  # the stored bits, two's complement for signed values
    if garbage_high_bits and stored < bits:  # unused bits set: readers must clear or sign-extend them
        raw |= rng.integers(0, 1 << (bits - stored), (rows, columns)) << stored
    dtype = np.uint8 if bits == 8 else np.uint16
    ds = make_dataset(Rows=rows, Columns=columns, BitsAllocated=bits, BitsStored=stored, HighBit=stored - 1,
                      PixelRepresentation=int(signed), PhotometricInterpretation=photometric,
                      PixelData=raw.astype(dtype).tobytes(), **extra)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if function is not None:
        ds.VOILUTFunction = function
    ds.PixelSpacing = [0.7, 0.7]
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return to_bytes(ds)


GENERATED: dict[str, bytes] = {
    "signed 12 in 16, HU rescale, stored window": _ct(1),
    "signed 16, no rescale, no window (auto)": _ct(2, stored=16, slope=None, intercept=None, window=None),
    "unsigned 12 in 16, slope and intercept": _ct(3, signed=False, slope=0.5, intercept=-100.25, window=(300, 900)),
    "unsigned 16, fractional slope, no window": _ct(4, signed=False, stored=16, slope=2.5, intercept=10, window=None),
    "signed 10 in 16, MONOCHROME1": _ct(5, stored=10, photometric="MONOCHROME1", window=(0, 300)),
    "MONOCHROME1 without a window": _ct(6, photometric="MONOCHROME1", window=None),
    "8 bit": _ct(7, signed=False, bits=8, stored=8, slope=None, intercept=None, window=None),
    "8 bit, 6 stored, MONOCHROME1": _ct(8, signed=False, bits=8, stored=6, slope=None, intercept=None,
                                        photometric="MONOCHROME1", window=(20, 30)),
    "signed 8 bit": _ct(9, bits=8, stored=8, slope=1, intercept=0, window=(0, 100)),
    "several windows": _ct(10, window=("40\\-600", "400\\1500")),
    "sigmoid": _ct(11, function="SIGMOID"),
    "linear exact, sub-unit width": _ct(12, window=(-1000.5, 0.5), function="LINEAR_EXACT"),
    "zero slope (read as 1)": _ct(13, slope=0, window=None),
    "Implicit VR": _ct(14, implicit=True),
    "Implicit VR, MONOCHROME1, no window": _ct(15, implicit=True, photometric="MONOCHROME1", window=None),
    "constant frame": to_bytes(make_dataset(Rows=8, Columns=8, BitsAllocated=16, BitsStored=16, HighBit=15,
                                            PixelRepresentation=1, PixelData=np.full(64, -3, np.int16).tobytes())),
    "wide range (no lookup table)": _ct(16, stored=16, size=(8, 8), window=None),
    "Number of Frames 1": _ct(17, NumberOfFrames=1),
}
NOT_PLAIN: dict[str, bytes] = {
    "two frames": to_bytes(make_dataset(NumberOfFrames=2, Rows=4, Columns=4, PixelData=bytes(range(32)))),
    "claims two frames, holds one": to_bytes(make_dataset(NumberOfFrames=2, Rows=4, Columns=4,
                                                          PixelData=bytes(range(16)))),
    "Modality LUT Sequence": _ct(20, ModalityLUTSequence=Sequence([Dataset()])),
    "VOI LUT Sequence": _ct(21, VOILUTSequence=Sequence([Dataset()])),
    "functional groups": _ct(22, SharedFunctionalGroupsSequence=Sequence([Dataset()])),
    "RGB": to_bytes(make_dataset(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                                 Rows=4, Columns=4, PixelData=bytes(48))),
    "PALETTE COLOR": _ct(23, signed=False, photometric="PALETTE COLOR"),
    "32 bit": to_bytes(make_dataset(BitsAllocated=32, BitsStored=32, HighBit=31, Rows=2, Columns=2,
                                    PixelData=bytes(16))),
    "short pixel data": to_bytes(make_dataset(Rows=16, Columns=16, PixelData=bytes(100))),
}


@pytest.mark.parametrize("name", list(GENERATED))
def test_a_plain_image_renders_as_its_full_parse_does(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = GENERATED[name]
    plain = _plain(data)
    assert plain is not None, f"{name}: should take the plain path"
    for window in WINDOWS:
        expected = _reference(_full(data), window, monkeypatch)
        assert np.array_equal(_pixels(render_frame(_full(data), 0, window)), expected), (name, window)
        got = _pixels(render_frame(_plain(data), 0, window))  # type: ignore[arg-type]
        assert got.dtype == expected.dtype and np.array_equal(got, expected), (name, window)


@pytest.mark.parametrize("params", PARAMS, ids=repr)
@pytest.mark.parametrize("name", ["signed 12 in 16, HU rescale, stored window", "Implicit VR, MONOCHROME1, no window",
                                  "8 bit"])
def test_rendered_answers_are_the_same_bytes(name: str, params: RenderParams) -> None:
    """The whole /rendered rendering (window function, viewport, region, encoding) of both datasets."""
    data = GENERATED[name]
    plain = _plain(data)
    assert plain is not None
    for media_type in ("image/png", "image/jpeg"):
        assert render(plain, 0, params, media_type) == render(_full(data), 0, params, media_type), (name, media_type)


@pytest.mark.parametrize("name", list(NOT_PLAIN))
def test_anything_else_is_left_to_the_full_parse(name: str) -> None:
    assert _plain(NOT_PLAIN[name]) is None


def test_the_rendered_jpeg_holds_the_rendered_grey_levels_as_the_optimized_one_did() -> None:
    """The encoding's Huffman tables are not optimised any more: the same picture comes back from it."""
    image = render_frame(_full(GENERATED["signed 12 in 16, HU rescale, stored window"]), 0)
    ours = render(_full(GENERATED["signed 12 in 16, HU rescale, stored window"]), 0, RenderParams(), "image/jpeg")
    optimized = io.BytesIO()
    image.save(optimized, format="JPEG", quality=RenderParams().quality, optimize=True)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(ours))), np.asarray(Image.open(optimized)))


def test_the_decode_bound_applies_to_a_plain_image_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = GENERATED["signed 12 in 16, HU rescale, stored window"]
    plain = _plain(data)
    assert plain is not None
    monkeypatch.setattr(limits, "_config", limits._Config(1024, limits.DecodeBudget(1024 * 1024)))  # 1 KiB bound
    decoded: list[object] = []
    monkeypatch.setattr(render_module, "_native_grey", lambda *args: decoded.append(args))
    with pytest.raises(RenderTooLarge, match="PACS_MAX_DECODED_MIB"):
        render(plain, 0, RenderParams(), "image/jpeg")
    assert decoded == []  # refused before the decoder ran


def test_absurd_dimensions_of_a_plain_image_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset(Rows=20000, Columns=1, PixelData=bytes(20000))
    plain = _plain(to_bytes(ds))
    assert plain is not None
    decoded: list[object] = []
    monkeypatch.setattr(render_module, "_native_grey", lambda *args: decoded.append(args))
    with pytest.raises(RenderTooLarge, match="rendering limit"):
        render(plain, 0, RenderParams(), "image/jpeg")
    assert decoded == []


# -- pydicom's test corpus ------------------------------------------------------------------------------------------


def _corpus() -> Iterator[tuple[str, bytes, Dataset]]:
    for path in CORPUS:
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # not DICOM (the corpus also holds other files)
            continue
        if "PixelData" in ds:
            yield path.name, path.read_bytes(), ds


def test_the_native_decode_is_pydicoms_over_the_corpus() -> None:
    """Every frame the native decode takes is the array pydicom's decoder returns, dtype included."""
    taken = 0
    for name, _data, ds in _corpus():
        try:
            geometry = render_module._geometry(ds)
            syntax = render_module._transfer_syntax(ds)
        except RenderError:
            continue
        for frame in range(min(geometry.frames, 3)):
            ours = render_module._native_grey(ds, frame, geometry, syntax)
            if ours is None:
                continue
            taken += 1
            try:
                options: dict[str, Any] = {"as_rgb": True, "number_of_frames": geometry.frames}
                expected, props = get_decoder(syntax).as_array(ds, index=frame, validate=True, **options)
            except Exception as exc:
                pytest.fail(f"{name} frame {frame}: the native decode took what pydicom refuses ({exc})")
            assert ours[0].dtype == expected.dtype and np.array_equal(ours[0], expected), (name, frame)
            assert ours[2] == props["bits_stored"], name
    assert taken >= 20  # the corpus has dozens of native grayscale frames


def test_the_corpus_renders_the_same_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each corpus image: the full parse with the native decode, the plain path where it is taken, and pydicom's
    decoder all give the same picture (or the same refusal)."""
    plain_taken = native_taken = 0
    for name, data, _ds in _corpus():
        plain = _plain(data) if data[128:132] == b"DICM" else None
        plain_taken += plain is not None
        for window in (None, (40.0, 400.0)):
            with monkeypatch.context() as patch:
                patch.setattr(render_module, "_native_grey", lambda *args: None)
                expected = _outcome(_full(data), window)
            got = _outcome(_full(data), window)
            assert type(got) is type(expected), (name, window, got if isinstance(got, str) else expected)
            if isinstance(expected, str):
                assert got == expected, (name, window)
            else:
                native_taken += 1
                assert np.array_equal(got, expected), (name, window)
            if plain is not None:
                ours = _outcome(plain, window)
                if isinstance(expected, str):
                    assert isinstance(ours, str), (name, window)
                else:
                    assert not isinstance(ours, str), (name, window, ours)
                    assert np.array_equal(ours, expected), (name, window)
    assert plain_taken >= 10 and native_taken >= 50


# -- served: /rendered of a stored plain image ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["embedded"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    return shared_world(request, tmp_path_factory)  # the DICOMweb modules' shared world


@pytest.mark.integration
@pytest.mark.parametrize("query", [{}, {"window": "100,50"}, {"window": "300,600,sigmoid"}, {"viewport": "40,24"},
                                   {"viewport": "32,32,2,3,9,7"}])
def test_served_rendered_images_are_the_full_parse_rendered(world: World, query: dict[str, str]) -> None:
    """A stored plain image's /rendered (PNG: lossless) is the picture its full parse renders to; still audited,
    still refused outside the asker's scope."""
    a1 = world.a1
    series, sop = a1.series[0], a1.sops[a1.series[0]][0]
    stored = stored_bytes(world.server, sop)
    assert _plain(stored) is not None  # the stored object takes the plain path
    path = f"/dicom-web/studies/{a1.study}/series/{series}/instances/{sop}/rendered"
    expected = render(_full(stored), 0, render_params(query), "image/png")
    # a credential of its own: a credential's repeated reads of a study are audited once a while (coalesced)
    fresh = world.server.token("radiologist", name=f"rendered-plain-{uuid.uuid4().hex[:8]}")
    before = audit_count(world.server, "dicomweb.rendered", a1.study)
    with world.http(fresh) as http:
        response = http.get(path, params=query, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert np.array_equal(_pixels(Image.open(io.BytesIO(response.content))),
                          _pixels(Image.open(io.BytesIO(expected))))
    assert audit_count(world.server, "dicomweb.rendered", a1.study) == before + 1
    with world.http(world.facility_b) as http:
        assert http.get(path, params=query, headers={"Accept": "image/png"}).status_code == 404


def _per_pixel(arr: np.ndarray, attrs: Dataset, window: tuple[float, float] | None, inverse: bool) -> np.ndarray:
    """The grayscale pipeline pixel by pixel, as for data without a lookup table (render's own steps)."""
    values = render_module._modality_values(arr, attrs)
    return render_module._levels(render_module._voi(values, attrs, window), inverse=inverse)


@pytest.mark.parametrize("dtype", ["u1", "i1", "<u2", "<i2", ">u2", ">i2", "<i4"])
@pytest.mark.parametrize("end", ["bottom", "top"])
@pytest.mark.parametrize("window", [None, (40.0, 400.0)])
def test_the_lookup_table_gives_the_per_pixel_levels(dtype: str, end: str, window: tuple[float, float] | None) -> None:
    """The table over stored values (indexed in the array's own width) gives each pixel the level the per-pixel
    pipeline gives it, for every integer width and byte order, at either end of the type's range."""
    kind = np.dtype(dtype)
    info = np.iinfo(kind)
    span = min(3000, int(info.max) - int(info.min))
    low = int(info.min) if end == "bottom" else int(info.max) - span
    arr = np.random.default_rng(kind.itemsize).integers(low, low + span + 1, (128, 128)).astype(kind)
    arr[0, :2] = (low, low + span)
    attrs = Dataset()
    attrs.RescaleSlope, attrs.RescaleIntercept = 0.75, -20
    for inverse in (False, True):
        assert render_module._display_table(arr, attrs, window, inverse=inverse) is not None  # the table path
        got = render_module._grey_to_display(arr, attrs, window, inverse=inverse)
        assert np.array_equal(got, _per_pixel(arr, attrs, window, inverse)), (dtype, end, window, inverse)

"""Rendering tests against pydicom's bundled real-world test corpus.

Only files that ship inside the pydicom wheel are used (``download=False``):
CI has no network, and the files pydicom fetches on demand (``emri_small.dcm``,
``US1_UNCR.dcm``, ``RG1_*``, ``OBXXXX1A*``, the HTJ2K set) are not bundled.
Where the corpus has no example of a case (uncompressed YBR_FULL, YBR_PARTIAL,
Modality/VOI LUT Sequences, enhanced functional groups, oversized images) the
test derives one from a bundled file and says so.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_color_lut, apply_windowing, convert_color_space, get_decoder, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    generate_uid,
)

from pacs.imaging.render import (
    MAX_DIMENSION,
    RenderError,
    placeholder,
    render_bytes,
    render_frame,
    thumbnail,
)

# --------------------------------------------------------------------------- helpers


def _path(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in pydicom's bundled test corpus"
    return str(path)


def _read(name: str) -> Dataset:
    return pydicom.dcmread(_path(name))


def _px(image: Image.Image) -> np.ndarray:
    """Rendered image as a signed array, so differences do not wrap around."""
    return np.asarray(image).astype(np.int32)


def _hounsfield(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _without_voi(ds: Dataset) -> Dataset:
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _native_dataset(arr: np.ndarray, photometric: str, **extra: object) -> Dataset:
    """A minimal uncompressed Explicit VR Little Endian image dataset around ``arr``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 3 if photometric.startswith(("RGB", "YBR")) else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


# --------------------------------------------------------------------------- CT windowing


def test_ct_without_stored_window_gets_a_robust_auto_window() -> None:
    ds = _read("CT_small.dcm")
    assert "WindowCenter" not in ds  # so this exercises the automatic window
    image = render_frame(ds)
    px = np.asarray(image)
    assert image.mode == "L" and image.size == (ds.Columns, ds.Rows)
    assert px.min() <= 5 and px.max() >= 250, "auto window must use the whole display range"
    assert len(np.unique(px)) > 150, "auto window must keep the grey-level detail"
    # 0.5th-99.5th percentile: only the extreme tails saturate, not the anatomy.
    assert (px == 0).mean() < 0.02 and (px == 255).mean() < 0.02


def test_ct_window_maps_hounsfield_units_as_specified() -> None:
    """PS3.3 C.11.2.1.2.1 LINEAR window applied to HU, not to raw stored values."""
    ds = _read("CT_small.dcm")
    center, width = 40.0, 400.0
    hu = _hounsfield(ds)
    px = _px(render_frame(ds, window=(center, width)))
    expected = np.where(
        hu <= center - 0.5 - (width - 1) / 2,
        0.0,
        np.where(
            hu > center - 0.5 + (width - 1) / 2, 255.0, ((hu - (center - 0.5)) / (width - 1) + 0.5) * 255
        ),
    )
    assert np.abs(px - np.rint(expected)).max() <= 1
    assert (px[hu <= -200] == 0).all(), "air/fat below the window must be black"
    assert (px[hu >= 260] == 255).all(), "bone above the window must be white"


@pytest.mark.parametrize(
    ("function", "levels"),
    [
        # LINEAR (C.11.2.1.2.1) uses center - 0.5 and width - 1: HU 38..41 span the display.
        ("LINEAR", {37: 0, 38: 0, 39: 85, 40: 170, 41: 255, 42: 255}),
        # LINEAR_EXACT (C.11.2.1.3.2): 38 and below black, above 42 white, 40 mid-grey.
        ("LINEAR_EXACT", {37: 0, 38: 0, 39: 64, 40: 128, 41: 191, 42: 255, 43: 255}),
    ],
)
def test_narrow_window_follows_the_standard_exactly(function: str, levels: dict[int, int]) -> None:
    """A 4 HU wide window on integer HU makes the two linear definitions visibly different."""
    ds = _read("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 4, function
    hu = _hounsfield(ds)
    px = _px(render_frame(ds))
    for value, level in levels.items():
        assert (hu == value).any()
        assert set(np.unique(px[hu == value])) == {level}, f"HU {value}"


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_stored_window_respects_voi_lut_function(function: str) -> None:
    """The dataset's own window and VOI LUT Function give what pydicom's reference implementation gives."""
    ds = _read("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 60, 350, function
    px = _px(render_frame(ds))

    reference = Dataset()  # pydicom's apply_windowing with an 8-bit output range
    reference.PhotometricInterpretation = "MONOCHROME2"
    reference.BitsStored, reference.PixelRepresentation = 8, 0
    reference.WindowCenter, reference.WindowWidth, reference.VOILUTFunction = 60, 350, function
    expected = np.rint(apply_windowing(_hounsfield(ds), reference))
    assert np.abs(px - expected).max() <= 1


def test_narrower_window_saturates_more_pixels() -> None:
    ds = _read("CT_small.dcm")
    wide = np.asarray(render_frame(ds, window=(40, 1500)))
    narrow = np.asarray(render_frame(ds, window=(40, 80)))
    saturated_wide = np.isin(wide, (0, 255)).sum()
    saturated_narrow = np.isin(narrow, (0, 255)).sum()
    assert saturated_narrow > saturated_wide + 0.1 * wide.size
    # ... and the pixels inside the narrow window get more contrast, not less.
    hu = _hounsfield(ds)
    inside = (hu > 10) & (hu < 70)
    assert inside.sum() > 50
    assert np.ptp(narrow[inside]) > 4 * np.ptp(wide[inside])


def test_raising_the_window_level_darkens_the_image() -> None:
    ds = _read("CT_small.dcm")
    low = np.asarray(render_frame(ds, window=(0, 400))).mean()
    high = np.asarray(render_frame(ds, window=(200, 400))).mean()
    assert high < low - 20


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"])
def test_stored_window_is_the_default(name: str) -> None:
    ds = _read(name)
    center = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
    width = float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
    default = _px(render_frame(ds))
    assert np.array_equal(default, _px(render_frame(ds, window=(center, width))))
    assert not np.array_equal(default, _px(render_frame(_without_voi(_read(name)))))


@pytest.mark.parametrize("window", [(40, 0), (40, -10), (40, math.nan), (math.inf, 400), ("a", "b")])
def test_invalid_explicit_window_is_refused(window: tuple[float, float]) -> None:
    with pytest.raises(RenderError, match="window"):
        render_frame(_read("CT_small.dcm"), window=window)


def test_modality_lut_sequence_is_applied_before_the_window() -> None:
    rescaled = _read("CT_small.dcm")
    rescaled.RescaleSlope, rescaled.RescaleIntercept = 3, 0

    with_lut = _read("CT_small.dcm")
    del with_lut.RescaleSlope, with_lut.RescaleIntercept
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [3 * v for v in range(4096)]
    item.ModalityLUTType = "US"
    with_lut.ModalityLUTSequence = Sequence([item])

    window = (3000, 4000)
    assert np.array_equal(
        _px(render_frame(with_lut, window=window)), _px(render_frame(rescaled, window=window))
    )
    del with_lut.ModalityLUTSequence
    assert not np.array_equal(
        _px(render_frame(with_lut, window=window)), _px(render_frame(rescaled, window=window))
    )


@pytest.mark.parametrize(
    ("declared_bits", "top"),
    [(16, 65535), (12, 4095), (16, 4095)],
    ids=["16-bit", "12-bit", "12-bit-entries-declared-16"],
)
def test_voi_lut_sequence_is_used_when_there_is_no_window(declared_bits: int, top: int) -> None:
    """A VOI LUT equivalent to window 600/1600 renders like that window (MR_small's own)."""
    reference = _px(render_frame(_read("MR_small.dcm"), window=(600, 1600)))

    ds = _without_voi(_read("MR_small.dcm"))
    x = np.arange(4096, dtype=np.float64)
    ramp = np.clip((x - 599.5) / 1599 + 0.5, 0, 1)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, declared_bits]
    item.LUTData = [int(v) for v in np.rint(ramp * top)]
    ds.VOILUTSequence = Sequence([item])
    assert np.abs(_px(render_frame(ds)) - reference).max() <= 1


def test_enhanced_functional_groups_drive_rescale_and_window() -> None:
    """Enhanced multi-frame objects keep rescale/window in functional groups, not at top level."""
    classic = _read("CT_small.dcm")
    expected = _px(render_frame(classic, window=(40, 400)))

    enhanced = _read("CT_small.dcm")
    del enhanced.RescaleSlope, enhanced.RescaleIntercept
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    frame = Dataset()
    frame.FrameVOILUTSequence = Sequence([voi])
    enhanced.SharedFunctionalGroupsSequence = Sequence([shared])
    enhanced.PerFrameFunctionalGroupsSequence = Sequence([frame])
    assert np.array_equal(_px(render_frame(enhanced)), expected)


def test_binary_segmentation_renders_two_levels() -> None:
    ds = _read("liver_1frame.dcm")  # BitsAllocated 1 SEG mask
    px = np.asarray(render_frame(ds))
    assert set(np.unique(px)) == {0, 255}
    assert np.array_equal(px == 255, pixel_array(ds, index=0) == 1)


# --------------------------------------------------------------------------- MONOCHROME1


MONOCHROME1_CR = ["6154", "6247", "6278"]  # dicomdirtests/77654033/CR*/...: CR, MONOCHROME1, W 1600/2800


@pytest.mark.parametrize("name", MONOCHROME1_CR)
@pytest.mark.parametrize("window", [None, (1700, 600)], ids=["stored-window", "explicit-window"])
def test_monochrome1_is_the_inverse_of_monochrome2(name: str, window: tuple[float, float] | None) -> None:
    ds = _read(name)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    mono1 = _px(render_frame(ds, window=window))
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2 = _px(render_frame(ds, window=window))
    assert np.ptp(mono1) > 20, "the rendering must not be flat"
    assert np.array_equal(mono1, 255 - mono2)


@pytest.mark.parametrize("name", MONOCHROME1_CR)
def test_monochrome1_low_values_are_bright(name: str) -> None:
    ds = _without_voi(_read(name))  # auto window: polarity must still apply
    stored = ds.pixel_array
    px = _px(render_frame(ds))
    assert px[stored == stored.min()].min() > px[stored == stored.max()].max()


# --------------------------------------------------------------------------- colour


def test_palette_colour_matches_the_lookup_tables() -> None:
    ds = _read("examples_palette.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    image = render_frame(ds)
    assert image.mode == "RGB" and image.size == (ds.Columns, ds.Rows)
    lut = apply_color_lut(ds.pixel_array, ds).astype(np.float64)  # 16-bit entries
    expected = np.rint(lut * 255 / 65535)
    px = _px(image)
    assert np.abs(px - expected).max() <= 1
    assert (np.ptp(px, axis=2) > 10).sum() > 1000, "a palette image must keep its colours"
    # Windows are for grayscale; a palette image ignores them.
    assert np.array_equal(px, _px(render_frame(ds, window=(10, 20))))


# Reference: SC_rgb_rle.dcm is the lossless RGB original of the SC_rgb_* family (colour bars).
# Tolerances (mean absolute difference over R, G and B, 0-255):
#   0    lossless codecs and 16/32-bit copies: must be identical;
#   1.0  uncompressed YBR_FULL_422 and JPEG-LS near-lossless: 8-bit rounding in the
#        colour transform / NEAR error bound (measured 0.57 and 0.70);
#   3.5  lossy JPEG baseline: quantisation plus chroma subsampling blur the sharp
#        bar edges (measured 0.57-2.8).
# A YBR image shown without conversion, or converted twice, is off by ~93-96, so
# these tolerances tell right from wrong by a factor of more than 25.
YBR_FAMILY = [
    ("SC_rgb_jpeg_gdcm.dcm", 0.0),  # JPEG lossless SV1, RGB
    ("SC_rgb_gdcm_KY.dcm", 0.0),  # JPEG 2000, RGB
    ("SC_rgb_rle_16bit.dcm", 0.0),  # 16 bits per sample
    ("SC_rgb_rle_32bit.dcm", 0.0),  # 32 bits per sample
    ("SC_ybr_full_422_uncompressed.dcm", 1.0),  # native YBR_FULL_422
    ("SC_rgb_jls_lossy_line.dcm", 1.0),  # JPEG-LS near-lossless, line interleaved
    ("SC_rgb_jls_lossy_sample.dcm", 1.0),  # JPEG-LS near-lossless, sample interleaved
    ("SC_rgb_dcmtk_+eb+cr.dcm", 1.0),  # JPEG baseline without colour transform (RGB)
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 3.5),  # JPEG baseline, YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", 3.5),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", 3.5),  # YBR_FULL_422
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 3.5),  # YBR_FULL_422
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", 3.5),
    ("SC_rgb_jpeg_dcmtk.dcm", 3.5),  # YBR_FULL
    ("SC_rgb_jpeg_lossy_gdcm.dcm", 3.5),  # YBR_FULL
]


@pytest.fixture(scope="module")
def rgb_reference() -> np.ndarray:
    ds = _read("SC_rgb_rle.dcm")
    assert ds.PhotometricInterpretation == "RGB"
    return _px(render_frame(ds))


@pytest.mark.parametrize(("name", "tolerance"), YBR_FAMILY, ids=[n for n, _ in YBR_FAMILY])
def test_colour_encodings_render_the_same_rgb(name: str, tolerance: float, rgb_reference: np.ndarray) -> None:
    image = render_frame(_read(name))
    assert image.mode == "RGB"
    diff = np.abs(_px(image) - rgb_reference)
    assert diff.mean() <= tolerance
    assert np.median(diff) <= 1, "away from edges the colours must match"


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_ybr_is_converted_exactly_once(name: str, rgb_reference: np.ndarray) -> None:
    """pydicom 3 already converts YBR_FULL(_422) to RGB; a second conversion must not happen."""
    ds = _read(name)
    assert ds.PhotometricInterpretation.startswith("YBR_FULL")
    rendered = _px(render_frame(ds))
    raw = pixel_array(ds, index=0, raw=True).astype(np.int32)  # still YBR: the no-conversion mistake
    twice = convert_color_space(rendered.astype(np.uint8), "YBR_FULL", "RGB").astype(np.int32)
    assert np.abs(raw - rgb_reference).mean() > 50
    assert np.abs(twice - rgb_reference).mean() > 50
    assert np.abs(rendered - rgb_reference).mean() < 3.5


def test_uncompressed_ybr_full_renders_as_rgb(rgb_reference: np.ndarray) -> None:
    """Derived: the RGB reference converted to native YBR_FULL (not in the bundled corpus)."""
    ybr = convert_color_space(rgb_reference.astype(np.uint8), "RGB", "YBR_FULL")
    ds = _native_dataset(ybr, "YBR_FULL")
    assert np.abs(_px(render_frame(ds)) - rgb_reference).max() <= 2  # two 8-bit roundings


def test_uncompressed_ybr_partial_422_renders_as_rgb(rgb_reference: np.ndarray) -> None:
    """Derived: PS3.3 C.7.6.3.1.2 studio-range YCbCr, 4:2:2 subsampled, byte layout Y Y Cb Cr."""
    rgb = rgb_reference.astype(np.float64)
    ybr = rgb @ np.array(
        [[0.2568, 0.5041, 0.0979], [-0.1482, -0.2910, 0.4392], [0.4392, -0.3678, -0.0714]]
    ).T + np.array([16.0, 128.0, 128.0])
    y = ybr[..., 0]
    cb = (ybr[:, 0::2, 1] + ybr[:, 1::2, 1]) / 2
    cr = (ybr[:, 0::2, 2] + ybr[:, 1::2, 2]) / 2
    packed = np.stack([y[:, 0::2], y[:, 1::2], cb, cr], axis=-1)  # (rows, columns/2, 4)
    packed = np.clip(np.rint(packed), 0, 255).astype(np.uint8)
    ds = _native_dataset(np.zeros(rgb_reference.shape, np.uint8), "YBR_PARTIAL_422")
    ds.PixelData = packed.tobytes()
    rendered = _px(render_frame(ds))
    diff = np.abs(rendered - rgb_reference)
    assert diff.mean() < 1.5
    assert np.median(diff) <= 1
    # Shown as if it were full range, the studio-range image would look washed out.
    ds.PhotometricInterpretation = "YBR_FULL_422"
    assert np.abs(_px(render_frame(ds)) - rgb_reference).mean() > 3 * max(diff.mean(), 1.0)


def test_jpeg_labelled_ybr_partial_422_decodes_like_ybr_full(rgb_reference: np.ndarray) -> None:
    """Old devices label lossy JPEG as (retired) YBR_PARTIAL_422; the codestream itself is
    full-range YCbCr, so it must render like the same file labelled YBR_FULL."""
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")
    expected = _px(render_frame(ds))
    ds.PhotometricInterpretation = "YBR_PARTIAL_422"
    rendered = _px(render_frame(ds))
    assert np.array_equal(rendered, expected)
    assert np.abs(rendered - rgb_reference).mean() < 3.5


def test_planar_configuration_1_is_handled(rgb_reference: np.ndarray) -> None:
    """Derived: the RGB reference stored colour-by-plane (RRR..GGG..BBB..)."""
    planes = np.ascontiguousarray(rgb_reference.astype(np.uint8).transpose(2, 0, 1))
    ds = _native_dataset(rgb_reference.astype(np.uint8), "RGB")
    ds.PlanarConfiguration = 1
    ds.PixelData = planes.tobytes()
    assert np.array_equal(_px(render_frame(ds)), rgb_reference)


def test_colour_image_with_odd_size_and_jpeg() -> None:
    reference = _px(render_frame(_read("SC_rgb_small_odd.dcm")))
    lossy = _px(render_frame(_read("SC_rgb_small_odd_jpeg.dcm")))  # JPEG baseline YBR_FULL, 3x3
    assert reference.shape == lossy.shape == (3, 3, 3)
    assert np.abs(lossy - reference).mean() < 4


# --------------------------------------------------------------------------- transfer syntaxes


LOSSLESS_MR = [
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "MR_small_expb.dcm",  # Explicit VR Big Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "MR_small_padded.dcm",  # native with trailing padding
]


@pytest.mark.filterwarnings("ignore:The pixel data is 8320 bytes long")
@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_lossless_syntaxes_render_identically(name: str) -> None:
    reference = _px(render_frame(_read("MR_small.dcm")))
    assert np.ptp(reference) > 100
    assert np.array_equal(_px(render_frame(_read(name))), reference)


@pytest.mark.parametrize(
    ("name", "syntax", "mode"),
    [
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", "L"),  # JPEG Extended, 12-bit
        ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91", "L"),  # JPEG 2000 lossy, CT
        ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81", "L"),
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", "L"),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian, "L"),
        ("examples_jpeg2k.dcm", "1.2.840.10008.1.2.4.90", "RGB"),  # YBR_RCT -> RGB
        ("GDCMJ2K_TextGBR.dcm", "1.2.840.10008.1.2.4.90", "RGB"),
        ("examples_ybr_color.dcm", "1.2.840.10008.1.2.4.50", "RGB"),  # JPEG baseline YBR_FULL_422
        ("ExplVR_BigEnd.dcm", "1.2.840.10008.1.2.2", "RGB"),
    ],
)
def test_compressed_syntaxes_render(name: str, syntax: str, mode: str) -> None:
    ds = _read(name)
    assert ds.file_meta.TransferSyntaxUID == syntax
    image = render_frame(ds)
    assert image.mode == mode and image.size == (ds.Columns, ds.Rows)
    assert np.ptp(np.asarray(image)) > 100, "a real image must not render flat"


def test_jpeg_extended_matches_its_jpeg2000_sibling() -> None:
    """The same NM image as lossy JPEG Extended and as JPEG 2000 renders alike."""
    jpeg = _px(render_frame(_read("JPGExtended.dcm"), window=(128, 256)))
    j2k = _px(render_frame(_read("JPEG2000.dcm"), window=(128, 256)))
    assert np.abs(jpeg - j2k).mean() < 8


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        # Both installed JPEG decoders reject this file's codestream (GDCM would be needed).
        ("JPEG-lossy.dcm", "cannot decode frame 0.*JPEG Extended"),
        # The codestream header is corrupt and claims a ~3.7e9 pixel wide image.
        ("JPEG2000-embedded-sequence-delimiter.dcm", "claims .* pixels .* refusing"),
        ("MR_truncated.dcm", "less than expected"),
        ("badVR.dcm", "NumberOfFrames"),
        ("meta_missing_tsyntax.dcm", "Rows"),
    ],
)
def test_undecodable_or_corrupt_files_raise_with_a_reason(name: str, reason: str) -> None:
    with pytest.raises(RenderError, match=reason):
        render_frame(pydicom.dcmread(_path(name), force=True))


def test_htj2k_transfer_syntax_is_decodable() -> None:
    """No HTJ2K file is bundled; HTJ2K decoders must read Part 1 codestreams, so relabel one.

    This proves the HTJ2K transfer syntax is routed to an installed decoder
    (pylibjpeg-openjpeg); it does not exercise the HT block coder itself.
    """
    assert get_decoder(HTJ2KLossless).is_available
    ds = _read("MR_small_jp2klossless.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    assert np.array_equal(_px(render_frame(ds)), _px(render_frame(_read("MR_small.dcm"))))


@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.94", "1.2.3.4.5.6"],
    ids=["MPEG2", "JPIP-referenced", "unknown-private"],
)
def test_unsupported_transfer_syntax_raises(syntax: str) -> None:
    ds = _read("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = syntax
    with pytest.raises(RenderError, match="transfer syntax"):
        render_frame(ds)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_missing_transfer_syntax_is_inferred_for_native_data(name: str) -> None:
    ds = _read(name)
    del ds.file_meta.TransferSyntaxUID
    assert np.array_equal(_px(render_frame(ds)), _px(render_frame(_read("MR_small.dcm"))))


# --------------------------------------------------------------------------- multi-frame


def test_multiframe_renders_the_requested_frame() -> None:
    ds = _read("examples_ybr_color.dcm")  # 30-frame JPEG baseline ultrasound cine
    assert int(ds.NumberOfFrames) == 30
    first = _px(render_frame(ds, 0))
    middle = _px(render_frame(ds, 15))
    assert np.abs(middle - first).mean() > 1, "frames of this cine differ"
    # Frame 15 is exactly what decoding every frame and taking the 16th gives.
    assert np.array_equal(middle, ds.pixel_array[15].astype(np.int32))


def test_only_the_requested_frame_is_decoded() -> None:
    """A corrupt frame 0 must not stop frame 15 of an encapsulated cine from rendering."""
    ds = _read("examples_ybr_color.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=30))
    expected = _px(render_frame(ds, 15))
    frames[0] = b"\xff\xd8\xff\xd9"  # an empty JPEG
    ds.PixelData = encapsulate(frames)
    assert np.array_equal(_px(render_frame(ds, 15)), expected)
    with pytest.raises(RenderError, match="frame 0"):
        render_frame(ds, 0)


@pytest.mark.parametrize("frame", [0, 7, 14])
def test_rle_multiframe_matches_native(frame: int) -> None:
    native = _px(render_frame(_read("rtdose.dcm"), frame))
    rle = _px(render_frame(_read("rtdose_rle.dcm"), frame))
    assert np.array_equal(native, rle)
    assert np.ptp(native) > 100


def test_rgb_multiframe_frames_match_pixel_array() -> None:
    ds = _read("SC_rgb_rle_2frame.dcm")
    all_frames = ds.pixel_array
    for k in range(2):
        assert np.array_equal(_px(render_frame(ds, k)), all_frames[k].astype(np.int32))
    assert not np.array_equal(all_frames[0], all_frames[1])


@pytest.mark.parametrize(
    ("name", "frame"),
    [("examples_ybr_color.dcm", 30), ("examples_ybr_color.dcm", -1), ("MR_small.dcm", 1), ("rtdose.dcm", 15)],
)
def test_frame_out_of_range_raises(name: str, frame: int) -> None:
    with pytest.raises(RenderError, match="out of range"):
        render_frame(_read(name), frame)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name", ["rtplan.dcm", "reportsi.dcm", "test-SR.dcm", "waveform_ecg.dcm", "rtstruct.dcm"]
)
def test_no_pixel_data_raises(name: str) -> None:
    with pytest.raises(RenderError, match="no pixel data"):
        render_frame(pydicom.dcmread(_path(name), force=True))


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("Rows", MAX_DIMENSION + 1, "exceeds"),
        ("Columns", 100_000, "exceeds"),
        ("Rows", 0, "absurd"),
        ("SamplesPerPixel", 5, "Samples per Pixel"),
    ],
)
def test_absurd_dimensions_are_refused_before_decoding(keyword: str, value: int, reason: str) -> None:
    ds = _read("CT_small.dcm")
    setattr(ds, keyword, value)
    with pytest.raises(RenderError, match=reason):
        render_frame(ds)


def test_codestream_larger_than_the_dataset_is_refused() -> None:
    """Decompression-bomb guard: a J2K header claiming 60000x60000 is not handed to the codec."""
    ds = _read("MR_small_jp2klossless.dcm")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert frame[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ
    frame[8:16] = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(RenderError, match=r"60000x60000.*refusing"):
        render_frame(ds)


# --------------------------------------------------------------------------- thumbnails


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("CT_small.dcm", 64, (64, 64)),
        ("examples_palette.dcm", 128, (128, 56)),  # 800x350
        ("JPGExtended.dcm", 100, (25, 100)),  # 256x1024
        ("SC_rgb_small_odd.dcm", 128, (3, 3)),  # never enlarged
    ],
)
def test_thumbnail_is_a_jpeg_that_fits_and_keeps_aspect(
    name: str, size: int, expected: tuple[int, int]
) -> None:
    data = thumbnail(_read(name), size=size)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    assert image.size == expected
    assert max(image.size) <= size


def test_thumbnail_png_uses_the_middle_frame() -> None:
    ds = _read("examples_ybr_color.dcm")  # 30 frames, 320x240
    data = thumbnail(ds, size=320, fmt="png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int32)
    assert np.array_equal(decoded, _px(render_frame(ds, 15)))


def test_thumbnail_corrects_non_square_pixels() -> None:
    ds = _read("CT_small.dcm")  # 128x128
    ds.PixelSpacing = [1.0, 0.5]  # rows 1 mm apart, columns 0.5 mm: physically twice as tall as wide
    image = Image.open(io.BytesIO(thumbnail(ds, size=128)))
    assert image.size == (64, 128)

    ds = _read("examples_rgb_color.dcm")  # 320x240, no spacing
    ds.PixelAspectRatio = [1, 2]  # vertical:horizontal, pixels twice as wide as tall
    image = Image.open(io.BytesIO(thumbnail(ds, size=128)))
    assert image.size == (128, 48)


def test_thumbnail_quality_changes_the_encoding() -> None:
    ds = _read("CT_small.dcm")
    assert len(thumbnail(ds, quality=30)) < len(thumbnail(ds, quality=95))


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"size": -5}, {"quality": 0}, {"quality": 101}, {"fmt": "gif"}]
)
def test_thumbnail_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        thumbnail(_read("CT_small.dcm"), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 16, 128, 300])
def test_placeholder_is_a_dark_square_jpeg(size: int) -> None:
    data = placeholder(size, reason="no pixel data")
    assert data[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (size, size)
    px = np.asarray(image.convert("L"))
    assert 30 <= px.mean() <= 70, "placeholder is dark grey"
    if size >= 16:
        assert px.max() > 70, "with a visible 'no image' cross"


def test_render_bytes_reads_and_thumbnails() -> None:
    path = _path("MR_small_RLE.dcm")
    with open(path, "rb") as handle:
        raw = handle.read()
        handle.seek(0)
        from_stream = render_bytes(handle, size=32)
    from_bytes = render_bytes(raw, size=32)
    assert from_bytes == from_stream == thumbnail(pydicom.dcmread(path), size=32)
    assert Image.open(io.BytesIO(from_bytes)).size == (32, 32)


def test_render_bytes_of_a_file_without_preamble() -> None:
    """``force=True``: a bare dataset (no preamble, no file meta) still renders."""
    ds = _read("MR_small.dcm")
    expected = _px(render_frame(ds))
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=True, little_endian=True)
    body = buffer.getvalue()
    assert body[:4] == b"\x08\x00\x08\x00", "starts straight with (0008,0008): no preamble, no meta"
    data = render_bytes(body, fmt="png", size=64)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))).astype(np.int32), expected)


@pytest.mark.parametrize("payload", [b"", b"not a dicom file at all" * 10, b"\x00" * 300])
def test_render_bytes_of_garbage_raises(payload: bytes) -> None:
    with pytest.raises(RenderError):
        render_bytes(payload)

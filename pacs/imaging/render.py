"""Render one frame of a DICOM image as an 8-bit picture, and make thumbnails.

This is the archive's single rendering path: the thumbnail worker uses it now,
WADO-RS ``/rendered`` and the viewer will use it later, so all of them show the
same grey levels and colours for the same instance.

Grayscale pipeline (the order of PS3.4 N.2, "Pixel Transformation Sequence")::

    stored values -> Modality LUT -> VOI (window / VOI LUT / auto) -> polarity -> 8 bit

* **Modality LUT first.** Rescale Slope/Intercept (or a Modality LUT Sequence)
  turn stored values into modality units, e.g. Hounsfield units for CT. Window
  Center/Width in the dataset, and the window a viewer asks for, are expressed
  in those units, so windowing raw stored values would show the wrong tissue.
* **VOI second.** It picks which part of the 12-16 bit modality range is spread
  over the 256 display levels: an explicit ``window`` wins, then the dataset's
  first window, then its VOI LUT Sequence, then a robust automatic window
  (0.5th-99.5th percentile) so that a frame that is not constant is never shown
  as a blank square.
* **Polarity last.** MONOCHROME1 means "low values are bright". The window is
  defined on values before polarity is applied, so inverting earlier would turn
  a bone window into a soft-tissue window. Inverting the 8-bit display values
  after VOI keeps the window's meaning and shows the image as intended.

Colour data has no VOI step (windows are defined for grayscale only):
PALETTE COLOR goes through its lookup tables, YBR is converted to RGB, and
anything deeper than 8 bits per sample is scaled down.

Enhanced multi-frame objects keep rescale and window per frame in functional
groups (Shared/Per-frame Functional Groups Sequences); those values are used
for the rendered frame in preference to the top-level ones.

Everything here is pure: datasets and bytes in, images and bytes out.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from PIL.Jpeg2KImagePlugin import Jpeg2KImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGTransferSyntaxes,
)

from pacs.imaging import limits

__all__ = [
    "AUTO_WINDOW_PERCENTILES",
    "MAX_DIMENSION",
    "MAX_SAMPLES_PER_PIXEL",
    "RENDER_MAX_PIXELS",
    "RenderBusy",
    "RenderError",
    "RenderTooLarge",
    "placeholder",
    "render_bytes",
    "render_frame",
    "thumbnail",
]

#: Largest Rows or Columns we agree to decode (decompression-bomb guard).
MAX_DIMENSION: Final = 16384
#: More samples per pixel than this is not an image we can display.
MAX_SAMPLES_PER_PIXEL: Final = 4
#: Frames with more pixels are rendered reduced by a power of two (working memory bound).
RENDER_MAX_PIXELS: Final = 2 * 2048 * 2048
#: Rendering's own arrays per reduced sample: float32 values and window output, masks, 8-bit result.
_WORKING_BYTES_PER_SAMPLE: Final = 16
#: Percentiles of the modality values used for the automatic window.
AUTO_WINDOW_PERCENTILES: Final = (0.5, 99.5)
#: The automatic window is estimated on at most this many pixels (a strided sample).
_AUTO_WINDOW_SAMPLE: Final = 1 << 20
#: Integer frames whose stored values span at most this many values (and at most half as many as the frame has
#: pixels) go through the grayscale pipeline once per stored value, as a lookup table, not once per pixel.
_LUT_MAX_ENTRIES: Final = 1 << 16

_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NATIVE_LE: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_NATIVE_DTYPES: Final[dict[tuple[int, int], np.dtype[Any]]] = {
    (8, 0): np.dtype("u1"), (8, 1): np.dtype("i1"), (16, 0): np.dtype("<u2"), (16, 1): np.dtype("<i2")}
_MONOCHROME: Final = ("MONOCHROME1", "MONOCHROME2")
_YBR_FULL: Final = ("YBR_FULL", "YBR_FULL_422")
_VOI_FUNCTIONS: Final = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_PLACEHOLDER_GREY: Final = 48
_PLACEHOLDER_CROSS: Final = 96

# PS3.3 C.7.6.3.1.2: RGB -> YBR_PARTIAL (8-bit) as given by the standard; the
# inverse is computed so both directions use exactly the standard's numbers.
_RGB_TO_YBR_PARTIAL: Final = np.array(
    [
        [0.2568, 0.5041, 0.0979],
        [-0.1482, -0.2910, 0.4392],
        [0.4392, -0.3678, -0.0714],
    ]
)
_YBR_PARTIAL_TO_RGB: Final = np.linalg.inv(_RGB_TO_YBR_PARTIAL)


class RenderError(Exception):
    """The pixel data cannot be rendered; ``str(exc)`` says why, in plain words.

    Raised for: no pixel data, a transfer syntax with no installed decoder,
    corrupt or truncated pixel data, an out-of-range frame, and dimensions
    that are absurd or too large to decode safely.
    """


class RenderBusy(RenderError):
    """The process's decode memory budget stayed taken for too long: a transient condition (try again
    later), unlike every other :class:`RenderError`."""


class RenderTooLarge(RenderError):
    """Decoding the frame would need more memory than ``PACS_MAX_DECODED_MIB`` (or its compressed header
    claims more than the dataset): the object is kept and served as stored, but not rendered."""


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    samples: int
    frames: int


# --------------------------------------------------------------------------- public API


def render_frame(
    ds: Dataset,
    frame: int = 0,
    window: tuple[float, float] | None = None,
    fit: tuple[int, int] | None = None,
) -> Image.Image:
    """Render one frame of ``ds`` as an 8-bit ``'L'`` or ``'RGB'`` PIL image.

    Only the requested frame is decoded (pydicom decodes a single frame of
    encapsulated data and slices native data), so picking a frame of a
    thousand-frame cine does not decode the other 999.

    Memory is bounded (:mod:`pacs.imaging.limits`): the frame's decode cost is
    checked before any decoder runs and held against the process's decode
    budget while rendering. A frame of more than :data:`RENDER_MAX_PIXELS`
    pixels is rendered *reduced* by a power of two: JPEG 2000 is decoded at a
    lower resolution level and 8-bit grey JPEG with DCT scaling (both through
    Pillow, so the full-size image is never allocated); other data is decoded
    and subsampled before any floating-point work, which is float32. The
    returned image is then smaller than Columns x Rows.

    Args:
        ds: The dataset, as read by :func:`pydicom.dcmread`.
        frame: Zero-based frame index.
        window: ``(center, width)`` in modality units (HU for CT). Overrides the
            dataset's own VOI; ignored for colour images.
        fit: ``(width, height)`` the caller will scale the image down to; a large
            frame is then reduced further, never below this size.

    Raises:
        RenderTooLarge: decoding the frame is over the configured bound.
        RenderError: with a readable reason when the frame cannot be rendered.
    """
    geometry = _geometry(ds)
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise RenderError(f"frame index must be an integer, got {frame!r}")
    frame = int(frame)
    if not 0 <= frame < geometry.frames:
        raise RenderError(
            f"frame {frame} is out of range: the image has {geometry.frames} frame(s) "
            f"(valid indices 0..{geometry.frames - 1})"
        )
    window = _validate_window(window)
    tsyntax = _transfer_syntax(ds)
    try:
        pixels = limits.geometry_of(ds)
        fragment = _fragment(ds, frame, geometry) if limits.has_frame_header(tsyntax) else None
        if fragment is not None:
            limits.check_codestream(fragment, pixels, tsyntax, number=frame)
        factor = _reduction(geometry, fit)
        reduced = _reduced_decoder(ds, tsyntax, fragment, geometry, factor) if factor > 1 else None
        if reduced is not None:
            cost = limits.decode_cost(_scaled(pixels, reduced.factor), tsyntax)
        else:
            cost = limits.decode_cost(pixels, tsyntax)
            limits.require_within_bound(cost, f"frame {frame} ({pixels.describe()})")
        cost += _WORKING_BYTES_PER_SAMPLE * math.ceil(geometry.rows / factor) * math.ceil(
            geometry.columns / factor) * geometry.samples
        with limits.reserve(cost):
            return _render(ds, frame, geometry, tsyntax, window, factor, reduced)
    except limits.DecodeTooLarge as exc:
        raise RenderTooLarge(str(exc)) from None
    except limits.DecodeBusy as exc:
        raise RenderBusy(str(exc)) from None


def _render(ds: Dataset, frame: int, geometry: _Geometry, tsyntax: UID, window: tuple[float, float] | None,
            factor: int, reduced: _ReducedDecoder | None) -> Image.Image:
    if reduced is not None:
        arr, pi, bits_stored = reduced.decode()
        step = factor // reduced.factor
    else:
        arr, pi, bits_stored = _decode(ds, frame, geometry, tsyntax)
        step = factor
    if step > 1:  # subsample before any float conversion; the full-size array is freed here
        arr = np.ascontiguousarray(arr[::step, ::step])

    if geometry.samples == 1:
        if pi == "PALETTE COLOR":
            return Image.fromarray(_palette_to_rgb(arr, ds))
        if pi not in _MONOCHROME:
            raise RenderError(f"photometric interpretation {pi!r} is not supported for one-sample data")
        attrs = _frame_attributes(ds, frame, tsyntax)
        grey = _grey_to_display(arr, attrs, window, inverse=pi == "MONOCHROME1")
        return Image.fromarray(grey)
    if geometry.samples == 3:
        return Image.fromarray(_colour_to_rgb(arr, pi, bits_stored))
    raise RenderError(
        f"{geometry.samples} samples per pixel ({pi or 'no photometric interpretation'}) "
        "is not a displayable colour model"
    )


def thumbnail(ds: Dataset, size: int = 128, quality: int = 85, fmt: str = "jpeg") -> bytes:
    """Render a representative frame of ``ds`` and encode it as a small JPEG or PNG.

    The middle frame is used for multi-frame images (the first and last frames
    of cine loops and stacks are often the least typical); single-frame images
    use frame 0. The image is fitted inside ``size`` x ``size`` keeping its
    *physical* aspect ratio: pixels that are not square (Pixel Spacing or Pixel
    Aspect Ratio, common for ultrasound and some CR) are corrected, otherwise
    anatomy would look stretched. Images are never enlarged.

    Args:
        ds: The dataset.
        size: Bounding box edge in pixels (>= 1).
        quality: JPEG quality 1-100 (ignored for PNG).
        fmt: ``"jpeg"`` (or ``"jpg"``) or ``"png"``.

    Raises:
        RenderError: when the pixel data cannot be rendered.
        ValueError: for a bad ``size``, ``quality`` or ``fmt`` (caller bugs).
    """
    fmt_name = _check_output_args(size, quality, fmt)
    geometry = _geometry(ds)
    frame = geometry.frames // 2
    image = render_frame(ds, frame=frame, fit=(2 * size, 2 * size))
    target = _thumbnail_size(image.size, _pixel_aspect(ds, frame), size)
    if target != image.size:
        image = image.resize(target, resample=Image.Resampling.LANCZOS, reducing_gap=2.0)
    return _encode(image, fmt_name, quality)


def placeholder(size: int = 128, reason: str = "") -> bytes:
    """Return a dark-grey JPEG square with a faint cross, shown when rendering fails.

    ``reason`` is accepted so call sites read naturally, but it is deliberately
    not drawn: the caller logs it, and text in pixels would need fonts and
    could leak internal details to whoever sees the thumbnail.
    """
    _check_output_args(size, 85, "jpeg")
    image = Image.new("L", (size, size), _PLACEHOLDER_GREY)
    if size >= 8:
        draw = ImageDraw.Draw(image)
        inset = size // 3
        line = max(1, size // 48)
        far = size - 1 - inset
        draw.line([(inset, inset), (far, far)], fill=_PLACEHOLDER_CROSS, width=line)
        draw.line([(inset, far), (far, inset)], fill=_PLACEHOLDER_CROSS, width=line)
    return _encode(image, "JPEG", 85)


def render_bytes(
    data: bytes | bytearray | memoryview | BinaryIO,
    size: int = 128,
    quality: int = 85,
    fmt: str = "jpeg",
) -> bytes:
    """Read a DICOM file from bytes or a binary stream and return :func:`thumbnail` of it.

    The file is read with ``force=True`` so files without a preamble or file
    meta (common from older modalities) still render.

    Raises:
        RenderError: the bytes are not parseable DICOM or cannot be rendered.
    """
    stream: BinaryIO = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        ds = pydicom.dcmread(stream, force=True)
    except MemoryError:
        raise
    except Exception as exc:
        raise RenderError(f"cannot parse the DICOM data: {_one_line(exc)}") from exc
    return thumbnail(ds, size=size, quality=quality, fmt=fmt)


# --------------------------------------------------------------------------- geometry and decoding


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise RenderError(f"the image has no {keyword} value")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise RenderError(f"invalid {keyword} value {value!r}") from exc


def _geometry(ds: Dataset) -> _Geometry:
    """Validate the image dimensions *before* any decoding (decompression-bomb guard)."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        what = f"{UID(str(sop)).name} object" if sop else "dataset"
        raise RenderError(f"no pixel data: the {what} has no Pixel Data element")
    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if rows < 1 or columns < 1:
        raise RenderError(f"absurd image size {columns}x{rows}")
    if rows > MAX_DIMENSION or columns > MAX_DIMENSION:
        raise RenderTooLarge(
            f"image size {columns}x{rows} exceeds the {MAX_DIMENSION}x{MAX_DIMENSION} rendering limit"
        )
    if not 1 <= samples <= MAX_SAMPLES_PER_PIXEL:
        raise RenderError(f"absurd Samples per Pixel value {samples}")
    # pydicom treats a missing/zero Number of Frames as one frame; so do we.
    return _Geometry(rows=rows, columns=columns, samples=samples, frames=max(frames, 1))


def _transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax of the pixel data, inferred for datasets without file meta."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        return UID(str(tsyntax))
    # No file meta (e.g. a bare dataset read with force=True): only native
    # encodings can be inferred, from how pydicom actually parsed the dataset.
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds and ds[keyword].is_undefined_length:
            raise RenderError("encapsulated (compressed) pixel data without a Transfer Syntax UID")
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _ts_label(tsyntax: UID) -> str:
    name = tsyntax.name
    return f"'{name}'" if name == str(tsyntax) else f"'{name}' ({tsyntax})"


def _decode(ds: Dataset, frame: int, geometry: _Geometry, tsyntax: UID) -> tuple[NDArray[Any], str, int]:
    """Decode one frame; return (array, photometric interpretation *of the array*, bits stored).

    pydicom 3 decoders convert YBR_FULL/YBR_FULL_422 to RGB themselves (its
    ``as_rgb`` option, on by default) and report the resulting photometric
    interpretation; colour handling must follow that reported value, not the
    dataset's, or YBR data would be converted twice.
    """
    native = _native_grey(ds, frame, geometry, tsyntax)
    if native is not None:
        return native
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise RenderError(f"transfer syntax {_ts_label(tsyntax)} is not supported for rendering") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise RenderError(f"no decoder installed for transfer syntax {_ts_label(tsyntax)} ({missing})")

    pi = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    options: dict[str, Any] = {"as_rgb": True, "number_of_frames": geometry.frames}
    if not pi and geometry.samples == 1:
        options["photometric_interpretation"] = "MONOCHROME2"
    elif pi == "YBR_PARTIAL_420" and not tsyntax.is_encapsulated:
        raise RenderError("YBR_PARTIAL_420 is only defined for MPEG video, not native pixel data")
    elif pi.startswith("YBR_PARTIAL") and tsyntax.is_encapsulated:
        # The JPEG codestream's own colour model is full-range YCbCr whatever
        # the (retired) attribute says; decode it as YBR_FULL like DCMTK does.
        options["photometric_interpretation"] = "YBR_FULL"
    elif pi == "YBR_PARTIAL_422":
        # Native 4:2:2 data has the YBR_FULL_422 byte layout: let pydicom undo
        # the subsampling, but not the colour conversion (partial range differs).
        options["photometric_interpretation"] = "YBR_FULL_422"
        options["as_rgb"] = False

    try:
        arr, props = decoder.as_array(ds, index=frame, validate=True, **options)
    except MemoryError:
        raise
    except Exception as exc:
        raise RenderError(f"cannot decode frame {frame} ({_ts_label(tsyntax)}): {_one_line(exc)}") from exc

    out_pi = props.get("photometric_interpretation", pi)
    out_pi = str(getattr(out_pi, "value", out_pi)).strip().upper()
    if pi == "YBR_PARTIAL_422" and not tsyntax.is_encapsulated:
        out_pi = "YBR_PARTIAL_422"
    expected = (geometry.rows, geometry.columns) + ((geometry.samples,) if geometry.samples > 1 else ())
    if arr.shape != expected:
        raise RenderError(f"decoded frame has shape {arr.shape}, expected {expected}")
    bits_stored = int(props.get("bits_stored") or ds.get("BitsStored") or arr.dtype.itemsize * 8)
    return arr, out_pi, bits_stored


def _native_grey(ds: Dataset, frame: int, geometry: _Geometry, tsyntax: UID) -> tuple[NDArray[Any], str, int] | None:
    """One frame of native little-endian 8- or 16-bit grayscale pixel data, as pydicom's native decoder returns it
    (the frame's bytes as integers of Pixel Representation's signedness, the bits above Bits Stored cleared or
    sign-extended), without its per-call option handling, which costs more than the copy itself for a CT slice.

    None for anything else, and whenever pydicom would refuse the dataset (an attribute missing or out of range,
    pixel data shorter than Number of Frames says): pydicom then decodes it, or names the problem.
    """
    if tsyntax not in _NATIVE_LE or geometry.samples != 1 or "PixelData" not in ds:
        return None
    pi = ds.get("PhotometricInterpretation")
    samples, allocated = ds.get("SamplesPerPixel"), ds.get("BitsAllocated")
    stored, representation = ds.get("BitsStored"), ds.get("PixelRepresentation")
    if not (isinstance(pi, str) and pi in _MONOCHROME and samples == 1 and allocated in (8, 16)
            and isinstance(stored, int) and 1 <= stored <= allocated and representation in (0, 1)):
        return None
    data = ds.PixelData
    size = geometry.rows * geometry.columns * allocated // 8
    if not isinstance(data, bytes) or len(data) < size * geometry.frames:
        return None
    dtype = _NATIVE_DTYPES[(allocated, representation)]
    arr = np.frombuffer(data, dtype, count=geometry.rows * geometry.columns, offset=frame * size)
    arr = arr.reshape(geometry.rows, geometry.columns)
    if stored < allocated:  # as pydicom's correct_unused_bits: shift out the unused bits and back (sign-extending)
        shift = allocated - stored
        arr = np.left_shift(arr, shift)
        np.right_shift(arr, shift, out=arr)
    return arr, pi, stored


def _fragment(ds: Dataset, frame: int, geometry: _Geometry) -> bytes:
    """The compressed bytes of one frame (without decoding them)."""
    try:
        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        return get_frame(ds.PixelData, frame, number_of_frames=geometry.frames, extended_offsets=extended)
    except MemoryError:
        raise
    except Exception as exc:
        raise RenderError(
            f"cannot locate frame {frame} in the encapsulated pixel data: {_one_line(exc)}"
        ) from exc


def _reduction(geometry: _Geometry, fit: tuple[int, int] | None) -> int:
    """The power-of-two reduction for a frame: 1 up to :data:`RENDER_MAX_PIXELS`; beyond, enough to get
    under it, and more while the result still covers ``fit``."""
    rows, columns = geometry.rows, geometry.columns
    if rows * columns <= RENDER_MAX_PIXELS:
        return 1
    factor = 2
    while math.ceil(rows / factor) * math.ceil(columns / factor) > RENDER_MAX_PIXELS:
        factor *= 2
    if fit is not None:
        while factor < 64 and columns // (2 * factor) >= fit[0] and rows // (2 * factor) >= fit[1]:
            factor *= 2
    return factor


def _scaled(pixels: limits.PixelGeometry, factor: int) -> limits.PixelGeometry:
    return dataclasses.replace(pixels, rows=math.ceil(pixels.rows / factor),
                               columns=math.ceil(pixels.columns / factor), frames=1)


@dataclass(frozen=True)
class _ReducedDecoder:
    """A decoder that produces the frame already reduced by ``factor`` (Pillow: JPEG 2000 resolution
    levels, JPEG DCT scaling), so the full-size frame is never allocated."""

    factor: int
    decode: Callable[[], tuple[NDArray[Any], str, int]]


def _reduced_decoder(ds: Dataset, tsyntax: UID, fragment: bytes | None, geometry: _Geometry,
                     factor: int) -> _ReducedDecoder | None:
    """A reduced decoder for this frame, or None (then it is decoded in full and subsampled).

    Only for what Pillow decodes exactly like pydicom: unsigned grey JPEG 2000 up to 16 bits and RGB
    JPEG 2000 (reversible/irreversible colour transform undone by OpenJPEG), and 8-bit grey JPEG.
    Pillow refuses images over its own pixel limit; those go the full (bounded) way.
    """
    pixel_limit = Image.MAX_IMAGE_PIXELS  # None when an operator turned Pillow's limit off
    if fragment is None or (pixel_limit is not None and geometry.rows * geometry.columns > pixel_limit):
        return None
    pi = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    header = limits.codestream_header(fragment, j2k=limits.is_j2k(tsyntax))
    if header is None:
        return None
    if limits.is_j2k(tsyntax):
        grey = geometry.samples == 1 and pi in _MONOCHROME and header.precision <= 16
        colour = geometry.samples == 3 and pi in ("RGB", "YBR_ICT", "YBR_RCT") and header.precision == 8
        signed = int(ds.get("PixelRepresentation") or 0) == 1 or _j2k_signed(fragment)
        levels = _j2k_levels(fragment)
        if not (grey or colour) or signed or levels < 1:
            return None
        reduce = min(factor.bit_length() - 1, levels)
        return _ReducedDecoder(1 << reduce, lambda: _pillow_j2k(fragment, reduce, geometry, pi, header.precision))
    if tsyntax in JPEGTransferSyntaxes and geometry.samples == 1 and header.precision == 8 and pi in _MONOCHROME:
        scale = min(factor, 8)
        return _ReducedDecoder(scale, lambda: _pillow_jpeg(fragment, scale, geometry, pi))
    return None


def _j2k_siz_offset(data: bytes) -> int:
    return 0 if data[:4] == b"\xff\x4f\xff\x51" else data.find(b"\xff\x4f\xff\x51", 0, limits.HEADER_SCAN_BYTES)


def _j2k_signed(data: bytes) -> bool:
    at = _j2k_siz_offset(data)
    return at >= 0 and len(data) > at + 44 and bool(data[at + 42] & 0x80)


def _j2k_levels(data: bytes) -> int:
    """Decomposition levels from the main header's COD marker (0 when not found)."""
    at = _j2k_siz_offset(data)
    cod = data.find(b"\xff\x52", max(at, 0), max(at, 0) + 4096)
    return data[cod + 9] if cod >= 0 and len(data) > cod + 9 else 0


def _pillow_j2k(fragment: bytes, reduce: int, geometry: _Geometry, pi: str,
                precision: int) -> tuple[NDArray[Any], str, int]:
    try:
        image = Image.open(io.BytesIO(fragment), formats=["JPEG2000"])
        if not isinstance(image, Jpeg2KImageFile):  # formats= admits no other: this narrows the type
            raise TypeError(f"not a JPEG 2000 image: {type(image).__name__}")
        image.reduce = reduce  # decode this many levels down
        image.load()
        arr = np.asarray(image)
    except MemoryError:
        raise
    except Exception as exc:
        raise RenderError(f"cannot decode the JPEG 2000 frame at a reduced resolution: {_one_line(exc)}") from exc
    _check_reduced_shape(arr, geometry, 1 << reduce)
    if arr.dtype == np.uint16 and 8 < precision < 16:
        arr = arr >> (16 - precision)  # Pillow scales 9-15 bit samples up to the full 16 bits
    return arr, ("RGB" if geometry.samples == 3 else pi), precision


def _pillow_jpeg(fragment: bytes, scale: int, geometry: _Geometry, pi: str) -> tuple[NDArray[Any], str, int]:
    try:
        image = Image.open(io.BytesIO(fragment), formats=["JPEG"])
        image.draft("L", (math.ceil(geometry.columns / scale), math.ceil(geometry.rows / scale)))
        image.load()
        arr = np.asarray(image.convert("L") if image.mode != "L" else image)
    except MemoryError:
        raise
    except Exception as exc:
        raise RenderError(f"cannot decode the JPEG frame at a reduced resolution: {_one_line(exc)}") from exc
    _check_reduced_shape(arr, geometry, scale)
    return arr, pi, 8


def _check_reduced_shape(arr: NDArray[Any], geometry: _Geometry, factor: int) -> None:
    expected = (math.ceil(geometry.rows / factor), math.ceil(geometry.columns / factor))
    if arr.shape[:2] != expected:
        raise RenderError(f"reduced frame has shape {arr.shape[:2]}, expected {expected}")


# --------------------------------------------------------------------------- grayscale


def _frame_attributes(ds: Dataset, frame: int, tsyntax: UID) -> Dataset:
    """The attributes that drive the grayscale pipeline, as they apply to ``frame``.

    Top-level values first, then the Shared and finally the Per-frame
    Functional Groups of enhanced multi-frame objects (most specific wins).
    The result also carries a file meta so pydicom can read OW lookup tables
    with the right byte order.
    """
    attrs = Dataset()
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
    ):
        if keyword in ds:
            attrs.add(ds[keyword])
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for sequence in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            items = group.get(sequence)
            if items:
                for elem in items[0]:
                    attrs[elem.tag] = elem
    attrs.file_meta = FileMetaDataset()
    attrs.file_meta.TransferSyntaxUID = tsyntax
    return attrs


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]  # multi-valued: the first value is the default
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _modality_values(arr: NDArray[Any], attrs: Dataset) -> NDArray[np.floating[Any]]:
    """Apply the Modality LUT -> float32 modality values (e.g. HU; float32 halves the working memory
    and is exact for the integers of 16-bit data).

    A Modality LUT Sequence goes through :func:`pydicom.pixels.apply_modality_lut`;
    Rescale Slope/Intercept (the linear special case) is applied directly so a
    missing, zero or garbage slope can be treated as 1 instead of flattening
    or failing the image.
    """
    values = _modality_raw(arr, attrs)
    finite = np.isfinite(values)
    if not finite.all():  # float pixel data may carry NaN/inf; show them as the minimum
        values = np.where(finite, values, values[finite].min() if finite.any() else 0.0)
    return values


def _modality_raw(arr: NDArray[Any], attrs: Dataset) -> NDArray[np.floating[Any]]:
    """:func:`_modality_values` before non-finite values are replaced (element by element)."""
    if attrs.get("ModalityLUTSequence"):
        shim = Dataset()
        shim.file_meta = attrs.file_meta  # byte order for OW LUT Data
        shim.ModalityLUTSequence = attrs.ModalityLUTSequence
        try:
            values = np.asarray(apply_modality_lut(arr, shim), dtype=np.float32)
        except MemoryError:
            raise
        except Exception as exc:
            raise RenderError(f"invalid Modality LUT Sequence: {_one_line(exc)}") from exc
    else:
        slope = _float_or_none(attrs.get("RescaleSlope")) or 1.0
        intercept = _float_or_none(attrs.get("RescaleIntercept")) or 0.0
        values = arr.astype(np.float32)
        if slope != 1.0:
            values *= slope
        if intercept != 0.0:
            values += intercept
    return values


def _grey_to_display(
    arr: NDArray[Any], attrs: Dataset, window: tuple[float, float] | None, *, inverse: bool
) -> NDArray[np.uint8]:
    table = _display_table(arr, attrs, window, inverse=inverse)
    if table is not None:
        levels, low = table
        return np.take(levels, _table_indexes(arr, low))  # take: the same levels as levels[...], faster
    values = _modality_values(arr, attrs)
    return _levels(_voi(values, attrs, window), inverse=inverse)


def _table_indexes(arr: NDArray[Any], low: int) -> NDArray[Any]:
    """``arr - low``: each pixel's entry in a :func:`_display_table` starting at ``low``. For 8- and 16-bit data in
    the array's own width, unsigned: the difference modulo 2**bits is the exact one, as the table has at most that
    many entries (and one narrow pass costs less than widening every pixel to a 64-bit index)."""
    if arr.dtype.itemsize <= 2 and arr.dtype.isnative:
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        return np.subtract(arr.view(unsigned), unsigned.type(low % (1 << (8 * arr.dtype.itemsize))))
    return np.subtract(arr, low, dtype=np.intp)


def _levels(display: NDArray[np.floating[Any]], *, inverse: bool) -> NDArray[np.uint8]:
    if inverse:  # MONOCHROME1: after VOI, so the window keeps its meaning
        display = 255.0 - display
    return np.clip(np.rint(display), 0, 255).astype(np.uint8)


def _display_table(
    arr: NDArray[Any], attrs: Dataset, window: tuple[float, float] | None, *, inverse: bool
) -> tuple[NDArray[np.uint8], int] | None:
    """The grayscale pipeline as a table over the frame's stored values ``low..high``: (levels, low).

    Every step is element by element, so running it once per stored value gives exactly the levels the
    pixel-by-pixel pipeline gives, at a fraction of the cost for a 12-16 bit frame of 512x512 pixels or
    more. The frame-wide steps are taken from the frame itself: the automatic window's percentiles from
    the same sample of pixels, its fallback extremes from ``low`` and ``high`` (a linear rescale is
    monotonic). None where that would not hold (a Modality LUT Sequence, a VOI LUT Sequence, values
    that are not finite) or a table would not be smaller than the frame.
    """
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 4 or arr.size == 0 or attrs.get("ModalityLUTSequence"):
        return None
    low, high = int(arr.min()), int(arr.max())
    if high - low + 1 > min(arr.size // 2, _LUT_MAX_ENTRIES):
        return None
    values = _modality_raw(np.arange(low, high + 1, dtype=arr.dtype), attrs)
    if not np.isfinite(values).all():
        return None  # replaced by the frame's smallest value: not a per-value rule
    if window is not None or _dataset_window(attrs) is not None:
        display = _voi(values, attrs, window)
    elif attrs.get("VOILUTSequence"):
        return None
    else:
        flat = arr.reshape(-1)
        sample = values[np.subtract(flat[:: max(1, flat.size // _AUTO_WINDOW_SAMPLE)], low, dtype=np.intp)]
        display = _auto_window(values, sample)
    return _levels(display, inverse=inverse), low


def _voi_function(attrs: Dataset) -> str:
    function = str(attrs.get("VOILUTFunction") or "LINEAR").strip().upper()
    return function if function in _VOI_FUNCTIONS else "LINEAR"


def _voi(
    values: NDArray[np.floating[Any]], attrs: Dataset, window: tuple[float, float] | None
) -> NDArray[np.floating[Any]]:
    """Map modality values to display levels 0..255 (float)."""
    if window is not None:
        return _apply_window(values, window[0], window[1], _voi_function(attrs))
    if (own := _dataset_window(attrs)) is not None:
        return _apply_window(values, own[0], own[1], _voi_function(attrs))
    if attrs.get("VOILUTSequence"):
        mapped = _apply_voi_lut_sequence(values, attrs)
        if mapped is not None:
            return mapped
    return _auto_window(values)


def _dataset_window(attrs: Dataset) -> tuple[float, float] | None:
    """The dataset's own (first) window, when it has a usable one."""
    center = _float_or_none(attrs.get("WindowCenter"))
    width = _float_or_none(attrs.get("WindowWidth"))
    return (center, width) if center is not None and width is not None and width > 0 else None


def _apply_window(
    values: NDArray[np.floating[Any]], center: float, width: float, function: str
) -> NDArray[np.floating[Any]]:
    """Window ``values`` to 0..255 with the VOI LUT Function formulas of PS3.3 C.11.2.1.2/3.

    Equivalent to :func:`pydicom.pixels.apply_windowing` with an 8-bit output
    range, written out here so the output range is exactly the display range
    (pydicom's depends on the dataset's Bits Stored and rescale).
    """
    if function == "LINEAR" and width < 1:
        # LINEAR needs width >= 1; sub-unit windows (PET SUV, parametric maps)
        # use the exact form, which LINEAR approaches as the width grows.
        function = "LINEAR_EXACT"
    out = np.empty_like(values)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            out[...] = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return out
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    low, high = center - width / 2.0, center + width / 2.0
    below = values <= low
    above = values > high
    out[below] = 0.0
    out[above] = 255.0
    between = ~(below | above)
    if width > 0:
        out[between] = ((values[between] - center) / width + 0.5) * 255.0
    return out


def _apply_voi_lut_sequence(values: NDArray[np.floating[Any]], attrs: Dataset) -> NDArray[np.floating[Any]] | None:
    """Apply the first VOI LUT of the sequence; None when the LUT is unusable."""
    shim = Dataset()
    shim.file_meta = attrs.file_meta
    shim.VOILUTSequence = attrs.VOILUTSequence
    try:
        descriptor = [int(v) for v in shim.VOILUTSequence[0].LUTDescriptor]
        entries = descriptor[0] or 65536
        first = descriptor[1]
        nominal_bits = descriptor[2]
        lut_range = np.asarray(apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), shim))
        mapped = np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), shim), dtype=np.float64)
    except MemoryError:
        raise
    except Exception:
        return None
    lut_max = float(lut_range.max())
    top = float(2**nominal_bits - 1)
    if lut_max > top or lut_max < top / 8:
        # The descriptor's bit depth is wrong (a classic: 12-bit entries declared
        # as 16 bits, which would render almost black); use the bits actually used.
        top = float(2 ** max(int(lut_max).bit_length(), 1) - 1)
    return mapped * (255.0 / top)


def _auto_window(
    values: NDArray[np.floating[Any]], sample: NDArray[np.floating[Any]] | None = None
) -> NDArray[np.floating[Any]]:
    """A robust window from the data itself, ignoring the extreme 0.5% at each end (of ``sample``, by
    default a strided sample of ``values``)."""
    flat = values.reshape(-1)
    if sample is None:
        sample = flat[:: max(1, flat.size // _AUTO_WINDOW_SAMPLE)]
    low, high = (float(v) for v in np.percentile(sample, AUTO_WINDOW_PERCENTILES))
    if not high > low:  # a mostly constant frame with a few outliers: use the full range
        low, high = float(flat.min()), float(flat.max())
    if not high > low:  # truly constant: nothing to show
        return np.zeros_like(values)
    return _apply_window(values, (low + high) / 2.0, high - low, "LINEAR_EXACT")


def _validate_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise RenderError(f"window must be (center, width), got {window!r}") from exc
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise RenderError(f"window width must be a positive finite number, got {window!r}")
    return center, width


# --------------------------------------------------------------------------- colour


def _palette_to_rgb(arr: NDArray[Any], ds: Dataset) -> NDArray[np.uint8]:
    try:
        rgb = np.asarray(apply_color_lut(arr, ds))
    except MemoryError:
        raise
    except Exception as exc:
        raise RenderError(f"invalid palette colour lookup tables: {_one_line(exc)}") from exc
    if rgb.dtype.itemsize == 1:
        return rgb.astype(np.uint8)
    if rgb.max() <= 255:
        # 16-bit tables that hold 8-bit entries exist in the wild; dividing by
        # 257 would render them black.
        return rgb.astype(np.uint8)
    return np.clip(np.rint(rgb / 257.0), 0, 255).astype(np.uint8)


def _colour_to_rgb(arr: NDArray[Any], pi: str, bits_stored: int) -> NDArray[np.uint8]:
    if pi in _YBR_FULL:
        # Only reached if a decoder did not convert (pydicom normally does).
        arr = convert_color_space(arr, pi, "RGB")
    elif pi == "YBR_PARTIAL_422":
        arr = _ybr_partial_to_rgb(arr, bits_stored)
    elif pi != "RGB":
        raise RenderError(f"photometric interpretation {pi!r} is not supported for colour rendering")
    bits = bits_stored if 1 <= bits_stored <= 32 else 8
    if bits == 8 and arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    scaled = arr.astype(np.float32) * np.float32(255.0 / float(2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _ybr_partial_to_rgb(arr: NDArray[Any], bits_stored: int) -> NDArray[Any]:
    """YBR_PARTIAL (studio range, Y 16-235, Cb/Cr 16-240 at 8 bits) -> full-range RGB."""
    scale = float(2 ** (max(bits_stored, 8) - 8))
    ybr = arr.astype(np.float64) - np.array([16.0, 128.0, 128.0]) * scale
    rgb = ybr @ _YBR_PARTIAL_TO_RGB.T
    top = float(2 ** max(bits_stored, 8) - 1)
    return np.clip(np.rint(rgb), 0, top).astype(np.uint16 if top > 255 else np.uint8)


# --------------------------------------------------------------------------- thumbnails


def _pixel_aspect(ds: Dataset, frame: int) -> float:
    """Physical width / height of one pixel (1.0 when unknown or implausible)."""
    spacing = None
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        measures = group.get("PixelMeasuresSequence")
        if measures and measures[0].get("PixelSpacing"):
            spacing = measures[0].PixelSpacing
            break
    if spacing is None:
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    ratio = None
    try:
        if spacing is not None and len(spacing) == 2:
            row_spacing, column_spacing = float(spacing[0]), float(spacing[1])  # vertical, horizontal
            ratio = column_spacing / row_spacing
        elif ds.get("PixelAspectRatio") is not None and len(ds.PixelAspectRatio) == 2:
            vertical, horizontal = (float(v) for v in ds.PixelAspectRatio)
            ratio = horizontal / vertical
    except (TypeError, ValueError, ZeroDivisionError):
        ratio = None
    if ratio is None or not math.isfinite(ratio) or not 0.1 <= ratio <= 10.0 or abs(ratio - 1.0) < 0.01:
        return 1.0
    return ratio


def _thumbnail_size(image_size: tuple[int, int], pixel_aspect: float, size: int) -> tuple[int, int]:
    width = image_size[0] * pixel_aspect  # physical width in units of one pixel's height
    height = float(image_size[1])
    scale = min(1.0, size / width, size / height)
    return max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))


def _check_output_args(size: int, quality: int, fmt: str) -> str:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_DIMENSION:
        raise ValueError(f"size must be an integer in 1..{MAX_DIMENSION}, got {size!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    name = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}.get(str(fmt).lower())
    if name is None:
        raise ValueError(f"fmt must be 'jpeg' or 'png', got {fmt!r}")
    return name


def _encode(image: Image.Image, fmt_name: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt_name == "JPEG":
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()

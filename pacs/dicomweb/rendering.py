"""Rendered images and thumbnails (PS3.18 8.3.5.1, 9.4): parameters, and pictures made with the archive's
one rendering path (:mod:`pacs.imaging.render`), so the viewer, the thumbnails and DICOMweb show the
same grey levels.

Parameters of ``/rendered`` and ``/thumbnail``:

- ``window=center,width[,function]``: VOI window in modality units (HU for CT); ``function`` is
  ``linear`` (default), ``linear-exact`` or ``sigmoid`` (PS3.3 C.11.2.1.2);
- ``viewport=vw,vh[,sx,sy,sw,sh]``: fit the image (or the source region ``sx,sy,sw,sh`` of it) inside
  ``vw`` x ``vh`` pixels keeping its aspect ratio (enlarging as well as reducing), at most
  :data:`MAX_VIEWPORT` a side;
- ``quality``: JPEG quality 1-100 (default :data:`DEFAULT_QUALITY`).

WADO-URI's ``rows``, ``columns``, ``windowCenter``, ``windowWidth``, ``imageQuality`` and ``region`` map
onto the same :class:`RenderParams`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from pacs.dicomweb.native_frames import IMPLICIT_LE, NativeFrames
from pacs.errors import InvalidInput
from pacs.imaging.render import RenderError, render_frame, thumbnail

MAX_VIEWPORT = 4096
DEFAULT_QUALITY = 90
#: Huffman tables optimised per image: about 7% smaller JPEGs of a CT slice for a third more encoding time, the
#: same pixels either way. /rendered answers a viewer scrolling a series, where the time counts more.
OPTIMIZE_RENDERED = False
#: Top-level elements that make rendering read more than the Image Pixel group (or that a plain image has no use for):
#: lookup table sequences, functional groups (per-frame rescale and window), an extended offset table. An object with
#: any of them is rendered from pydicom's full parse.
_NOT_PLAIN = frozenset({0x00283000, 0x00283010, 0x52009229, 0x52009230, 0x7FE00001, 0x7FE00002})
_PLAIN_PHOTOMETRIC = (b"MONOCHROME1", b"MONOCHROME2")
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}


@dataclass(frozen=True)
class RenderParams:
    window: tuple[float, float] | None = None
    function: str | None = None  # VOI LUT Function for ``window`` (LINEAR, LINEAR_EXACT, SIGMOID)
    viewport: tuple[int, int] | None = None
    region: tuple[float, float, float, float] | None = None  # source crop: x, y, width, height in pixels
    region_fraction: bool = False  # True: region given as fractions of the image (WADO-URI)
    quality: int = DEFAULT_QUALITY
    enlarge: bool = True  # a viewport larger than the image enlarges it (not for thumbnails)

    @property
    def plain(self) -> bool:
        """Nothing asked beyond defaults (a stored thumbnail answers it)."""
        return self == RenderParams(quality=self.quality)

    def thumbnail_of(self, size: int) -> RenderParams:
        """These parameters for a thumbnail: fitted in ``size`` x ``size`` unless a viewport says otherwise,
        never enlarged."""
        return dataclasses.replace(self, viewport=self.viewport or (size, size), enlarge=False)


def parse_rendered(params: Mapping[str, str]) -> RenderParams:
    """``window``, ``viewport`` and ``quality`` of a WADO-RS rendered or thumbnail request (400 if malformed)."""
    window = function = None
    if (text := params.get("window")) is not None:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3):
            raise InvalidInput("window must be center,width[,function]")
        window = (_number("window center", parts[0]), _number("window width", parts[1]))
        if window[1] <= 0:
            raise InvalidInput("window width must be positive")
        if len(parts) == 3:
            function = _FUNCTIONS.get(parts[2].lower())
            if function is None:
                raise InvalidInput(f"window function must be one of {', '.join(_FUNCTIONS)}, got {parts[2][:20]!r}")
    viewport = region = None
    if (text := params.get("viewport")) is not None:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 6):
            raise InvalidInput("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
        viewport = (_size("viewport width", parts[0]), _size("viewport height", parts[1]))
        if len(parts) == 6:
            sx, sy, sw, sh = (_number(n, p) for n, p in zip(("sx", "sy", "sw", "sh"), parts[2:], strict=True))
            region = (sx, sy, sw, sh)
            if region[0] < 0 or region[1] < 0 or region[2] <= 0 or region[3] <= 0:
                raise InvalidInput("viewport source region must have sx,sy >= 0 and sw,sh > 0 (no flips)")
    return RenderParams(window, function, viewport, region, False, _quality(params.get("quality")))


def parse_wado_uri(params: Mapping[str, str]) -> RenderParams:
    """``windowCenter``/``windowWidth``, ``rows``/``columns``, ``region`` and ``imageQuality`` (PS3.18 9.1.2)."""
    center, width = params.get("windowCenter"), params.get("windowWidth")
    if (center is None) != (width is None):
        raise InvalidInput("windowCenter and windowWidth go together")
    window = None
    if center is not None and width is not None:
        window = (_number("windowCenter", center), _number("windowWidth", width))
        if window[1] <= 0:
            raise InvalidInput("windowWidth must be positive")
    rows, columns = params.get("rows"), params.get("columns")
    viewport = None
    if rows is not None or columns is not None:
        viewport = (_size("columns", columns) if columns is not None else MAX_VIEWPORT,
                    _size("rows", rows) if rows is not None else MAX_VIEWPORT)
    region = None
    if (text := params.get("region")) is not None:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise InvalidInput("region must be xmin,ymin,xmax,ymax (fractions of the image, 0.0 to 1.0)")
        x0, y0, x1, y1 = (_number("region", p) for p in parts)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise InvalidInput("region must be xmin,ymin,xmax,ymax with 0 <= min < max <= 1")
        region = (x0, y0, x1 - x0, y1 - y0)
    return RenderParams(window, None, viewport, region, True, _quality(params.get("imageQuality")))


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, got {text[:20]!r}") from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be finite")
    return value


_SMALL_INT = re.compile(r"^[0-9]{1,9}$")


def _size(name: str, text: str) -> int:
    if not _SMALL_INT.match(text.strip()) or not 1 <= int(text.strip()) <= MAX_VIEWPORT:
        raise InvalidInput(f"{name} must be an integer from 1 to {MAX_VIEWPORT}, got {text[:20]!r}")
    return int(text.strip())


def _quality(text: str | None) -> int:
    if text is None:
        return DEFAULT_QUALITY
    if not _SMALL_INT.match(text.strip()) or not 1 <= int(text.strip()) <= 100:
        raise InvalidInput(f"quality must be an integer from 1 to 100, got {text[:20]!r}")
    return int(text.strip())


def render(ds: Dataset, index: int, params: RenderParams, media_type: str) -> bytes:
    """Frame ``index`` (zero-based) of ``ds`` rendered, cropped and fitted, encoded as ``media_type``.

    A frame larger than :data:`~pacs.imaging.render.RENDER_MAX_PIXELS` is rendered reduced (so an answer
    without a viewport is then smaller than the image); a region is still given in the image's pixels.
    Raises RenderError when the pixel data cannot be rendered (RenderTooLarge over the decode bound).
    """
    if params.window is not None and params.function is not None:
        ds.VOILUTFunction = params.function  # our parsed copy: the window's function for this rendering
    fit = params.viewport if params.region is None else None
    image = render_frame(ds, index, params.window, fit=fit)
    if params.region is not None:
        x, y, w, h = params.region
        if params.region_fraction:
            x, w = x * image.width, w * image.width
            y, h = y * image.height, h * image.height
        else:  # pixels of the full image; a large image may have been rendered reduced
            scale = image.width / max(int(ds.get("Columns") or image.width), 1)
            x, y, w, h = x * scale, y * scale, w * scale, h * scale
        box = (round(x), round(y), min(round(x + w), image.width), min(round(y + h), image.height))
        if box[0] >= image.width or box[1] >= image.height or box[2] <= box[0] or box[3] <= box[1]:
            raise RenderError(f"region {params.region} lies outside the {image.width}x{image.height} image")
        image = image.crop(box)
    if params.viewport is not None:
        vw, vh = params.viewport
        scale = min(vw / image.width, vh / image.height)
        if not params.enlarge:
            scale = min(scale, 1.0)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, resample=Image.Resampling.LANCZOS)
    return encode(image, media_type, params.quality)


def plain_image(layout: NativeFrames) -> Dataset | None:
    """What :func:`render` reads of a plain grayscale image, from the header walk of
    :mod:`pacs.dicomweb.native_frames` instead of pydicom's parse of the whole object; None for anything else.

    Plain: native little endian, one frame (Number of Frames absent or 1), one sample of 8 or 16 bits, MONOCHROME1
    or MONOCHROME2, no lookup table sequence and no functional groups. Rendering reads nothing of such an image but
    its (0028,xxxx) attributes, the transfer syntax and the pixel data, so the dataset returned holds exactly those
    (the elements as pydicom reads them, values converted by pydicom) and renders to the same picture. The image's
    bounds are checked by :func:`render` as for any dataset, before the pixels are decoded.
    """
    if layout.tags & _NOT_PLAIN or layout.samples != 1 or layout.bits not in (8, 16) or layout.count != 1:
        return None
    implicit = layout.syntax == IMPLICIT_LE
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag, vr, value in layout.image:
        if tag == 0x00280004 and value.rstrip(b"\x00 ") not in _PLAIN_PHOTOMETRIC:
            return None
        elements[Tag(tag)] = RawDataElement(Tag(tag), vr.decode("ascii") if vr else None, len(value), value, 0,
                                            implicit, True)
    ds = Dataset(elements)
    try:
        frames = ds.get("NumberOfFrames")
        if frames not in (None, "") and int(frames) != 1:
            return None
    except (TypeError, ValueError):
        return None
    pixels = layout.stored(0)
    if pixels is None:
        return None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(layout.syntax)
    ds["PixelData"] = DataElement(0x7FE00010, layout.pixel_vr.decode("ascii") or ("OW" if layout.bits > 8 else "OB"),
                                  pixels)
    return ds


def render_thumbnail(ds: Dataset, params: RenderParams, media_type: str, default_size: int) -> bytes:
    """A thumbnail made the way the workers make theirs (middle frame, physical aspect ratio)."""
    size = min(params.viewport) if params.viewport is not None else default_size
    return thumbnail(ds, size=size, quality=params.quality, fmt="png" if media_type == "image/png" else "jpeg")


def encode(image: Image.Image, media_type: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality, optimize=OPTIMIZE_RENDERED)
    return buffer.getvalue()

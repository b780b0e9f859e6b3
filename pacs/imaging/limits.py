"""The decompression-bomb bound: how much memory decoding pixel data may take, checked before any decoder runs.

A compressed object is a few hundred bytes that *claims* a size; codecs allocate for the claim. Every
path that decodes stored pixel data (thumbnails, ``/rendered``, WADO-RS frames, and transcoding for
WADO-RS, WADO-URI and C-GET/C-MOVE) asks this module first:

* :func:`geometry_of` reads Rows, Columns, Samples per Pixel, Bits Allocated and Number of Frames and
  refuses absurd values;
* :func:`check_codestream` reads the header of one compressed frame (JPEG 2000 SIZ, JPEG SOFn, JPEG-LS
  SOF55, the RLE segment table) and refuses a frame that claims more than the dataset does, or whose
  header cannot be read (the codec would then allocate from a header we have not seen);
* :func:`decode_cost` turns a geometry into the memory one decode needs: the decoded bytes
  (rows x columns x samples x bytes per sample x frames), three times for compressed data (the
  codec's output buffer, pydicom's array, one conversion copy), plus the codec's own 32-bit working
  copy of every sample for JPEG 2000, JPEG and JPEG-LS (measured: a 4000x4000 16-bit frame costs
  OpenJPEG +94 MiB, CharLS +123 MiB, RLE +77 MiB; 8-bit JPEG +77 MiB for 15 MiB of pixels);
* :func:`require_within_bound` refuses a cost over ``PACS_MAX_DECODED_MIB`` (:class:`DecodeTooLarge`);
* :func:`reserve` takes that many bytes from a process-wide budget (``PACS_DECODE_BUDGET_MIB``) shared
  by every thread (HTTP, DIMSE, in-process workers): concurrent decodes wait for memory instead of all
  allocating at once.

Objects over the bound are still archived and served as stored; only decoding them is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

from pacs.errors import PacsError

MIB: Final = 1024 * 1024
DEFAULT_MAX_DECODED_MIB: Final = 256
DEFAULT_BUDGET_MIB: Final = 256
#: How long a decode waits for the shared budget before giving up (:class:`DecodeBusy`).
BUDGET_WAIT_S: Final = 120.0
#: No sane image has more rows or columns than this (also keeps products far from overflow).
MAX_SIDE: Final = 65_535
MAX_SAMPLES: Final = 4
MAX_FRAMES: Final = 1_000_000
#: OpenJPEG allocates tile structures per tile: a codestream of millions of 1x1 tiles is a bomb of its own.
MAX_J2K_TILES: Final = 65_535
#: Headers are looked for in this many leading bytes of a frame (JP2 boxes, APPn segments, ICC profiles).
HEADER_SCAN_BYTES: Final = 1 << 20
#: OpenJPEG, libjpeg and CharLS hold every sample as a 32-bit integer (or more) while they decode.
CODEC_SAMPLE_BYTES: Final = 4
_INTEGER_CODECS: Final = frozenset((*JPEG2000TransferSyntaxes, *JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes))


class DecodeTooLarge(PacsError):
    """Decoding would need more memory than the configured bound, or the pixel data lies about its size.

    ``str(exc)`` says which, in plain words (it reaches clients as the error message)."""


class DecodeBusy(PacsError):
    """The shared decode budget stayed exhausted for :data:`BUDGET_WAIT_S` (try again later)."""


@dataclass(frozen=True)
class PixelGeometry:
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def bytes_per_sample(self) -> int:
        return max(1, (self.bits_allocated + 7) // 8)

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns

    @property
    def frame_bytes(self) -> int:
        """Decoded bytes of one frame."""
        return self.rows * self.columns * self.samples * self.bytes_per_sample

    def describe(self) -> str:
        return (f"{self.columns}x{self.rows}, {self.samples} sample(s) of {self.bits_allocated} bits"
                + (f", {self.frames} frames" if self.frames > 1 else ""))


@dataclass(frozen=True)
class CodestreamHeader:
    """What a compressed frame's own header says (the codec allocates from this, not from the dataset)."""

    width: int
    height: int
    components: int
    precision: int  # bits per sample (the largest over components)
    tiles: int = 1


# -- configuration and the shared budget ------------------------------------------------------------


class DecodeBudget:
    """A bounded semaphore on bytes: :meth:`reserve` waits until ``nbytes`` are free.

    A request larger than the whole budget waits until the budget is entirely free and then runs alone
    (the bound, not the budget, decides what is refused). Reservations must not nest in one thread.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total = max(int(total_bytes), 1)
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    @contextlib.contextmanager
    def reserve(self, nbytes: int, timeout: float = BUDGET_WAIT_S) -> Iterator[None]:
        need = min(max(int(nbytes), 0), self.total)
        with self._cond:
            if not self._cond.wait_for(lambda: self._used + need <= self.total, timeout=timeout):
                raise DecodeBusy(f"the decode memory budget ({self.total // MIB} MiB, PACS_DECODE_BUDGET_MIB) "
                                 f"stayed in use for {timeout:.0f} s; try again later")
            self._used += need
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()


@dataclass
class _Config:
    max_decoded_bytes: int
    budget: DecodeBudget


_config = _Config(DEFAULT_MAX_DECODED_MIB * MIB, DecodeBudget(DEFAULT_BUDGET_MIB * MIB))


def configure(max_decoded_mib: int, budget_mib: int) -> None:
    """Set the bound and the budget for this process (called once where the process builds its context).

    Reservations already held keep counting against the budget they were taken from."""
    global _config
    budget = _config.budget if _config.budget.total == budget_mib * MIB else DecodeBudget(budget_mib * MIB)
    _config = _Config(max_decoded_mib * MIB, budget)


def max_decoded_bytes() -> int:
    return _config.max_decoded_bytes


def reserve(nbytes: int) -> contextlib.AbstractContextManager[None]:
    """Hold ``nbytes`` of the process-wide decode budget for the ``with`` block."""
    return _config.budget.reserve(nbytes)


# -- geometry and cost ------------------------------------------------------------------------------


def _int_attr(ds: Any, keyword: str, default: int | None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise DecodeTooLarge(f"the image has no {keyword} value")
        return default
    if not isinstance(value, int | str | float):  # multi-valued or a sequence: not an image attribute
        raise DecodeTooLarge(f"invalid {keyword} value {str(value)[:40]!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DecodeTooLarge(f"invalid {keyword} value {str(value)[:40]!r}") from None


def geometry_of(ds: Any) -> PixelGeometry:
    """The image geometry from the dataset's attributes; :class:`DecodeTooLarge` for absurd values."""
    rows = _int_attr(ds, "Rows", None)
    columns = _int_attr(ds, "Columns", None)
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if "FloatPixelData" in ds:
        bits = 32
    elif "DoubleFloatPixelData" in ds:
        bits = 64
    else:
        bits = _int_attr(ds, "BitsAllocated", 16)
    frames = max(_int_attr(ds, "NumberOfFrames", 1), 1)
    if not (1 <= rows <= MAX_SIDE and 1 <= columns <= MAX_SIDE):
        raise DecodeTooLarge(f"absurd image size {columns}x{rows}")
    if not 1 <= samples <= MAX_SAMPLES:
        raise DecodeTooLarge(f"absurd Samples per Pixel value {samples}")
    if not 1 <= bits <= 64:
        raise DecodeTooLarge(f"absurd Bits Allocated value {bits}")
    if frames > MAX_FRAMES:
        raise DecodeTooLarge(f"absurd Number of Frames value {frames}")
    return PixelGeometry(rows, columns, samples, bits, frames)


def is_j2k(tsyntax: str) -> bool:
    return UID(tsyntax) in JPEG2000TransferSyntaxes  # includes the HTJ2K syntaxes


def decode_cost(geometry: PixelGeometry, tsyntax: str, frames: int = 1) -> int:
    """Bytes one decode of ``frames`` frames needs (see the module docstring for the model)."""
    decoded = geometry.frame_bytes * frames
    syntax = UID(tsyntax)
    if not _is_compressed(syntax):
        return decoded
    cost = 3 * decoded  # the codec's output, pydicom's array, and one conversion copy
    if syntax in _INTEGER_CODECS:
        cost += geometry.frame_pixels * geometry.samples * CODEC_SAMPLE_BYTES * frames
    return cost


def _is_compressed(syntax: UID) -> bool:
    try:
        return syntax.is_compressed
    except ValueError:  # not a transfer syntax pydicom knows: assume the worst
        return True


def require_within_bound(cost: int, what: str) -> None:
    """:class:`DecodeTooLarge` when ``cost`` bytes are over ``PACS_MAX_DECODED_MIB``."""
    limit = _config.max_decoded_bytes
    if cost > limit:
        raise DecodeTooLarge(f"decoding {what} would need about {math.ceil(cost / MIB)} MiB, over the "
                             f"{limit // MIB} MiB limit (PACS_MAX_DECODED_MIB); it is kept and served as stored")


def check_frames(geometry: PixelGeometry, tsyntax: str, frames: int = 1) -> int:
    """The cost of decoding ``frames`` frames, refused over the bound; returns the cost."""
    cost = decode_cost(geometry, tsyntax, frames)
    scope = "the whole object" if frames > 1 else "one frame"
    require_within_bound(cost, f"{scope} ({geometry.describe()})")
    return cost


# -- compressed frame headers -----------------------------------------------------------------------


def has_frame_header(tsyntax: str) -> bool:
    """True for the syntaxes :func:`check_codestream` checks (JPEG family and RLE)."""
    return UID(tsyntax) in _INTEGER_CODECS or UID(tsyntax) == RLELossless


def check_codestream(data: bytes, geometry: PixelGeometry, tsyntax: str, number: int = 1) -> None:
    """Refuse a compressed frame whose own header claims more than the dataset (or cannot be read).

    ``number`` is how messages name the frame (1-based for clients; the renderer's own messages are 0-based).

    Codecs allocate from their header, not from Rows/Columns, so checking the dataset alone would let a
    small file with honest-looking attributes inflate to gigabytes.
    """
    syntax = UID(tsyntax)
    if syntax == RLELossless:
        _check_rle(data, geometry, number)
        return
    if syntax not in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes):
        return  # deflate is bounded at ingest (PACS_MAX_INFLATED_BYTES); native data is what it is
    header = codestream_header(data, j2k=is_j2k(syntax))
    if header is None:
        raise DecodeTooLarge(f"the frame header of compressed frame {number} cannot be found; "
                             "refusing to hand it to a decoder")
    if header.width > geometry.columns or header.height > geometry.rows or header.width < 1 or header.height < 1:
        raise DecodeTooLarge(f"compressed frame {number} claims {header.width}x{header.height} pixels but the "
                             f"dataset says {geometry.columns}x{geometry.rows}; refusing to decode")
    if header.components > max(geometry.samples, 1) or header.components < 1:
        raise DecodeTooLarge(f"compressed frame {number} claims {header.components} components but the "
                             f"dataset says {geometry.samples} sample(s) per pixel; refusing to decode")
    if header.precision > max(geometry.bits_allocated, 8) or header.precision < 1:
        raise DecodeTooLarge(f"compressed frame {number} claims {header.precision}-bit samples but the "
                             f"dataset allocates {geometry.bits_allocated} bits; refusing to decode")
    if header.tiles > MAX_J2K_TILES:
        raise DecodeTooLarge(f"compressed frame {number} claims {header.tiles} tiles; refusing to decode")


def codestream_header(data: bytes, *, j2k: bool) -> CodestreamHeader | None:
    """The header of a JPEG 2000 codestream (SIZ, also inside JP2 boxes) or of a JPEG / JPEG-LS
    frame (SOFn, SOF55); None when it cannot be found."""
    head = bytes(data[:HEADER_SCAN_BYTES])
    return _j2k_siz(head) if j2k else _jpeg_sof(head)


def _j2k_siz(data: bytes) -> CodestreamHeader | None:
    at = 0 if data[:4] == b"\xff\x4f\xff\x51" else data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if at < 0 or at + 42 > len(data):
        return None
    siz = data[at + 2:]
    x_siz, y_siz, x_off, y_off, xt_siz, yt_siz, xt_off, yt_off = (
        int.from_bytes(siz[i:i + 4], "big") for i in range(6, 38, 4))
    components = int.from_bytes(siz[38:40], "big")
    if len(siz) < 40 + 3 * components or components == 0:
        return None
    precision = max((siz[40 + 3 * c] & 0x7F) + 1 for c in range(components))
    width, height = x_siz - x_off, y_siz - y_off
    if xt_siz == 0 or yt_siz == 0 or width <= 0 or height <= 0:
        return CodestreamHeader(max(width, 0), max(height, 0), components, precision)
    tiles = math.ceil(max(x_siz - xt_off, 0) / xt_siz) * math.ceil(max(y_siz - yt_off, 0) / yt_siz)
    return CodestreamHeader(width, height, components, precision, tiles)


#: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC); SOF55 (F7) is JPEG-LS.
_SOF_MARKERS: Final = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})


def _jpeg_sof(data: bytes) -> CodestreamHeader | None:
    if data[:2] != b"\xff\xd8":  # SOI
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 10 > len(data):
                return None
            precision = data[pos + 4]
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return CodestreamHeader(width, height, data[pos + 9], precision)
        if marker == 0xDA or length < 2:  # a scan before any frame header, or a broken segment
            return None
        pos += 2 + length
    return None


def _check_rle(data: bytes, geometry: PixelGeometry, number: int) -> None:
    """PS3.5 G.4: a 64-byte header (segment count, 15 offsets); one segment per byte of a sample."""
    if len(data) < 64:
        raise DecodeTooLarge(f"RLE frame {number} is shorter than its 64-byte header")
    segments = int.from_bytes(data[:4], "little")
    expected = geometry.samples * geometry.bytes_per_sample
    if segments != expected:
        raise DecodeTooLarge(f"RLE frame {number} has {segments} segments but {geometry.describe()} needs "
                             f"{expected}; refusing to decode")
    offsets = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "little") for i in range(segments)]
    if offsets[0] != 64 or any(b <= a for a, b in itertools.pairwise(offsets)) or offsets[-1] >= len(data):
        raise DecodeTooLarge(f"RLE frame {number} has an inconsistent segment table; refusing to decode")

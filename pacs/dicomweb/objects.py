"""Reading stored objects for WADO: whole (as stored or converted), one frame, one bulk data value.

Objects are streamed from the store in chunks; only a conversion (decompression) holds one object,
decoded, at a time (spooled to disk past :data:`SPOOL_BYTES`). Frames are read without loading the rest
of the object: the dataset is parsed with its long values deferred, then only the frame's bytes are read
(native pixel data: a seek into the value; encapsulated: the fragments of that frame, found through the
Basic or Extended Offset Table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pacs.dicomweb.metadata import BULK_DATA_THRESHOLD, PIXEL_DATA_TAGS
from pacs.errors import NotFound
from pacs.forwarding.delivery import local_file
from pacs.imaging import limits
from pacs.transcode import Unconvertible, to_uncompressed
from storage import ObjectStore
from storage.base import CHUNK_SIZE

SPOOL_BYTES = 64 * 1024 * 1024  # a converted object is kept in memory up to this size, on disk beyond
_PIXEL_BITS = {0x7FE00008: 32, 0x7FE00009: 64}  # Float / Double Float Pixel Data: fixed sample size


class FrameError(Exception):
    """A frame cannot be read or decoded (corrupt or truncated pixel data); the message says why."""


def stream_stored(store: ObjectStore, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The stored object's bytes as they are, chunk by chunk."""
    with store.open(key) as fp:
        while chunk := fp.read(chunk_size):
            yield chunk


def stream_converted(store: ObjectStore, key: str, target: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The object decompressed (if it was) and written as a Part-10 file in ``target``, chunk by chunk.

    The conversion happens at the first ``next()``, before the first chunk: a caller that takes the first
    chunk before answering turns every failure (:class:`~pacs.transcode.Unconvertible`, including an object
    over the decode bound, or pixel data no decoder can read) into an error status, not a cut body."""
    with local_file(store, key) as path:
        ds = pydicom.dcmread(path)
    try:
        to_uncompressed(ds, UID(target))
    except Unconvertible:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise Unconvertible(f"the pixel data cannot be decoded: {' '.join(str(exc).split())[:200]}") from exc
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as out:
        ds.save_as(out, enforce_file_format=True)
        del ds
        out.seek(0)
        while chunk := out.read(chunk_size):
            yield chunk


@contextlib.contextmanager
def open_seekable(store: ObjectStore, key: str) -> Iterator[BinaryIO]:
    """The stored object as a seekable file (the filesystem store's own file, or a temporary copy)."""
    with local_file(store, key) as path, Path(path).open("rb") as fp:
        yield fp


def read_deferred(fp: BinaryIO) -> Dataset:
    """Parse an object without loading long values (read them later while ``fp`` is open)."""
    ds = pydicom.dcmread(fp, defer_size=BULK_DATA_THRESHOLD, force=True)
    if _syntax(ds) == DeflatedExplicitVRLittleEndian:
        fp.seek(0)  # deferred offsets would point into the inflated copy, not the file: read it whole
        ds = pydicom.dcmread(fp, force=True)
    return ds


def _syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID(str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1"))) if meta is not None else UID(
        "1.2.840.10008.1.2.1")


class FrameReader:
    """Frames of one parsed object (``fp`` must stay open while the reader is used)."""

    def __init__(self, fp: BinaryIO, ds: Dataset | None = None) -> None:
        self.fp = fp
        self.ds = ds if ds is not None else read_deferred(fp)
        self.syntax = _syntax(self.ds)
        tag = next((t for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in self.ds), None)
        if tag is None:
            raise NotFound("the instance has no pixel data (no frames)")
        self.tag: int = tag
        try:
            claimed = max(int(self.ds.get("NumberOfFrames") or 1), 1)
        except (TypeError, ValueError):
            claimed = 1
        self.count = min(claimed, self._frames_the_data_can_hold())

    def _frames_the_data_can_hold(self) -> int:
        """An upper bound on the frame count from the bytes actually present, so a header claiming
        millions of frames cannot make a reader allocate or loop for them."""
        raw = self._raw()
        length = getattr(raw, "length", None)
        if length is None or length == 0xFFFFFFFF:  # encapsulated, undefined length: bounded by the object
            here = self.fp.tell()
            size = self.fp.seek(0, 2)
            self.fp.seek(here)
            return max(size // 8, 1)  # every fragment has at least an 8-byte item header
        if self.syntax.is_encapsulated:
            return max(length // 8, 1)
        try:
            rows, columns = int(self.ds.Rows), int(self.ds.Columns)
            samples, bits = int(self.ds.get("SamplesPerPixel") or 1), int(self.ds.BitsAllocated)
        except (AttributeError, TypeError, ValueError):
            return 1
        frame_bits = rows * columns * samples * bits
        return max((length * 8) // frame_bits, 1) if frame_bits > 0 else 1

    def check(self, number: int) -> int:
        """The zero-based index of 1-based frame ``number``; NotFound when the instance has no such frame."""
        if not 1 <= number <= self.count:
            raise NotFound(f"frame {number} does not exist: the instance has {self.count} frame(s)")
        return number - 1

    def stored(self, index: int) -> bytes:
        """The frame as stored: its compressed bytes, or native little-endian pixel bytes."""
        if self.syntax.is_encapsulated:
            return self._encapsulated(index)
        if not self.syntax.is_little_endian:
            return self.decoded(index)  # big endian: swapped to little endian by decoding
        return self._native(index)

    def check_decodable(self, index: int) -> int:
        """The memory decoding frame ``index`` needs; :class:`~pacs.imaging.limits.DecodeTooLarge` over the
        bound (``PACS_MAX_DECODED_MIB``) or when its compressed header claims more than the dataset."""
        geometry = limits.geometry_of(self.ds)
        cost = limits.check_frames(dataclasses.replace(geometry, frames=1), self.syntax)
        if limits.has_frame_header(self.syntax):
            limits.check_codestream(self._encapsulated(index), geometry, self.syntax, index + 1)
        return cost

    def decoded(self, index: int) -> bytes:
        """The frame decompressed, exactly as it is in the object that ``to_uncompressed`` makes.

        Raises DecodeTooLarge (checked before the decoder runs) and FrameError."""
        cost = self.check_decodable(index)
        try:
            with limits.reserve(cost):
                decoder = get_decoder(self.syntax)
                # pydicom annotates **kwargs as DecodeOptions where it means Unpack[DecodeOptions]
                arr, _ = decoder.as_array(self.ds, index=index, as_rgb=True)  # type: ignore[arg-type]
        except limits.DecodeBusy as exc:
            raise FrameError(str(exc)) from None
        except Exception as exc:
            raise FrameError(f"frame {index + 1} cannot be decoded: {' '.join(str(exc).split())[:200]}") from exc
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return arr.tobytes()

    def _raw(self) -> RawDataElement | DataElement:
        return self.ds.get_item(self.tag, keep_deferred=True)

    def _encapsulated(self, index: int) -> bytes:
        extended = None
        if "ExtendedOffsetTable" in self.ds and "ExtendedOffsetTableLengths" in self.ds:
            extended = (self.ds.ExtendedOffsetTable, self.ds.ExtendedOffsetTableLengths)
        raw = self._raw()
        try:
            if isinstance(raw, RawDataElement) and raw.value is None:
                self.fp.seek(raw.value_tell)
                return get_frame(self.fp, index, number_of_frames=self.count, extended_offsets=extended)
            return get_frame(self.ds[self.tag].value, index, number_of_frames=self.count, extended_offsets=extended)
        except Exception as exc:
            raise FrameError(f"frame {index + 1} cannot be located in the encapsulated pixel data: "
                             f"{' '.join(str(exc).split())[:200]}") from exc

    def _native(self, index: int) -> bytes:
        ds = self.ds
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        bits = _PIXEL_BITS.get(self.tag) or int(ds.BitsAllocated)
        start_bit, length_bits = index * pixels * bits, pixels * bits
        first, last = start_bit // 8, (start_bit + length_bits + 7) // 8
        raw = self._raw()
        if isinstance(raw, RawDataElement) and raw.value is None:
            if last > raw.length:
                raise FrameError(f"frame {index + 1} lies past the end of the pixel data")
            self.fp.seek(raw.value_tell + first)
            data = self.fp.read(last - first)
        else:
            data = bytes(self.ds[self.tag].value)[first:last]
        if len(data) < last - first:
            raise FrameError(f"frame {index + 1} is truncated")
        if bits == 1 and start_bit % 8:  # packed bits: realign the frame on a byte boundary
            unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            offset = start_bit % 8
            data = np.packbits(unpacked[offset:offset + length_bits], bitorder="little").tobytes()
        return data


def bulk_value(ds: Dataset, path: tuple[int, ...]) -> tuple[bytes, str]:
    """The value of the element at a bulk data tag path (tag, item index, tag, ...) and its VR.

    NotFound when the path names nothing in the object.
    """
    current: Any = ds
    for depth, step in enumerate(path):
        if depth % 2 == 0:
            if not isinstance(current, Dataset) or step not in current:
                raise NotFound("no bulk data at this path")
            elem = current[step]
            if depth == len(path) - 1:
                value = elem.value
                if value is None:
                    return b"", str(elem.VR)
                if isinstance(value, str):
                    return value.encode("utf-8"), str(elem.VR)
                return bytes(value), str(elem.VR)
            current = elem.value
        else:
            if not isinstance(current, list | pydicom.Sequence) or not 0 <= step < len(current):
                raise NotFound("no bulk data at this path")
            current = current[step]
    raise NotFound("no bulk data at this path")


def is_pixel_path(path: tuple[int, ...]) -> bool:
    return len(path) == 1 and path[0] in PIXEL_DATA_TAGS

"""A frame of a native object located without pydicom (pacs.dicomweb.native_frames) is the frame pydicom's reader
(pacs.dicomweb.objects.FrameReader) finds, for every layout it takes on; every other layout is left to that reader."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from pacs.dicomweb.native_frames import native_frames
from pacs.dicomweb.objects import FrameReader
from pacs.errors import NotFound
from tests.support.datasets import make_dataset, to_bytes


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _object(syntax: str | None = None, undefined_sequences: bool = False, **overrides: object) -> bytes:
    ds = make_dataset(**overrides)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.ReferencedImageSequence = Sequence([_item(ReferencedSOPInstanceUID="1.2.3", ReferencedFrameNumber=1),
                                           _item(ReferencedSOPInstanceUID="1.2.4")])
    ds.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence = Sequence([_item(CodeValue="121311")])
    if undefined_sequences:
        ds["ReferencedImageSequence"].is_undefined_length = True
        ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
        ds.ReferencedImageSequence[0]["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    return to_bytes(ds)


LAYOUTS: dict[str, dict[str, Any]] = {
    "8-bit, one frame": {},
    "16-bit, 3 frames": {"Rows": 4, "Columns": 6, "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11,
                         "NumberOfFrames": 3, "PixelData": np.arange(72, dtype=np.uint16).tobytes()},
    "RGB, 2 frames": {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0,
                      "Rows": 2, "Columns": 3, "NumberOfFrames": 2,
                      "PixelData": np.arange(36, dtype=np.uint8).tobytes()},
    "claims more frames than it holds": {"NumberOfFrames": 9},
    "an odd byte past the frames": {"Rows": 3, "Columns": 3, "PixelData": bytes(range(9)) + b"\0"},
}


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_frame_is_the_one_pydicom_finds(layout: str, undefined: bool, syntax: str | None) -> None:
    data = _object(syntax, undefined, **LAYOUTS[layout])
    native = native_frames(io.BytesIO(data))
    assert native is not None
    reader = FrameReader(io.BytesIO(data))
    assert native.count == reader.count
    for number in range(1, reader.count + 1):
        assert native.check(number) == reader.check(number)
        assert native.stored(number - 1) == reader.stored(number - 1)
    for number in (0, reader.count + 1):
        with pytest.raises(NotFound):
            native.check(number)


def test_other_layouts_are_left_to_pydicom() -> None:
    frame = bytes(256)
    left = {
        "encapsulated": _encapsulated(frame),
        "big endian": _object(ExplicitVRBigEndian),
        "bit-packed": _object(BitsAllocated=1, BitsStored=1, HighBit=0, PixelData=bytes(32)),
        "no pixel data": to_bytes(_without_pixels()),
        "not Part 10": b"\0" * 200,
        "truncated header": _object()[:300],
        "elements before the pixel data over the bound": _object(ImageComments="x" * 300_000),
    }
    for why, data in left.items():
        assert native_frames(io.BytesIO(data)) is None, why


def test_a_frame_past_the_end_of_a_short_object_is_left_to_pydicom() -> None:
    data = _object(NumberOfFrames=2, PixelData=bytes(512))[:-100]  # the second frame is cut
    native = native_frames(io.BytesIO(data))
    assert native is not None and native.count == 2  # as the length in the header says
    assert native.stored(0) == bytes(256)
    assert native.stored(1) is None  # FrameReader then says the frame is truncated


def _encapsulated(frame: bytes) -> bytes:
    ds = make_dataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def _without_pixels() -> Dataset:
    ds = make_dataset()
    del ds.PixelData
    return ds

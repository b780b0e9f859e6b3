"""Decompression bombs: tiny, valid-looking DICOM objects whose headers claim a huge image.

Each bomb is a real Part-10 file (valid File Meta, Secondary Capture attributes) around a minimal
compressed frame made from a tiny real image whose codestream header is then rewritten to claim the
same huge size as Rows/Columns (so the dataset and the codestream agree: the bound must refuse the
claim itself, not a mismatch). A codec given one of these allocates for the claim: a 16000x16000
JPEG 2000 frame costs OpenJPEG about 1 GiB per component before it finds the data missing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless, generate_uid

from tests.support.datasets import make_dataset, to_bytes

KINDS = ("j2k", "jls", "jpeg", "rle")
SYNTAX: dict[str, UID] = {"j2k": JPEG2000Lossless, "jls": JPEGLSLossless, "jpeg": JPEGBaseline8Bit,
                          "rle": RLELossless}


@dataclass(frozen=True)
class Bomb:
    kind: str
    side: int
    data: bytes  # the Part-10 file
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax: str


def j2k_codestream(side: int, bits: int = 16) -> bytes:
    """A 64x64 lossless J2K codestream whose SIZ claims ``side`` x ``side`` in one tile."""
    import openjpeg

    small = np.zeros((64, 64), dtype=np.uint16 if bits > 8 else np.uint8)
    stream = bytearray(openjpeg.encode(small, bits_stored=bits))
    assert stream[:4] == b"\xff\x4f\xff\x51"
    for offset in (8, 12, 24, 28):  # Xsiz, Ysiz, XTsiz, YTsiz (one tile of the claimed size)
        stream[offset:offset + 4] = side.to_bytes(4, "big")
    return bytes(stream)


def jpeg_codestream(side: int) -> bytes:
    """An 8x8 baseline JPEG whose SOF0 claims ``side`` x ``side`` (8-bit, one component)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, format="JPEG", quality=90)
    return _patch_sof(bytearray(buffer.getvalue()), 0xC0, side)


def jls_codestream(side: int, bits: int = 16) -> bytes:
    """A 16x16 JPEG-LS codestream whose SOF55 claims ``side`` x ``side``."""
    import jpeg_ls

    small = np.zeros((16, 16), dtype=np.uint16 if bits > 8 else np.uint8)
    return _patch_sof(bytearray(jpeg_ls.encode(small).tobytes()), 0xF7, side)


def rle_frame(samples_bytes: int) -> bytes:
    """An RLE frame (PS3.5 G) with one tiny segment per byte plane: each a single replicate run."""
    header = bytearray(64)
    header[0:4] = samples_bytes.to_bytes(4, "little")
    segment = bytes([0x81, 0x00])  # replicate 0x00 128 times
    for i in range(samples_bytes):
        header[4 + 4 * i:8 + 4 * i] = (64 + 2 * i).to_bytes(4, "little")
    return bytes(header) + segment * samples_bytes


def _patch_sof(stream: bytearray, marker: int, side: int) -> bytes:
    at = stream.find(bytes([0xFF, marker]))
    assert at > 0, f"no 0xFF{marker:02X} marker"
    stream[at + 5:at + 7] = side.to_bytes(2, "big")  # Y
    stream[at + 7:at + 9] = side.to_bytes(2, "big")  # X
    return bytes(stream)


def make_bomb(kind: str, side: int, *, study_uid: str | None = None, patient_id: str = "BOMB") -> Bomb:
    """A bomb of ``kind`` (``j2k``, ``jls``, ``jpeg``, ``rle``) claiming ``side`` x ``side`` pixels."""
    bits = 8 if kind == "jpeg" else 16
    if kind == "j2k":
        frame = j2k_codestream(side, bits)
    elif kind == "jls":
        frame = jls_codestream(side, bits)
    elif kind == "jpeg":
        frame = jpeg_codestream(side)
    elif kind == "rle":
        frame = rle_frame(bits // 8)
    else:
        raise ValueError(kind)
    ds = make_dataset(Rows=side, Columns=side, BitsAllocated=bits, BitsStored=bits, HighBit=bits - 1,
                      PatientID=patient_id, PatientName=f"BOMB^{kind.upper()}^{side}",
                      StudyInstanceUID=study_uid or generate_uid())
    return _encapsulated(ds, kind, side, frame)


def _encapsulated(ds: Dataset, kind: str, side: int, frame: bytes) -> Bomb:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = SYNTAX[kind]
    if kind == "jpeg":
        ds.LossyImageCompression = "01"
    return Bomb(kind, side, to_bytes(ds), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID), str(SYNTAX[kind]))


def make_large_j2k(side: int = 8000, *, study_uid: str | None = None) -> Bomb:
    """A legitimate (honest) ``side`` x ``side`` 12-bit JPEG 2000 image: a diagonal gradient, lossy
    (a few hundred KB). Rendering it must work, reduced, without holding it decoded in float64."""
    import openjpeg

    ramp = (np.add.outer(np.arange(side), np.arange(side)) * (4095 / (2 * side))).astype(np.uint16)
    frame = openjpeg.encode(ramp, bits_stored=12, compression_ratios=[50])
    del ramp
    ds = make_dataset(Rows=side, Columns=side, BitsAllocated=16, BitsStored=12, HighBit=11,
                      PatientID="LARGE", PatientName="LARGE^J2K", StudyInstanceUID=study_uid or generate_uid())
    return _encapsulated(ds, "j2k", side, frame)

"""Small, valid DICOM objects built in tests (with any attribute overridden)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def make_dataset(**overrides: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "P-001"
    ds.StudyDate = "20261128"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype=np.uint8)).tobytes()
    for key, value in overrides.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_instance(**overrides: Any) -> bytes:
    return to_bytes(make_dataset(**overrides))


def dataset_bytes(part10: bytes) -> bytes:
    """The dataset part of a Part-10 file: everything after the File Meta Information."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(part10)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return part10[fh.tell():]


def random_uid(rng: random.Random, length: int) -> str:
    """A conformant UID of ``length`` characters (1-64): digit components without leading zeros, joined by dots."""
    uid = rng.choice("123456789")
    while len(uid) < length:
        if uid[-1] != "." and len(uid) < length - 1 and rng.random() < 0.25:
            uid += "."
        else:
            uid += rng.choice("123456789" if uid[-1] == "." else "0123456789")
    return uid

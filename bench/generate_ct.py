"""Generate a synthetic CT series (a phantom, 16-bit, one file per slice) without holding it in memory.

    python -m bench.generate_ct OUT_DIR --slices 500 --size 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _phantom(size: int, z: float) -> np.ndarray:
    """A body-like ellipse with bone ring and a few organs whose shapes change along z (HU values)."""
    y, x = np.mgrid[-1:1:complex(size), -1:1:complex(size)]
    img = np.full((size, size), -1000, dtype=np.int16)  # air
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    img[body] = 40  # soft tissue
    ring = ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1) & ((x / 0.74) ** 2 + (y / 0.54) ** 2 > 1)
    img[ring] = 700  # bone
    r = 0.15 + 0.1 * np.sin(np.pi * z)
    img[((x - 0.3) ** 2 + y**2) < r**2] = -800  # lung
    img[((x + 0.3) ** 2 + y**2) < r**2] = -800
    img[(x**2 + (y + 0.2) ** 2) < 0.01] = 250  # contrast vessel
    return img


def write_ct_series(out_dir: Path, slices: int = 100, size: int = 512, *, patient_name: str = "PHANTOM^CT",
                    patient_id: str = "PH0001", study_uid: str | None = None,
                    charset: str = "ISO_IR 192", accession_number: str = "ACC-PH0001") -> list[Path]:
    """Write ``slices`` CT images of one series to ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    paths = []
    for i in range(slices):
        ds = Dataset()
        ds.SpecificCharacterSet = charset
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261128"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber = accession_number
        ds.StudyID = "1"
        ds.StudyDescription = "CT phantom"
        ds.SeriesDescription = f"Axial {size}x{size}"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.7, 0.7]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = _phantom(size, i / max(slices - 1, 1)).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    paths = write_ct_series(args.out_dir, args.slices, args.size)
    print(f"wrote {len(paths)} slices to {args.out_dir}")


if __name__ == "__main__":
    main()

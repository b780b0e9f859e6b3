"""pydicom's own test files, read from the installed package (no downloads): the corpus several suites send."""

from __future__ import annotations

from pathlib import Path

import pydicom


def corpus_files() -> list[Path]:
    """Every file pydicom ships as test data."""
    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def corpus_dicom_files() -> list[Path]:
    """The corpus files that look like DICOM (a .dcm name or the DICM prefix)."""
    out = []
    for path in corpus_files():
        with path.open("rb") as fh:
            head = fh.read(132)
        if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
            out.append(path)
    return out

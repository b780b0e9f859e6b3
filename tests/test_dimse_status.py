"""The one DIMSE status table (pacs.dimse_status): every code is one the standard (as pynetdicom knows it)
gives the category its name says, and no DIMSE service declares a status code of its own."""

from __future__ import annotations

import re
from pathlib import Path

from pynetdicom.status import Status, code_to_category

from pacs import dimse_status

ROOT = Path(__file__).resolve().parent.parent


def _codes() -> dict[str, int]:
    return {name: value for name, value in vars(dimse_status).items()
            if name.isupper() and isinstance(value, int) and not isinstance(value, bool)}


def test_names_reuse_pynetdicom_and_categories_match() -> None:
    codes = _codes()
    for name in ("SUCCESS", "CANCEL", "PENDING", "MOVE_DESTINATION_UNKNOWN"):
        assert codes[name] == getattr(Status, name) and type(codes[name]) is int
    for name, code in codes.items():
        category = code_to_category(code)
        if name == "SUCCESS":
            assert category == "Success"
        elif name == "CANCEL":
            assert category == "Cancel"
        elif name.startswith("PENDING"):
            assert category == "Pending", name
        elif name.startswith("WARNING"):
            assert category == "Warning", name
        else:
            assert category == "Failure", (name, hex(code))


def test_failure_builder() -> None:
    ds = dimse_status.failure(dimse_status.OUT_OF_RESOURCES, "a\\b\nc" + "x" * 100)
    assert ds.Status == 0xA700 and ds.ErrorComment == "a b c" + "x" * 59
    assert "ErrorComment" not in dimse_status.failure(dimse_status.SUCCESS)


def test_no_service_declares_its_own_status_codes() -> None:
    """A status code assigned to a name, or a failure builder, outside pacs/dimse_status.py fails (the DIMSE
    services, the C-STORE/STOW statuses, the storage commitment report's and STOW-RS's Failure Reasons)."""
    declared = re.compile(r"^[A-Z_]+\s*(:[^=]*)?=\s*0x[0-9A-Fa-f]{4}\b|^def _?(failure|status)\(", re.M)
    offenders = []
    for path in [*(ROOT / "dicom_scp").glob("*.py"), ROOT / "pacs" / "ingest" / "statuses.py",
                 *(ROOT / "pacs" / "commitment").glob("*.py"), ROOT / "pacs" / "dicomweb" / "stow.py"]:
        offenders += [f"{path.name}: {m.group(0)}" for m in declared.finditer(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders

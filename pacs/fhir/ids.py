"""Stable FHIR logical ids (``[A-Za-z0-9-.]{1,64}``) derived from DICOM identity, without a lookup table.

- ImagingStudy: the Study Instance UID itself (digits and dots, at most 64 characters: a valid id).
- Patient: the Patient ID and Issuer of Patient ID, encoded. ``p`` + base64 of ``patient_id`` (plus
  ``NUL issuer`` when there is an issuer) in the 64-letter alphabet FHIR ids allow (``-`` and ``.`` for
  ``+`` and ``/``, no padding), when that fits in 64 characters; otherwise ``h`` + a SHA-256 digest of
  the same bytes + the base64 of the Patient ID's first characters, which :func:`decode_patient_id`
  returns as a prefix to search by (the caller then keeps the patient whose digest matches).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from storage.keys import is_valid_uid

_TO_FHIR = bytes.maketrans(b"+/", b"-.")
_FROM_FHIR = bytes.maketrans(b"-.", b"+/")
_SHORT_MAX = 47  # bytes whose base64 (63 characters) fits after the one-letter prefix
_DIGEST_BYTES = 16  # 22 characters
_PREFIX_BYTES = 30  # 40 characters


@dataclass(frozen=True)
class PatientRef:
    """What a Patient id names: exactly (``digest`` empty) or by a Patient ID prefix and a digest."""

    patient_id: str
    issuer: str = ""
    digest: str = ""  # long form: hex SHA-256 prefix of the identity; patient_id is then a prefix

    @property
    def exact(self) -> bool:
        return not self.digest

    def matches(self, patient_id: str, issuer: str) -> bool:
        if self.exact:
            return (patient_id, issuer) == (self.patient_id, self.issuer)
        return _digest(_identity(patient_id, issuer)) == self.digest


def study_fhir_id(study_instance_uid: str) -> str:
    return study_instance_uid


def study_uid_from_id(fhir_id: str) -> str | None:
    return fhir_id if is_valid_uid(fhir_id) else None


def patient_fhir_id(patient_id: str, issuer: str = "") -> str:
    identity = _identity(patient_id, issuer)
    if len(identity) <= _SHORT_MAX:
        return "p" + _b64(identity)
    prefix = _prefix(patient_id)
    return "h" + _b64(bytes.fromhex(_digest(identity))) + _b64(prefix.encode("utf-8"))


def decode_patient_id(fhir_id: str) -> PatientRef | None:
    """What a Patient id names; None for an id we never made."""
    if not 1 <= len(fhir_id) <= 64 or not all(c.isascii() and (c.isalnum() or c in "-.") for c in fhir_id):
        return None
    try:
        if fhir_id[0] == "p":
            patient_id, _, issuer = _unb64(fhir_id[1:]).decode("utf-8").partition("\x00")
            return PatientRef(patient_id, issuer) if patient_fhir_id(patient_id, issuer) == fhir_id else None
        if fhir_id[0] == "h" and len(fhir_id) >= 23:
            digest = _unb64(fhir_id[1:23]).hex()
            prefix = _unb64(fhir_id[23:]).decode("utf-8")
            return PatientRef(prefix, digest=digest) if len(digest) == 2 * _DIGEST_BYTES else None
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def _identity(patient_id: str, issuer: str) -> bytes:
    return patient_id.encode("utf-8") + (b"\x00" + issuer.encode("utf-8") if issuer else b"")


def _digest(identity: bytes) -> str:
    return hashlib.sha256(identity).digest()[:_DIGEST_BYTES].hex()


def _prefix(patient_id: str) -> str:
    out = ""
    for ch in patient_id:
        if len((out + ch).encode("utf-8")) > _PREFIX_BYTES:
            break
        out += ch
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).translate(_TO_FHIR).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    raw = text.encode("ascii").translate(_FROM_FHIR)
    return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)

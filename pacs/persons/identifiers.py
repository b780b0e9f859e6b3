"""Which national identifiers a received dataset carries.

The archive is told which Issuer of Patient ID values mean a national identifier (``national_id_issuers``,
e.g. Vietnam's citizen ID "CCCD" and social-insurance number "BHXH"). A dataset carries one:

- in its Patient ID, when its Issuer of Patient ID (0010,0021) is one of them;
- in an item of Other Patient IDs Sequence (0010,1002) whose Issuer of Patient ID is one of them;
- in ``national_id_attribute`` (``SYSTEM:ATTRIBUTE``), an attribute whose value is that system's identifier.

Values are normalised (white space removed, letters upper-cased, leading zeros kept). Names and birth dates
are never identifiers: two records are one person only through a national identifier.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

#: one national identifier: (system, normalised value)
NationalId = tuple[str, str]

_HEX_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_SPACE = re.compile(r"\s+")
_MAX = 64  # the columns' width (person_identifier.system / value)


def normalise_system(system: str) -> str:
    return _SPACE.sub("", system).upper()[:_MAX]


def normalise_value(value: str) -> str:
    """A national ID as compared and stored: no white space anywhere, upper case, leading zeros kept."""
    return _SPACE.sub("", value).upper()


def attribute_tag(name: str) -> BaseTag:
    """A DICOM keyword or ``ggggeeee`` / ``(gggg,eeee)`` tag; ValueError for anything else."""
    name = name.strip()
    match = _HEX_TAG.match(name)
    if match:
        return Tag(int(match.group(1) + match.group(2), 16))
    tag = tag_for_keyword(name)
    if tag is None:
        raise ValueError(f"unknown DICOM attribute {name[:40]!r} (a keyword or 8 hexadecimal digits)")
    return Tag(tag)


@dataclass(frozen=True)
class NationalIdPolicy:
    """What the settings say a national identifier is; ``read`` finds them in one received object."""

    systems: frozenset[str]
    attribute: BaseTag | None = None
    attribute_system: str = ""

    @classmethod
    def from_settings(cls, issuers: Iterable[str], attribute: str = "") -> NationalIdPolicy | None:
        """None when no issuer is configured (the feature is off: ingest does nothing extra)."""
        systems = frozenset(s for s in (normalise_system(i) for i in issuers) if s)
        if not systems:
            return None
        tag, system = parse_attribute_setting(attribute, systems)
        return cls(systems, tag, system)

    def read(self, data: bytes) -> tuple[NationalId, ...]:
        """The national identifiers in a stored object's bytes (Part 10), sorted; () when it carries none.

        Only the patient attributes are parsed again (up to the pixel data, values read lazily).
        """
        wanted = [Tag("PatientID"), Tag("IssuerOfPatientID"), Tag("OtherPatientIDsSequence"),
                  Tag("SpecificCharacterSet")]
        if self.attribute is not None:
            wanted.append(self.attribute)
        try:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=wanted, force=True)
        except Exception:  # the object was accepted already: an unreadable extra attribute is no identifier
            return ()
        return self.from_dataset(ds)

    def from_dataset(self, ds: Dataset) -> tuple[NationalId, ...]:
        found: set[NationalId] = set()
        self._pair(found, ds)
        try:
            items = list(ds.get("OtherPatientIDsSequence") or [])
        except Exception:
            items = []
        for item in items:
            self._pair(found, item)
        if self.attribute is not None:
            value = _text(ds, self.attribute)
            if value:
                self._add(found, self.attribute_system, value)
        return tuple(sorted(found))

    def _pair(self, found: set[NationalId], item: Dataset) -> None:
        issuer = normalise_system(_text(item, Tag("IssuerOfPatientID")))
        if issuer in self.systems:
            self._add(found, issuer, _text(item, Tag("PatientID")))

    @staticmethod
    def _add(found: set[NationalId], system: str, raw: str) -> None:
        value = normalise_value(raw)
        if value and len(value) <= _MAX and value.isprintable() and "\\" not in value:
            found.add((system, value))


def parse_attribute_setting(setting: str, systems: frozenset[str]) -> tuple[BaseTag | None, str]:
    """``SYSTEM:ATTRIBUTE`` → (tag, system); ("", ...) → (None, ""). ValueError when malformed."""
    setting = setting.strip()
    if not setting:
        return None, ""
    system, sep, attribute = setting.partition(":")
    if not sep or not attribute.strip():
        raise ValueError(f"national_id_attribute {setting[:60]!r}: SYSTEM:ATTRIBUTE, e.g. "
                         "'BHXH:InsurancePlanIdentification'")
    system = normalise_system(system)
    if system not in systems:
        raise ValueError(f"national_id_attribute: system {system!r} is not one of national_id_issuers")
    return attribute_tag(attribute), system


def encode(ids: Iterable[NationalId]) -> str:
    """The ``patient.national_ids`` form: ``SYSTEM:value`` sorted, backslash-joined."""
    return "\\".join(f"{s}:{v}" for s, v in sorted(set(ids)))


def decode(text: str) -> tuple[NationalId, ...]:
    out: set[NationalId] = set()
    for part in text.split("\\"):
        system, sep, value = part.partition(":")
        if sep and system and value:
            out.add((system, value))
    return tuple(sorted(out))


def masked(value: str) -> str:
    """A national ID for logs and the audit trail: its last four characters only."""
    return ("*" * max(0, len(value) - 4)) + value[-4:]


def _text(ds: Dataset, tag: BaseTag) -> str:
    try:
        element = ds.get(tag)
        if element is None or element.VR == "SQ":
            return ""
        value = element.value
        if isinstance(value, bytes):  # an undecoded value (private tag, unknown VR): identifiers are ASCII
            return value.decode("ascii", errors="replace").strip("\x00 ")
        if isinstance(value, list | tuple):
            return str(value[0]) if value else ""
        return str(value).strip("\x00 ")
    except Exception:
        return ""

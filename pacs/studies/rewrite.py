"""A corrected copy of one stored object: a few attributes set, everything else as it was.

The transfer syntax is kept and pixel data is copied as stored (never decoded). When a new value needs more than
the dataset's character set can hold, the dataset is re-labelled ISO_IR 192 (UTF-8) after every text element was
decoded with the character set it was written in (and the ``assume_utf8_for_latin1`` rule, :mod:`pacs.charset`),
so the other texts are re-encoded, not re-interpreted.

The values replaced are recorded in the object itself, as DICOM does it (PS3.3 C.12.1.1.9): an item of the
Original Attributes Sequence (0400,0561) with the old values (Modified Attributes Sequence), when, by which system,
and the reason ``CORRECT``. :func:`correction_of` reads it back (for a rebuild of the index from the store).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs.charset import UTF8_LABEL, assumes_utf8, charset_labels, decode_dataset_text, text_of


def current_values(ds: Dataset, keywords: list[str], assume_utf8_for_latin1: bool) -> dict[str, str]:
    """The dataset's text of each keyword ('' when absent), decoded as ingest decodes it."""
    utf8 = assumes_utf8(ds, assume_utf8_for_latin1)
    return {keyword: text_of(ds, keyword, utf8) for keyword in keywords}


REASON_CORRECT = "CORRECT"
STUDY_FIELDS = {"AccessionNumber": "accession_number", "StudyDescription": "study_description"}


def rewrite(data: bytes, values: dict[str, str], *, assume_utf8_for_latin1: bool = True,
            modifying_system: str = "PACS") -> bytes | None:
    """``data`` (a Part-10 object) with each DICOM keyword of ``values`` set to its value ('' empties an attribute
    that is there; an absent one stays absent), or None when the object already carries every value (a
    correction run again: nothing to write)."""
    ds = dcmread(io.BytesIO(data))
    before = current_values(ds, list(values), assume_utf8_for_latin1)
    if before == values:
        return None
    if any(not value.isascii() for value in values.values()) and charset_labels(ds) != [UTF8_LABEL]:
        decode_dataset_text(ds, assume_utf8_for_latin1)
        for _ in ds.iterall():  # every raw element decoded now, with the character set it was written in
            pass
        ds.SpecificCharacterSet = UTF8_LABEL
    original = Dataset()
    for keyword, value in values.items():
        if before[keyword] != value:  # one that was not there is recorded empty
            setattr(original, keyword, before[keyword])
        if value or keyword in ds:
            setattr(ds, keyword, value)
    _record_original(ds, original, modifying_system)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _record_original(ds: Dataset, original: Dataset, modifying_system: str) -> None:
    item = Dataset()
    item.AttributeModificationDateTime = datetime.now(UTC).strftime("%Y%m%d%H%M%S.%f+0000")
    item.ModifyingSystem = modifying_system[:64]
    item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = REASON_CORRECT
    item.ModifiedAttributesSequence = Sequence([original])
    history = list(ds.OriginalAttributesSequence) if "OriginalAttributesSequence" in ds else []
    ds.OriginalAttributesSequence = Sequence([*history, item])


def correction_of(ds: Dataset, modifying_system: str = "PACS") -> tuple[str, ...] | None:
    """The study fields (index column names) a correction by this archive (``modifying_system``) set in ``ds``, as
    :class:`pacs.ingest.source.Correction` names them — () when only patient attributes or the study changed —,
    or None when the object is no corrected version of this archive's (its newest Original Attributes item)."""
    history = ds.get("OriginalAttributesSequence") or []
    if not history:
        return None
    item = history[-1]
    if str(item.get("ReasonForTheAttributeModification", "")) != REASON_CORRECT \
            or str(item.get("ModifyingSystem", "")) != modifying_system:
        return None
    modified = item.get("ModifiedAttributesSequence") or []
    changed = {element.keyword for element in modified[0]} if modified else set()
    return tuple(field for keyword, field in STUDY_FIELDS.items() if keyword in changed)

"""UIDs that pynetdicom has validated once are not validated again on every association.

pynetdicom's ``set_uid`` (``pynetdicom.utils``) validates each UID it is given: pydicom's ``UID.__new__``
(a regular expression under ``reading_validation_mode``), pynetdicom's own UI validator (``UID()`` again,
character by character) and ``UID.is_valid`` (the expression again). An A-ASSOCIATE-RQ from DCMTK's
``storescu`` proposes 128 contexts with 192 transfer syntaxes in all, and every UID goes through
``set_uid`` several times (decoding the PDU item, converting it to a primitive, negotiating, encoding the
A-ASSOCIATE-AC): ~3 ms of CPU per association on the 2-core reference machine (py-spy), of the ~47 ms a
one-image association cost (bench/README.md).

:func:`install` wraps ``set_uid`` where pynetdicom's modules imported it with :func:`set_uid`, which
returns the UID it returned before for the same ``str`` or ``bytes`` value, when that UID was conformant
(``UID.is_valid``: at most 64 characters, digits and dots, no leading zero): such a value passes every
validation pynetdicom and pydicom make, in every mode, and logs nothing, so the result is the same UID.
Anything else (an empty, non-conformant or invalid value, a UID carrying a private transfer syntax's
encoding, a value past the memo's bound) takes pynetdicom's own path: its errors and warnings are
unchanged. The memo is bounded (:data:`MAX_ENTRIES`) and keeps only values that are exactly their UID (at most 64
characters each): a peer sending ever new or padded UIDs makes it stop growing, not grow without end.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

from pydicom.uid import UID
from pynetdicom import pdu_items, pdu_primitives, presentation, utils

MAX_ENTRIES = 8192
# Association negotiation only (PDU items and primitives, presentation contexts): the UIDs there are SOP classes
# and transfer syntaxes, a few hundred that come back on every association. Not the DIMSE messages, whose SOP
# Instance UIDs never come back and would fill the memo with one-time values.
_MODULES: tuple[ModuleType, ...] = (pdu_items, pdu_primitives, presentation)
_original_set_uid = utils.set_uid
_known: dict[str | bytes, UID] = {}
_install_lock = threading.Lock()


def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
            validate: bool = True) -> UID | None:
    """``pynetdicom.utils.set_uid`` with conformant UIDs remembered (see the module docstring)."""
    kind = type(value)
    memo = kind is str or kind is bytes or (kind is UID and not value.__dict__)
    if memo:
        known = _known.get(value)
        if known is not None and not known.__dict__:  # nothing set on a shared UID since (a private encoding)
            return known
    uid = _original_set_uid(value, name, allow_empty, allow_none, validate)
    if memo and uid and len(_known) < MAX_ENTRIES and not uid.__dict__ and uid.is_valid and _canonical(value, uid):
        _known[str(value) if kind is UID else value] = uid
    return uid


def _canonical(value: str | bytes, uid: UID) -> bool:
    """Only a value that is exactly its UID is remembered: a padded one (``"1.2.3 " + 60,000 spaces``, stripped by
    pydicom) would pin its whole length in the memo, and its first-time warning would not be logged again."""
    return value == uid if isinstance(value, str) else value == uid.encode("ascii")


def install() -> None:
    """Use :func:`set_uid` in pynetdicom's modules (idempotent). A module whose ``set_uid`` is not pynetdicom's
    (a later pynetdicom, another patch) is left alone: it only loses the memo."""
    with _install_lock:
        for module in _MODULES:
            current = getattr(module, "set_uid", None)
            if current is _original_set_uid:
                module.set_uid = set_uid  # type: ignore[attr-defined]

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

``PresentationContext.add_transfer_syntax`` does not go through ``set_uid``: it makes ``UID(syntax)`` itself (pydicom's
regular expression), then pynetdicom's validator, ``is_valid`` and ``is_transfer_syntax``, for each of the 192
transfer syntaxes of storescu's A-ASSOCIATE-RQ as it is decoded (~2 ms of CPU per association, py-spy).
:func:`add_transfer_syntax` remembers, in the same bounded way, the values that took that path without a word:
conformant UIDs that are transfer syntaxes or private ones (pynetdicom warns about any other UID there); for such a
value it appends the remembered UID unless the context has it already, as pynetdicom does, and anything else
takes pynetdicom's own path.
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
_original_add_transfer_syntax = presentation.PresentationContext.add_transfer_syntax
_known: dict[str | bytes, UID] = {}
_known_syntaxes: dict[str | bytes, UID] = {}
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


def add_transfer_syntax(self: presentation.PresentationContext, syntax: Any) -> None:
    """``PresentationContext.add_transfer_syntax`` with conformant transfer syntaxes remembered (module docstring)."""
    kind = type(syntax)
    memo = kind is str or kind is bytes or (kind is UID and not syntax.__dict__)  # decoded PDU items hold UIDs
    if memo:
        known = _known_syntaxes.get(syntax)
        if known is not None and not known.__dict__:  # nothing set on a shared UID since (a private encoding)
            if known not in self._transfer_syntax:
                self._transfer_syntax.append(known)
            return
    _original_add_transfer_syntax(self, syntax)
    if memo and len(_known_syntaxes) < MAX_ENTRIES:
        uid = _syntax_uid(str(syntax) if kind is UID else syntax)
        if uid is not None:
            _known_syntaxes[str(syntax) if kind is UID else syntax] = uid


def _syntax_uid(value: str | bytes) -> UID | None:
    """The UID pynetdicom made of ``value`` when that took no warning or error: exactly a conformant UID that is a
    transfer syntax or a private one; else None (not remembered)."""
    try:
        text = value if isinstance(value, str) else value.decode("ascii")
        uid = UID(text)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if uid != text or uid.__dict__ or not uid.is_valid or not (uid.is_transfer_syntax or uid.is_private):
        return None
    return uid


def install() -> None:
    """Use :func:`set_uid` in pynetdicom's modules and :func:`add_transfer_syntax` in its presentation contexts
    (idempotent). One that is not pynetdicom's (a later pynetdicom, another patch) is left alone: it only loses the
    memo."""
    with _install_lock:
        for module in _MODULES:
            current = getattr(module, "set_uid", None)
            if current is _original_set_uid:
                module.set_uid = set_uid  # type: ignore[attr-defined]
        context = presentation.PresentationContext
        if context.add_transfer_syntax is _original_add_transfer_syntax:
            context.add_transfer_syntax = add_transfer_syntax  # type: ignore[method-assign]

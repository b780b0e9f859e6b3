"""The A-ASSOCIATE-RQ's presentation context items decoded, and the A-ASSOCIATE-AC encoded, without pynetdicom's
per-field machinery: the same item objects and the same bytes.

An A-ASSOCIATE-RQ from DCMTK's ``storescu`` proposes 128 presentation contexts with 192 transfer syntaxes: 321 PDU
items. pynetdicom (3.0) decodes each through ``PDUItem.decode``: a ``_decoders`` list of bound methods built per item,
a generator slicing the sub-items and ``setattr`` per field; it encodes the A-ASSOCIATE-AC's 128 result items the same
way (``_encoders``, ``bytes +=`` per field, ``len(item)`` per item for the PDU length). For one-image associations
(CR/DX rooms, ultrasound carts: connect, negotiate, one C-STORE, release) decoding the request took ~10% of the
receiving process's GIL samples and building and encoding the answer ~7% (py-spy ``--gil``, 150 ``storescu -xe``
associations, issue 13).

:func:`decode_variable_items` replaces ``A_ASSOCIATE_RQ._wrap_generate_items`` (what ``A_ASSOCIATE_RQ.decode`` calls
for the variable items). It first walks the whole structure without decoding a value: every item's header and length
inside the PDU, only Application Context (0x10), Presentation Context (0x20) and User Information (0x50) items, each
presentation context item at least 4 bytes long and made only of whole Abstract Syntax (0x30) and Transfer Syntax
(0x40) sub-items. Anything else (a truncated or overlong item, an unknown or misplaced item type) takes pynetdicom's
own decoding from the start, so that its exceptions and log lines are exactly its own, in its order. Then, in the
PDU's order, the application context and user information items are pynetdicom's own item decoding, and each
presentation context item is built directly: ``PresentationContextItemRQ``, ``AbstractSyntaxSubItem`` and
``TransferSyntaxSubItem`` objects with the attributes pynetdicom's ``__init__`` and ``decode`` give them, each UID
set as pynetdicom's ``set_uid`` returns it: a UID :mod:`dicom_scp.uid_memo` remembers is the remembered UID, any other
goes through the items' own setters (pynetdicom's ``set_uid``): the same validation, warnings and errors, in the same
order. (``PresentationContextItemRQ.to_primitive`` stays pynetdicom's: with the memo it costs about what a copy here
would.)

:func:`encode_associate_ac` replaces ``A_ASSOCIATE_AC.encode`` when every presentation context item is an ordinary
result (``PresentationContextItemAC`` with an int context ID and result of 0-255 and at most one
``TransferSyntaxSubItem`` whose name is a non-empty ASCII ``str``) and both reserved AE titles are ASCII ``str`` of
at most 16 characters: the bytes pynetdicom would write, with the application context and user information items
encoded by pynetdicom. Anything else is pynetdicom's ``encode``, whatever it does (raise, or write a PDU whose length
disagrees with its items, as it does for an item with two transfer syntaxes).
:func:`from_primitive_ac` builds those result items from the primitive as ``PresentationContextItemAC.from_primitive``
does, for ordinary results (an int or None context ID and result, at least one transfer syntax); any other result
takes pynetdicom's ``from_primitive``.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import pdu_items
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, PDU
from pynetdicom.pdu_items import (
    PDU_ITEM_TYPES,
    AbstractSyntaxSubItem,
    ApplicationContextItem,
    PresentationContextItemAC,
    PresentationContextItemRQ,
    TransferSyntaxSubItem,
    UserInformationItem,
)
from pynetdicom.presentation import PresentationContext

from dicom_scp import uid_memo

_original_generate_items: Callable[[Any, bytes], list[Any]] = PDU._wrap_generate_items
_original_ac_encode: Callable[[A_ASSOCIATE_AC], bytes] = A_ASSOCIATE_AC.encode
_original_ac_from_primitive: Callable[[A_ASSOCIATE_AC, Any], None] = A_ASSOCIATE_AC.from_primitive
_install_lock = threading.Lock()

_ITEM_HEADER = struct.Struct(">BxH")  # item type, reserved, item length (PS3.8 9.3.1)
_AC_HEADER = struct.Struct(">BxIHH16s16s32x")  # PDU type, length, protocol version, reserved, AE titles, reserved
_RESULT_ITEM = struct.Struct(">BxHBxBx")  # 0x21, item length, context ID, result/reason
_SYNTAX_HEADER = struct.Struct(">BxH")
_APPLICATION_CONTEXT, _PRESENTATION_CONTEXT, _USER_INFORMATION = 0x10, 0x20, 0x50
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX = 0x30, 0x40
_OWN_DECODING = (_APPLICATION_CONTEXT, _USER_INFORMATION)  # decoded by pynetdicom's item classes


def _ordinary_layout(data: bytes) -> bool:
    """Whether ``data`` (an A-ASSOCIATE-RQ's variable items) is whole items of the kinds decoded here (module
    docstring); no value is looked at."""
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 4:
            return False
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        item_end = offset + 4 + length
        if item_end > end:
            return False
        if item_type == _PRESENTATION_CONTEXT:
            if length < 4 or not _whole_syntax_items(data, offset + 8, item_end):
                return False
        elif item_type not in _OWN_DECODING:
            return False
        offset = item_end
    return True


def _whole_syntax_items(data: bytes, offset: int, end: int) -> bool:
    """Whether ``data[offset:end]`` is whole abstract and transfer syntax sub-items."""
    while offset < end:
        if end - offset < 4:
            return False
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4 + length
        if offset > end or (item_type != _ABSTRACT_SYNTAX and item_type != _TRANSFER_SYNTAX):
            return False
    return True


def _memo() -> dict[str | bytes, UID] | None:
    """:mod:`dicom_scp.uid_memo`'s conformant UIDs when pynetdicom's PDU items use its ``set_uid``, else None."""
    return uid_memo._known if pdu_items.set_uid is uid_memo.set_uid else None


def _known_uid(memo: dict[str | bytes, UID] | None, value: Any) -> UID | None:
    """What pynetdicom's ``set_uid`` (:func:`dicom_scp.uid_memo.set_uid`) returns at once, without a word, for
    ``value``, when that is a UID it validated before; else None (then the item's setter is called)."""
    if memo is None:
        return None
    kind = type(value)
    if kind is not bytes and kind is not str and (kind is not UID or value.__dict__):
        return None
    known = memo.get(value)
    if known is None or known.__dict__:  # see uid_memo.set_uid
        return None
    return known


def _presentation_context(data: bytes, offset: int, end: int, memo: dict[str | bytes, UID] | None
                          ) -> PresentationContextItemRQ:
    """The ``PresentationContextItemRQ`` pynetdicom decodes from ``data[offset:end]`` (its layout checked). A UID
    :mod:`dicom_scp.uid_memo` validated before is set as ``set_uid`` would return it (:func:`_known_uid`), any other
    through the sub-item's own setter."""
    item = object.__new__(PresentationContextItemRQ)
    item.presentation_context_id = data[offset + 4]
    sub_items: list[AbstractSyntaxSubItem | TransferSyntaxSubItem] = []
    item.abstract_transfer_syntax_sub_items = sub_items
    append, unpack, new = sub_items.append, _ITEM_HEADER.unpack_from, object.__new__
    offset += 8
    while offset < end:
        item_type, length = unpack(data, offset)
        start, offset = offset + 4, offset + 4 + length
        value = data[start:offset - 1] if length and data[offset - 1] == 0 else data[start:offset]  # _wrap_uid_bytes
        known = memo.get(value) if memo is not None else None  # bytes: see _known_uid
        if known is not None and known.__dict__:
            known = None
        sub: AbstractSyntaxSubItem | TransferSyntaxSubItem
        if item_type == _TRANSFER_SYNTAX:
            sub = new(TransferSyntaxSubItem)
            sub._skip_validation = False
            sub._transfer_syntax_name = known
            if known is None:
                sub.transfer_syntax_name = value  # pynetdicom's setter: its set_uid, validation and warnings
        else:
            sub = new(AbstractSyntaxSubItem)
            sub._abstract_syntax_name = known
            if known is None:
                sub.abstract_syntax_name = value
        append(sub)
    return item


def decode_variable_items(self: PDU, bytestream: bytes) -> list[Any]:
    """``PDU._wrap_generate_items`` for an A-ASSOCIATE-RQ's variable items (module docstring)."""
    if type(bytestream) is not bytes or not _ordinary_layout(bytestream):
        return _original_generate_items(self, bytestream)
    items: list[Any] = []
    offset, end, memo = 0, len(bytestream), _memo()
    while offset < end:
        item_type, length = _ITEM_HEADER.unpack_from(bytestream, offset)
        item_end = offset + 4 + length
        if item_type == _PRESENTATION_CONTEXT:
            items.append(_presentation_context(bytestream, offset, item_end, memo))
        else:
            item = PDU_ITEM_TYPES[item_type]()
            item.decode(bytestream[offset:item_end])
            items.append(item)
        offset = item_end
    return items


def _ae_field(value: Any) -> bytes | None:
    """A reserved AE title field as pynetdicom writes it (``ljust(16)``, ASCII), or None (unusual)."""
    if type(value) is not str or len(value) > 16 or not value.isascii():
        return None
    return value.ljust(16).encode("ascii")


def _result_item(item: Any) -> bytes | None:
    """A ``PresentationContextItemAC`` as pynetdicom encodes it, or None when it is not an ordinary result."""
    if type(item) is not PresentationContextItemAC:
        return None
    context_id, result, sub_items = item.presentation_context_id, item.result_reason, item.transfer_syntax_sub_item
    if type(context_id) is not int or type(result) is not int or not (0 <= context_id <= 255 and 0 <= result <= 255):
        return None
    if type(sub_items) is not list or len(sub_items) > 1:
        return None
    if not sub_items:
        return _RESULT_ITEM.pack(0x21, 4, context_id, result)
    sub = sub_items[0]
    if type(sub) is not TransferSyntaxSubItem:
        return None
    name = sub.transfer_syntax_name
    if not isinstance(name, str) or not name or len(name) > 0xFFFF - 8 or not name.isascii():
        return None
    raw = name.encode("ascii")
    return (_RESULT_ITEM.pack(0x21, 8 + len(raw), context_id, result) + _SYNTAX_HEADER.pack(0x40, len(raw))
            + raw)


def encode_associate_ac(self: A_ASSOCIATE_AC) -> bytes:
    """``A_ASSOCIATE_AC.encode`` with the presentation context results packed here (module docstring)."""
    called, calling = _ae_field(self.reserved_aet), _ae_field(self.reserved_aec)
    version, items = self.protocol_version, self.variable_items
    if called is None or calling is None or type(version) is not int or not 0 <= version <= 0xFFFF:
        return _original_ac_encode(self)
    if type(items) is not list:
        return _original_ac_encode(self)
    parts: list[bytes | None] = []
    for item in items:  # nothing of pynetdicom's is called before every item is known to be ordinary
        kind = type(item)
        if kind is ApplicationContextItem or kind is UserInformationItem:
            parts.append(None)  # encoded by pynetdicom, below
            continue
        encoded = _result_item(item)
        if encoded is None:
            return _original_ac_encode(self)
        parts.append(encoded)
    # pynetdicom's order: the PDU length from every item's len() first, then each item encoded
    length = 68 + sum(len(item) if part is None else len(part) for item, part in zip(items, parts, strict=True))
    if length > 0xFFFFFFFF:
        return _original_ac_encode(self)
    body = b"".join(item.encode() if part is None else part for item, part in zip(items, parts, strict=True))
    return _AC_HEADER.pack(0x02, length, version, 0, called, calling) + body


def _ordinary_result(context: Any) -> bool:
    """Whether ``PresentationContextItemAC.from_primitive`` of ``context`` is done here: a ``PresentationContext``
    whose context ID and result are an int or None, with at least one transfer syntax (else pynetdicom raises)."""
    if type(context) is not PresentationContext:
        return False
    context_id, result = context._context_id, context.result
    if not (context_id is None or type(context_id) is int) or not (result is None or type(result) is int):
        return False
    return type(context._transfer_syntax) is list and bool(context._transfer_syntax)


def _result_from_primitive(context: PresentationContext, memo: dict[str | bytes, UID] | None
                           ) -> PresentationContextItemAC:
    """``PresentationContextItemAC.from_primitive`` of an ordinary result (:func:`_ordinary_result`)."""
    item = object.__new__(PresentationContextItemAC)
    item.presentation_context_id = context._context_id
    item.result_reason = context.result
    syntax = context._transfer_syntax[0]
    sub = object.__new__(TransferSyntaxSubItem)
    sub._skip_validation = False
    sub._transfer_syntax_name = known = _known_uid(memo, syntax)
    if known is None:
        sub.transfer_syntax_name = syntax  # pynetdicom's setter: its set_uid, validation and warnings
    item.transfer_syntax_sub_item = [sub]
    return item


def from_primitive_ac(self: A_ASSOCIATE_AC, primitive: Any) -> None:
    """``A_ASSOCIATE_AC.from_primitive`` with ordinary presentation context results built here (module
    docstring), in pynetdicom's order."""
    results = primitive.presentation_context_definition_results_list
    if (type(results) is not list or type(self.variable_items) is not list
            or not all(_ordinary_result(context) for context in results)):
        _original_ac_from_primitive(self, primitive)
        return
    self.reserved_aet = primitive.called_ae_title
    self.reserved_aec = primitive.calling_ae_title
    application_context = ApplicationContextItem()
    application_context.application_context_name = primitive.application_context_name
    self.variable_items.append(application_context)
    memo = _memo()
    self.variable_items.extend([_result_from_primitive(context, memo) for context in results])
    user_information = UserInformationItem()
    user_information.from_primitive(primitive.user_information)
    self.variable_items.append(user_information)


def install() -> None:
    """Use :func:`decode_variable_items` for A-ASSOCIATE-RQ PDUs and :func:`encode_associate_ac` and
    :func:`from_primitive_ac` for A-ASSOCIATE-AC PDUs (idempotent). Methods that are not pynetdicom's (a later
    pynetdicom, another patch) are left alone: they only lose the shortcut."""
    with _install_lock:
        if A_ASSOCIATE_RQ._wrap_generate_items is _original_generate_items:
            A_ASSOCIATE_RQ._wrap_generate_items = decode_variable_items  # type: ignore[method-assign]
        if A_ASSOCIATE_AC.encode is _original_ac_encode:
            A_ASSOCIATE_AC.encode = encode_associate_ac  # type: ignore[method-assign, assignment]
        if A_ASSOCIATE_AC.from_primitive is _original_ac_from_primitive:
            A_ASSOCIATE_AC.from_primitive = from_primitive_ac  # type: ignore[method-assign]


"""The Part-10 bytes of a received C-STORE dataset: what ``Event.encoded_dataset(include_meta=True)`` returns.

pynetdicom builds the File Meta Information as a pydicom dataset and encodes it with pydicom's writer: about a
millisecond of CPU per instance, as much as the rest of the handler's own work (issue 13). Its seven elements
are always the same shape, so they are encoded here directly from the request's UIDs, byte for byte as pydicom
writes them (``tests/test_received_part10.py`` compares both). UIDs that are not valid (empty, too long, not
digits and dots, leading zeros) take pynetdicom's path, with its errors.
"""

from __future__ import annotations

import struct
from typing import Final

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

from pacs.uids import is_valid_uid

PREAMBLE: Final = b"\x00" * 128 + b"DICM"


def _element(group_element: bytes, vr: bytes, value: bytes) -> bytes:
    """An Explicit VR Little Endian element with a 16-bit length (UI, SH)."""
    return group_element + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _version_name(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b" " if len(data) % 2 else data


# (0002,0001) File Meta Information Version, OB with a 32-bit length
_VERSION: Final = b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"
_IMPLEMENTATION: Final = (_element(b"\x02\x00\x12\x00", b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
                          + _element(b"\x02\x00\x13\x00", b"SH", _version_name(PYNETDICOM_IMPLEMENTATION_VERSION)))


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes | None:
    """pynetdicom's encoded File Meta Information for these UIDs; None unless all three are plain."""
    if not (is_valid_uid(sop_class_uid) and is_valid_uid(sop_instance_uid) and is_valid_uid(transfer_syntax_uid)):
        return None
    body = b"".join((
        _VERSION,
        _element(b"\x02\x00\x02\x00", b"UI", _uid(sop_class_uid)),
        _element(b"\x02\x00\x03\x00", b"UI", _uid(sop_instance_uid)),
        _element(b"\x02\x00\x10\x00", b"UI", _uid(transfer_syntax_uid)),
        _IMPLEMENTATION,
    ))
    return b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body)) + body


def received_part10(event: evt.Event) -> bytes:
    """``event.encoded_dataset(include_meta=True)`` of a C-STORE request event."""
    request = event.request
    if not isinstance(request, C_STORE) or request.DataSet is None:
        return event.encoded_dataset(include_meta=True)  # pynetdicom's answer, or its error
    sop_class, sop_instance = request.AffectedSOPClassUID, request.AffectedSOPInstanceUID
    syntax = event.context.transfer_syntax
    meta = None
    if isinstance(sop_class, str) and isinstance(sop_instance, str) and isinstance(syntax, str):
        meta = file_meta_bytes(sop_class, sop_instance, syntax)
    if meta is None:
        return event.encoded_dataset(include_meta=True)
    return b"".join((PREAMBLE, meta, request.DataSet.getvalue()))

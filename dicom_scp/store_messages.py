"""C-STORE command sets encoded and decoded with ``struct`` instead of pydicom, byte for byte as pynetdicom does.

For every stored object pynetdicom (3.0) decodes the C-STORE-RQ's command set with pydicom (``read_dataset``, then
each element converted and set on a ``C_STORE`` primitive through its validating setters) and builds the
C-STORE-RSP's command set as a pydicom ``Dataset`` that it encodes twice (``write_dataset`` for the Command Group
Length, then for the message). While ``storescu -xe`` sends 300 CT slices on one association, pynetdicom's
``send_msg`` and ``receive_primitive`` took 13-16% of the receiving process's GIL samples (py-spy ``--gil``, a shared
2-core machine), 3-5% with this module: what is left is mostly the hand-off to the association's queues. Both
command sets are a handful of fixed elements (PS3.7 9.3.1, Implicit VR Little Endian, PS3.7 Annex E).

:func:`send_msg` replaces ``DIMSEServiceProvider.send_msg`` for a C-STORE response whose every parameter is an
ordinary value (:func:`encode_store_response`): an int Message ID Being Responded To and Status, UIDs of at most 64
characters that match pydicom's UI expression, an Error Comment of at most 64 printable ASCII characters without a
backslash, no Offending Element, no dataset. It writes the elements pynetdicom would write, in its order and with
its padding (a UI value to an even length with a NUL, an LO one with a space), and sends them as pynetdicom does when
they fit in the peer's maximum PDU: one P-DATA whose one PDV has the control header 0x03. pydicom would log nothing
for such values, so nothing is lost. Anything else takes pynetdicom's own ``send_msg``: another primitive or a
request, any other value, a command set that needs fragmenting, and an association with a handler bound to
EVT_DIMSE_SENT (pynetdicom's standard logging handlers at INFO/DEBUG, the audit of C-FIND/C-GET/C-MOVE), which is
given pynetdicom's message.

:func:`receive_primitive` replaces ``DIMSEServiceProvider.receive_primitive`` for the first P-DATA of a message when
it is exactly one PDV holding a whole C-STORE-RQ command set (control header 0x03) made only of that request's
elements (:func:`decode_store_request`), each once, in ascending order, with the length its VR gives and a value
pydicom and pynetdicom take without a word: Priority 0-2, conformant UIDs, a Move Originator AE title of 1-16
printable ASCII characters. The ``C_STORE`` primitive is built at once with the values pynetdicom's
``message_to_primitive`` would set, and the message waiting for the dataset (:class:`DecodedStoreRequest`, a
``C_STORE_RQ``) returns it when the dataset is complete; its ``command_set`` is decoded by pydicom only if something
reads it. The dataset's P-DATA, EVT_DIMSE_RECV, the message queue and every size bound of :mod:`dicom_scp.server`
stay pynetdicom's path and ours. Anything else (another message, a fragmented command set, a command set without a
dataset, chunked dataset storage, an EVT_DIMSE_RECV handler bound) takes pynetdicom's own ``receive_primitive``.
"""

from __future__ import annotations

import re
import struct
import threading
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from pacs.uids import is_valid_uid

_original_send_msg = DIMSEServiceProvider.send_msg
_original_receive_primitive = DIMSEServiceProvider.receive_primitive
_install_lock = threading.Lock()

_LO_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash (pydicom's value delimiter)
_AE_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_ELEMENT = struct.Struct("<HHI")  # Implicit VR Little Endian: group, element, value length
_US_ELEMENT = struct.Struct("<HHIH")
_US_VALUE = struct.Struct("<H")
# Command Field of a C-STORE-RQ and -RSP, Command Data Set Type "no dataset" (PS3.7 E.1): not statuses
_C_STORE_RQ, _C_STORE_RSP, _NO_DATASET = 0x0001, 0x8001, 0x0101
_RSP_FIELD = _US_ELEMENT.pack(0x0000, 0x0100, 2, _C_STORE_RSP)  # (0000,0100) Command Field
_RSP_DATASET_TYPE = _US_ELEMENT.pack(0x0000, 0x0800, 2, _NO_DATASET)  # (0000,0800) Command Data Set Type
_GROUP_LENGTH = struct.Struct("<HHII")  # (0000,0000) Command Group Length, UL
# The C-STORE-RQ command elements (PS3.7 9.3.1.1) by element number: their value length (0: any, a UI or an AE)
_RQ_LENGTHS = {0x0000: 4, 0x0002: 0, 0x0100: 2, 0x0110: 2, 0x0700: 2, 0x0800: 2, 0x1000: 0, 0x1030: 0, 0x1031: 2}
_RQ_REQUIRED = {0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000}


def _uid_element(element: int, value: Any) -> bytes | None:
    """A UI element as pydicom writes it (NUL-padded to an even length), or None for an unusual value."""
    if not is_valid_uid(value):  # pydicom's UI expression, at most 64 characters
        return None
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return _ELEMENT.pack(0x0000, element, len(raw)) + raw


def _comment_element(value: Any) -> bytes | None:
    """(0000,0902) Error Comment as pydicom writes it (space-padded to an even length), or None (unusual)."""
    if type(value) is not str or len(value) > 64 or not _LO_TEXT.fullmatch(value):
        return None
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    return _ELEMENT.pack(0x0000, 0x0902, len(raw)) + raw


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set pynetdicom would encode for ``rsp`` (Command Group Length first), or None when
    one of its parameters is not an ordinary value (then pynetdicom's own path encodes it)."""
    message_id = rsp.MessageIDBeingRespondedTo
    status = rsp.Status
    if type(message_id) is not int or type(status) is not int or not 0 <= status <= 0xFFFF:
        return None
    if rsp.OffendingElement is not None or rsp.DataSet is not None or rsp._dataset_path is not None:
        return None
    parts: list[bytes] = []
    if (sop_class := rsp.AffectedSOPClassUID) is not None:
        if (element := _uid_element(0x0002, sop_class)) is None:
            return None
        parts.append(element)
    parts += (_RSP_FIELD, _US_ELEMENT.pack(0x0000, 0x0120, 2, message_id), _RSP_DATASET_TYPE,
              _US_ELEMENT.pack(0x0000, 0x0900, 2, status))
    if (comment := rsp.ErrorComment) is not None:
        if (element := _comment_element(comment)) is None:
            return None
        parts.append(element)
    if (instance := rsp.AffectedSOPInstanceUID) is not None:
        if (element := _uid_element(0x1000, instance)) is None:
            return None
        parts.append(element)
    body = b"".join(parts)
    return _GROUP_LENGTH.pack(0x0000, 0x0000, 4, len(body)) + body


def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with an ordinary C-STORE response encoded here (module docstring)."""
    if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None:
        encoded = encode_store_response(primitive)
        if encoded is not None and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            max_pdu = self.maximum_pdu_size
            if type(max_pdu) is int and (max_pdu == 0 or len(encoded) <= max_pdu - 6):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
                self.dul.send_pdu(pdata)
                return
    _original_send_msg(self, primitive, context_id)


def _uid_value(raw: bytes) -> UID | None:
    """The UID pydicom and pynetdicom make of a UI value (a trailing NUL pad dropped) when that takes no warning
    or error: a conformant UID; else None (unusual)."""
    text = raw[:-1] if raw.endswith(b"\x00") else raw
    if not is_valid_uid(text.decode("latin-1")):
        return None
    # pydicom's UID() would validate it against the same expression and strip nothing: the same UID, made directly
    return str.__new__(UID, text.decode("ascii"))


def decode_store_request(encoded: bytes) -> C_STORE | None:
    """The ``C_STORE`` primitive pynetdicom's ``message_to_primitive`` would make of a C-STORE-RQ command set
    followed by a dataset, or None when the command set is anything but ordinary (then pynetdicom decodes it)."""
    values: dict[int, bytes] = {}
    offset, end, last = 0, len(encoded), -1
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(encoded, offset)
        offset += 8
        if group != 0x0000 or element <= last or element not in _RQ_LENGTHS or offset + length > end:
            return None
        if (expected := _RQ_LENGTHS[element]) and length != expected:
            return None
        values[element] = encoded[offset:offset + length]
        offset += length
        last = element
    if not values.keys() >= _RQ_REQUIRED or _US_VALUE.unpack(values[0x0100])[0] != _C_STORE_RQ:
        return None
    priority = _US_VALUE.unpack(values[0x0700])[0]
    if priority not in (0, 1, 2) or _US_VALUE.unpack(values[0x0800])[0] == _NO_DATASET:
        return None
    sop_class, instance = _uid_value(values[0x0002]), _uid_value(values[0x1000])
    if sop_class is None or instance is None:
        return None
    primitive = C_STORE()
    if (originator := values.get(0x1030)) is not None:
        if not _AE_TEXT.fullmatch(originator.decode("latin-1")) or not (title := originator.decode("ascii").strip()):
            return None
        primitive.MoveOriginatorApplicationEntityTitle = title
    # the UIDs are conformant (_uid_value): pynetdicom's setters (set_uid) would return these very UIDs, silently
    primitive._affected_sop_class_uid = sop_class
    primitive._affected_sop_instance_uid = instance
    primitive.MessageID = _US_VALUE.unpack(values[0x0110])[0]
    primitive.Priority = priority
    if (originator_id := values.get(0x1031)) is not None:
        primitive.MoveOriginatorMessageID = _US_VALUE.unpack(originator_id)[0]
    return primitive


class DecodedStoreRequest(C_STORE_RQ):
    """A C-STORE-RQ whose command set was decoded by :func:`decode_store_request`: its dataset arrives through
    pynetdicom's ``decode_msg``, then :meth:`message_to_primitive` completes the primitive made from the command set.
    ``command_set`` is pydicom's decoding of the same bytes, made when first read (an EVT_DIMSE_RECV handler bound
    while the dataset arrived). Should the message turn into another (a second command set, which pynetdicom would
    decode with the first), ``decode_msg`` sets its class and ``command_set`` as it does for any message."""

    def __init__(self, encoded: bytes, context_id: int, primitive: C_STORE) -> None:
        self.context_id = context_id
        self.encoded_command_set = BytesIO(encoded)
        self.encoded_command_set.seek(0, 2)  # where decode_msg writes a further command fragment
        self.data_set = BytesIO()
        self._data_set_path = None
        self._data_set_file = None
        self._decoded = primitive

    @property  # a data attribute of DIMSEMessage, decoded here only when read
    def command_set(self) -> Dataset:
        command_set = self.__dict__.get("command_set")
        if command_set is None:
            command_set = self.__dict__["command_set"] = decode(BytesIO(self.encoded_command_set.getvalue()), True,
                                                                True)
        return command_set

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self.__dict__["command_set"] = value  # still found after decode_msg changes the class (no property then)

    def message_to_primitive(self) -> Any:
        """What ``DIMSEMessage.message_to_primitive`` sets beyond the command set: the dataset, the context."""
        primitive = self._decoded
        primitive.DataSet = self.data_set
        primitive._context_id = self.context_id
        primitive._dataset_path = self._data_set_path
        primitive._dataset_file = self._data_set_file
        return primitive


def receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    """``DIMSEServiceProvider.receive_primitive`` with an ordinary C-STORE-RQ command set decoded here (module
    docstring)."""
    if self.message is None and type(primitive) is P_DATA and len(primitive.presentation_data_value_list) == 1:
        context_id, data = primitive.presentation_data_value_list[0]
        if (data[:1] == b"\x03" and not _config.STORE_RECV_CHUNKED_DATASET
                and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV)):
            encoded = bytes(data[1:])
            request = decode_store_request(encoded)
            if request is not None:
                self.message = DecodedStoreRequest(encoded, context_id, request)
                return  # the dataset follows (decode_msg would have returned False)
    _original_receive_primitive(self, primitive)


def install() -> None:
    """Use :func:`send_msg` and :func:`receive_primitive` in pynetdicom's DIMSE service provider (idempotent). One
    that is not pynetdicom's (a later pynetdicom, another patch) is left alone: it only loses the shortcut."""
    with _install_lock:
        provider = DIMSEServiceProvider
        if provider.send_msg is _original_send_msg:
            provider.send_msg = send_msg  # type: ignore[method-assign]
        if provider.receive_primitive is _original_receive_primitive:
            provider.receive_primitive = receive_primitive  # type: ignore[method-assign]

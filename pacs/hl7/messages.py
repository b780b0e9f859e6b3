"""HL7 v2 messages: ORM^O01 in (→ :class:`pacs.ris.orders.NewOrder` or a cancel), ACKs and ORU^R01 out.

Every message is parsed and built with ``hl7apy``. Values are set on its elements as hl7apy
datatype objects (:func:`_put`; a bare string would be parsed as ER7 at that element's level), and
hl7apy escapes the delimiters (``|^~&`` and the escape character) when it writes them. Two gaps of
hl7apy 1.3.5 are filled here, both documented where they are: it has no *un*escaping of parsed
values (:func:`unescape`), and it leaves a backslash unescaped when the text already looks like an
escape sequence (``\\F\\``), so text is given to it with its backslashes already escaped
(:func:`_hl7_text`), which it then leaves alone.

Incoming messages are parsed flat (``find_groups=False``): hl7apy's group finder silently drops
segments it cannot place, while the flat parser refuses unknown segment names; the order of the
segments is then checked here (:func:`_order_groups`).

Acknowledgement codes (original mode, MSA-1): ``AA`` accepted and stored; ``AE`` the message was
read but its content cannot be applied (missing segment or field, invalid value, unknown or
duplicate order) — MSA-3 and ERR say which; ``AR`` rejected unread: not HL7, unparseable, an
unsupported message type, version or character set, or too large.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Element, Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.factories import datatype_factory
from hl7apy.parser import get_message_info, parse_message, parse_segment

from pacs.reports.document import ReportDocument
from pacs.ris.orders import NewOrder

TOLERANT = VALIDATION_LEVEL.TOLERANT
ORU_VERSION = "2.5.1"
SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6")  # those where ORM^O01 exists
SENDING_APPLICATION = "PACS"
MAX_DELIMITERS = 20_000  # fields, components, repetitions, subcomponents in one message (real orders: hundreds)
MAX_SEGMENTS = 1_000  # segments too cost hl7apy time (~0.1 ms each even when empty); real orders have tens

# MSH-18 (HL7 table 0211) → Python codec. Empty: ASCII by the standard; read as UTF-8 (a superset,
# and what Vietnamese systems send unlabelled).
CHARSETS = {"": "utf-8", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "8859/1": "latin-1"}
ORU_CHARSET = "UNICODE UTF-8"

# HL7 table 0357, message error condition codes (ERR-3).
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_VERSION = 203
UNKNOWN_KEY = 204
DUPLICATE_KEY = 205
INTERNAL_ERROR = 207
_ERROR_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error", REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error", TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type", UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_VERSION: "Unsupported version id", UNKNOWN_KEY: "Unknown key identifier",
    DUPLICATE_KEY: "Duplicate key identifier", INTERNAL_ERROR: "Application internal error",
}

# ORC-1 order control codes we act on.
NEW_ORDER = "NW"
CANCEL_CODES = ("CA", "OC", "DC")  # cancel request, order canceled, order discontinued

# Priority codes (TQ.6 / TQ1-9, HL7 table 0027 / 0485) → order priority.
_PRIORITIES = {"S": "STAT", "A": "URGENT", "T": "URGENT", "P": "URGENT", "R": "ROUTINE", "C": "ROUTINE",
               "PRN": "ROUTINE"}
# Modalities an order may carry, as DICOM codes (what the worklist offers the modality).
DICOM_MODALITIES = frozenset({"BMD", "CR", "CT", "DG", "DX", "ECG", "ES", "GM", "IO", "IVOCT", "IVUS", "MG", "MR",
                              "NM", "OCT", "OP", "OT", "PT", "PX", "RF", "RG", "SM", "TG", "US", "XA", "XC"})
# OBR-24 diagnostic service sections (HL7 table 0074) → DICOM modality.
_SECTION_MODALITIES = {"NMR": "MR", "NMS": "NM", "RUS": "US", "CUS": "US", "OUS": "US", "VUS": "US", "RX": "CR",
                       "XRC": "XA"}
# Leading letters of OBR-4 codes that are not DICOM modalities themselves.
_CODE_PREFIXES = {"MRI": "MR", "PET": "PT", "XR": "CR", "RX": "CR"}
DEFAULT_MODALITY = "OT"

# OBX-3 observation identifiers of the ORU.
FINDINGS_CODE = ("59776-5", "Procedure Findings", "LN")
IMPRESSION_CODE = ("19005-8", "Impression", "LN")
AMENDMENT_CODE = ("AMEND", "Reason for amendment", "L")  # no LOINC code for it: local (table 0396 "L")
STUDY_UID_CODE = ("113014", "DICOM Study", "DCM")
RESULT_STATUS = {"preliminary": "P", "final": "F", "amended": "C"}


class Hl7Error(Exception):
    """A message we answer with ``AE``: read, but its content cannot be applied."""

    ack_code = "AE"

    def __init__(self, message: str, code: int = INTERNAL_ERROR, segment: str = "", field_no: int = 0,
                 sequence: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.segment = segment
        self.field_no = field_no
        self.sequence = sequence


class Hl7Reject(Hl7Error):
    """A message we answer with ``AR``: not read (not HL7, unsupported type, version or charset)."""

    ack_code = "AR"


@dataclass(frozen=True)
class Header:
    """What the MSH segment says, unescaped."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = ""
    message_code: str = ""  # MSH-9.1, e.g. ORM
    trigger_event: str = ""  # MSH-9.2, e.g. O01
    charset: str = ""  # MSH-18 (first repetition), e.g. UNICODE UTF-8

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}" if self.trigger_event else self.message_code


@dataclass(frozen=True)
class CancelRequest:
    """ORC-1 CA/OC/DC: discontinue the order known by this accession number or placer order number."""

    order_control: str
    accession_number: str
    placer_order_number: str


@dataclass(frozen=True)
class OrmMessage:
    header: Header
    patient_id: str  # PID-3 ("" when there is no PID)
    items: tuple[NewOrder | CancelRequest, ...] = field(default_factory=tuple)


# -- reading: bytes → header → text → ORM -------------------------------------------------------


def read_header(data: bytes) -> Header:
    """The MSH of a raw message, read before its character set is known (MSH is ASCII in practice).

    Raises :class:`Hl7Reject` when the bytes do not start with an MSH segment hl7apy can read.
    """
    first_line = data.lstrip()[:4096].replace(b"\n", b"\r").partition(b"\r")[0]
    return _header_from_line(first_line.decode("latin-1"))


def decode_text(data: bytes, header: Header) -> str:
    """The message as text in the character set MSH-18 names; segment separators normalised to CR.

    Raises :class:`Hl7Reject` for a character set we do not read or bytes invalid in it.
    """
    codec = CHARSETS.get(header.charset.strip().upper())
    if codec is None:
        raise Hl7Reject(f"unsupported character set {header.charset!r} in MSH-18 (use UNICODE UTF-8 or 8859/1)",
                        DATA_TYPE_ERROR, "MSH", 18)
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        label = header.charset or "UTF-8 (MSH-18 empty)"
        raise Hl7Reject(f"bytes invalid in the declared character set {label} at offset {exc.start}",
                        DATA_TYPE_ERROR, "MSH", 18) from exc
    return text.strip().replace("\r\n", "\r").replace("\n", "\r")


def check_supported(header: Header, accepted: Iterable[tuple[str, str]] = (("ORM", "O01"),)) -> None:
    """Raise :class:`Hl7Reject` for a version or message type we do not process."""
    if header.version not in SUPPORTED_VERSIONS:
        raise Hl7Reject(f"unsupported HL7 version {header.version!r} (MSH-12): one of "
                        f"{', '.join(SUPPORTED_VERSIONS)}", UNSUPPORTED_VERSION, "MSH", 12)
    wanted = tuple(accepted)
    if header.message_code not in {code for code, _ in wanted}:
        raise Hl7Reject(f"unsupported message type {header.message_type or '(empty)'} (MSH-9): this listener "
                        f"takes {', '.join(f'{c}^{e}' for c, e in wanted)}", UNSUPPORTED_MESSAGE_TYPE, "MSH", 9)
    if (header.message_code, header.trigger_event) not in wanted:
        raise Hl7Reject(f"unsupported event {header.message_type} (MSH-9)", UNSUPPORTED_EVENT_CODE, "MSH", 9)


def parse(text: str) -> Message:
    """Parse ER7 text with hl7apy (flat, tolerant); :class:`Hl7Reject` when it cannot be parsed.

    hl7apy spends ~0.1 ms per field/component, so a message made of nothing but delimiters would
    keep a thread busy for minutes: more than :data:`MAX_DELIMITERS` of them is refused unparsed.
    """
    try:
        encoding_chars, _, _ = get_message_info(text)
    except (HL7apyException, ValueError, IndexError, KeyError) as exc:
        raise Hl7Reject(f"cannot parse the message: {exc}", SEGMENT_SEQUENCE_ERROR, "MSH") from exc
    delimiters = sum(text.count(encoding_chars[k]) for k in ("FIELD", "COMPONENT", "REPETITION", "SUBCOMPONENT"))
    segments = text.count("\r") + text.count("\n") + 1
    if delimiters > MAX_DELIMITERS or segments > MAX_SEGMENTS:
        raise Hl7Reject(f"message refused: {delimiters} fields/components and {segments} segments (at most "
                        f"{MAX_DELIMITERS} and {MAX_SEGMENTS})", SEGMENT_SEQUENCE_ERROR)
    try:
        return parse_message(text, validation_level=TOLERANT, find_groups=False)
    except (HL7apyException, ValueError, IndexError, KeyError) as exc:  # hl7apy raises a few plain ones too
        raise Hl7Reject(f"cannot parse the message: {exc}", SEGMENT_SEQUENCE_ERROR) from exc


def parse_orm(text: str, *, default_facility: str = "") -> OrmMessage:
    """An ORM^O01 as the orders and cancels it asks for.

    Raises :class:`Hl7Reject` when it cannot be parsed and :class:`Hl7Error` (AE) for a wrong
    segment order or a missing required segment or field; the values themselves are validated by
    :func:`pacs.ris.orders.create_order`.
    """
    message = parse(text)
    header = _header_from_segment(_segments(message)[0])
    check_supported(header)
    enc = message.encoding_chars
    codec = CHARSETS.get(header.charset.strip().upper(), "utf-8")
    reader = _Reader(enc, codec)
    pid, groups = _order_groups(_segments(message))
    patient_id, issuer = reader.patient_id(pid) if pid is not None else ("", "")
    facility = default_facility.strip() or header.sending_facility
    items: list[NewOrder | CancelRequest] = []
    for n, group in enumerate(groups, start=1):
        orc = group[0]
        control = reader.text(orc, 1).upper()
        if control == NEW_ORDER:
            if pid is None:
                raise Hl7Error("PID segment is required for a new order (ORC-1 NW)", REQUIRED_FIELD_MISSING, "PID")
            items.append(reader.new_order(pid, group, patient_id, issuer, facility, n))
        elif control in CANCEL_CODES:
            items.append(reader.cancel(group, control, n))
        elif not control:
            raise Hl7Error("ORC-1 order control is required", REQUIRED_FIELD_MISSING, "ORC", 1, n)
        else:
            raise Hl7Error(f"order control {control!r} (ORC-1) is not supported: NW, CA, OC or DC",
                           TABLE_VALUE_NOT_FOUND, "ORC", 1, n)
    return OrmMessage(header, patient_id, tuple(items))


def unescape(value: str, enc: dict[str, str], codec: str = "utf-8") -> str:
    """Decode HL7 escape sequences (v2.5.1 §2.7): delimiters, ``\\.br\\`` line breaks, hex data.

    hl7apy keeps parsed values as they were on the wire and has no unescaping of its own.
    Highlighting and character set switches are dropped; unknown sequences are dropped too.
    """
    esc = enc["ESCAPE"]
    if esc not in value:
        return value
    delimiters = {"F": enc["FIELD"], "S": enc["COMPONENT"], "T": enc["SUBCOMPONENT"], "R": enc["REPETITION"],
                  "E": esc}
    pattern = re.compile(f"{re.escape(esc)}([^{re.escape(esc)}]*){re.escape(esc)}")

    def replace(match: re.Match[str]) -> str:
        seq = match.group(1)
        if seq in delimiters:
            return delimiters[seq]
        if seq in (".br", ".sp", ".ce") or seq.startswith(".sp"):
            return "\n"
        if seq.startswith("X") and len(seq) % 2 == 1:
            try:
                return bytes.fromhex(seq[1:]).decode(codec, "replace")
            except ValueError:
                return ""
        return ""

    return pattern.sub(replace, value)


@dataclass(frozen=True)
class Ack:
    """A receiver's answer to a message we sent."""

    code: str  # MSA-1: AA, AE, AR (CA, CE, CR in enhanced mode)
    control_id: str  # MSA-2: the control id of the message it acknowledges
    text: str  # MSA-3, else ERR-8, else ERR-3 text ("" when none)

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def parse_ack(data: bytes) -> Ack:
    """Read an ACK (any supported version); :class:`Hl7Reject` when it is not one."""
    header = read_header(data)
    text = decode_text(data, header)
    message = parse(text)
    msa = _first(_segments(message), "MSA")
    if msa is None:
        raise Hl7Reject("the acknowledgement has no MSA segment", REQUIRED_FIELD_MISSING, "MSA")
    reader = _Reader(message.encoding_chars, CHARSETS.get(header.charset.strip().upper(), "utf-8"))
    err = _first(_segments(message), "ERR")
    reason = reader.text(msa, 3) or reader.text(err, 8) or reader.text(err, 3, 2) or reader.text(err, 1, 4, 2)
    return Ack(reader.text(msa, 1).upper(), reader.text(msa, 2), reason)


# -- writing: ACK and ORU^R01 -------------------------------------------------------------------


def new_control_id() -> str:
    """A unique message control id for MSH-10 (20 characters, the field's length in v2.5.1)."""
    return uuid.uuid4().hex[:20].upper()


def build_ack(header: Header | None, code: str, error: Hl7Error | None = None, *, text: str = "",
              control_id: str | None = None, now: datetime | None = None) -> str:
    """An original-mode ACK for a message whose MSH is ``header`` (None when even that was unreadable).

    MSA-3 and ERR (v2.5+: ERR-2 location, ERR-3 code from table 0357, ERR-4 severity, ERR-8 the
    full reason; older versions: ERR-1) carry the reason of an ``AE``/``AR``.
    """
    header = header or Header()
    version = header.version if header.version in SUPPORTED_VERSIONS else ORU_VERSION
    ack = Message("ACK", version=version, validation_level=TOLERANT)
    msh = ack.msh
    _put(msh.msh_3.hd_1, header.receiving_application or SENDING_APPLICATION)
    _put(msh.msh_4.hd_1, header.receiving_facility)
    _put(msh.msh_5.hd_1, header.sending_application)
    _put(msh.msh_6.hd_1, header.sending_facility)
    _set_ts(msh.msh_7, now or datetime.now(UTC))
    _put(_component(msh.msh_9, 1), "ACK")
    _put(_component(msh.msh_9, 2), header.trigger_event)
    if _version_tuple(version) >= (2, 4):
        _put(_component(msh.msh_9, 3), "ACK")
    _put(msh.msh_10, control_id or new_control_id())
    _put(_component(msh.msh_11, 1), header.processing_id or "P")
    _put(msh.msh_18, header.charset)
    msa = ack.add_segment("MSA")
    _put(msa.msa_1, code)
    _put(msa.msa_2, header.control_id)
    reason = error.message if error is not None else text
    _put(msa.msa_3, _one_line(reason)[:80])
    if error is not None:
        _add_err(ack, error, version)
    return ack.to_er7()


def build_oru(doc: ReportDocument, *, control_id: str, receiving_application: str = "",
              receiving_facility: str = "", now: datetime | None = None) -> str:
    """The ORU^R01 (v2.5.1, UTF-8) that publishes one preliminary, final or amended report version.

    OBR-25 and every OBX-11 carry the result status: ``P`` preliminary, ``F`` final, ``C`` corrected
    (amended). Report text is TX, one repetition of OBX-5 per line (how a TX value carries line breaks).
    """
    status = RESULT_STATUS.get(doc.status)
    if status is None:
        raise ValueError(f"report version status {doc.status!r} is not published (draft)")
    oru = Message("ORU_R01", version=ORU_VERSION, validation_level=TOLERANT)
    _oru_msh(oru.msh, doc, control_id, receiving_application, receiving_facility, now or datetime.now(UTC))
    result = oru.add_group("ORU_R01_PATIENT_RESULT")
    _oru_pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), doc)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _oru_orc(order.add_segment("ORC"), doc)
    _oru_obr(order.add_segment("OBR"), doc, status)
    observations = [(FINDINGS_CODE, doc.findings), (IMPRESSION_CODE, doc.impression)]
    if doc.amend_reason.strip():
        observations.append((AMENDMENT_CODE, doc.amend_reason))
    set_id = 0
    for code, text in observations:
        if text.strip():
            set_id += 1
            _oru_obx(order.add_group("ORU_R01_OBSERVATION").add_segment("OBX"), set_id, "TX", code,
                     text_lines(text), status, doc)
    _oru_obx(order.add_group("ORU_R01_OBSERVATION").add_segment("OBX"), set_id + 1, "ST", STUDY_UID_CODE,
             [doc.study_instance_uid], status, doc)
    return oru.to_er7()


def text_lines(text: str) -> list[str]:
    """Report text as display lines (CRLF, CR and LF all break; trailing blank lines dropped)."""
    lines = [_one_line(line, keep_tabs=True) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines or [""]


# -- ORM field reading --------------------------------------------------------------------------


def _header_from_line(line: str) -> Header:
    if not line.startswith("MSH"):
        raise Hl7Reject("not an HL7 v2 message: it must start with an MSH segment", SEGMENT_SEQUENCE_ERROR, "MSH")
    try:
        encoding_chars, _, _ = get_message_info(line)
        segment = parse_segment(line, version=ORU_VERSION, encoding_chars=encoding_chars, validation_level=TOLERANT)
    except (HL7apyException, ValueError, IndexError, KeyError) as exc:
        raise Hl7Reject(f"unreadable MSH segment: {exc}", SEGMENT_SEQUENCE_ERROR, "MSH") from exc
    return _header_from_segment(segment, encoding_chars)


def _header_from_segment(msh: Segment, enc: dict[str, str] | None = None) -> Header:
    reader = _Reader(enc or _encoding_chars_of(msh), "utf-8")
    return Header(
        sending_application=reader.text(msh, 3), sending_facility=reader.text(msh, 4),
        receiving_application=reader.text(msh, 5), receiving_facility=reader.text(msh, 6),
        control_id=reader.text(msh, 10), processing_id=reader.text(msh, 11) or "P",
        version=reader.text(msh, 12), message_code=reader.text(msh, 9, 1).upper(),
        trigger_event=reader.text(msh, 9, 2).upper(), charset=reader.text(msh, 18),
    )


def _encoding_chars_of(msh: Segment) -> dict[str, str]:
    seps = _field_reps(msh, 2)[0].to_er7() if _field_reps(msh, 2) else "^~\\&"
    field_sep = _field_reps(msh, 1)[0].to_er7() if _field_reps(msh, 1) else "|"
    return {"FIELD": field_sep, "COMPONENT": seps[0], "REPETITION": seps[1], "ESCAPE": seps[2],
            "SUBCOMPONENT": seps[3], "SEGMENT": "\r", "GROUP": "\r"}


def _segments(message: Message) -> list[Segment]:
    return [c for c in message.children if isinstance(c, Segment)]


def _order_groups(segments: Sequence[Segment]) -> tuple[Segment | None, list[list[Segment]]]:
    """The PID and the order groups (ORC followed by its OBR/TQ1/NTE/…), checking their sequence."""
    pid: Segment | None = None
    groups: list[list[Segment]] = []
    for seg in segments[1:]:
        name = seg.name
        if name == "MSH":
            raise Hl7Error("a second MSH segment (batches are not supported)", SEGMENT_SEQUENCE_ERROR, "MSH")
        if name == "PID":
            if groups:
                raise Hl7Error("segment order: PID must come before ORC", SEGMENT_SEQUENCE_ERROR, "PID")
            if pid is not None:
                raise Hl7Error("more than one PID segment", SEGMENT_SEQUENCE_ERROR, "PID", sequence=2)
            pid = seg
        elif name == "ORC":
            groups.append([seg])
        elif name in ("OBR", "TQ1", "TQ2", "ODS", "RQD", "RXO") and not groups:
            raise Hl7Error(f"segment order: {name} must follow an ORC segment", SEGMENT_SEQUENCE_ERROR, name)
        elif groups:
            groups[-1].append(seg)
    if not groups:
        raise Hl7Error("ORC segment is required", REQUIRED_FIELD_MISSING, "ORC")
    return pid, groups


class _Reader:
    """Reads unescaped text out of parsed hl7apy segments, by field and component position."""

    def __init__(self, enc: dict[str, str], codec: str) -> None:
        self.enc = enc
        self.codec = codec

    def text(self, segment: Segment | None, field_no: int, *path: int, repetition: int = 0) -> str:
        """Field ``field_no`` (1-based), ``repetition`` (0-based), then components/subcomponents by position;
        the first leaf below that, unescaped and stripped ("" when absent)."""
        if segment is None:
            return ""
        reps = _field_reps(segment, field_no)
        if repetition >= len(reps):
            return ""
        element: Element | None = reps[repetition]
        for position in path:
            element = _child(element, position) if element is not None else None
        return self._leaf(element)

    def repetitions(self, segment: Segment, field_no: int) -> int:
        return len(_field_reps(segment, field_no))

    def _leaf(self, element: Element | None) -> str:
        while element is not None and element.children:
            element = _child(element, 1)
        if element is None:
            return ""
        # The value as it was on the wire: hl7apy's to_er7() would re-escape it (loosely) first.
        value = getattr(element, "value", None)
        raw = getattr(value, "value", value)
        if not isinstance(raw, str):
            raw = element.to_er7() if raw is not None else ""  # dates parsed into datetime: their ER7 text
        return unescape(raw, self.enc, self.codec).strip()

    def patient_id(self, pid: Segment) -> tuple[str, str]:
        """PID-3 (the repetition typed MR, else the first; PID-2 when PID-3 is empty) and its issuer (CX.4)."""
        for field_no in (3, 2):
            count = self.repetitions(pid, field_no)
            if not count:
                continue
            chosen = next((r for r in range(count) if self.text(pid, field_no, 5, repetition=r).upper() == "MR"), 0)
            value = self.text(pid, field_no, 1, repetition=chosen)
            if value:
                issuer = self.text(pid, field_no, 4, 1, repetition=chosen) or \
                    self.text(pid, field_no, 4, 2, repetition=chosen)
                return value, issuer
        raise Hl7Error("PID-3 patient identifier is required", REQUIRED_FIELD_MISSING, "PID", 3)

    def person_name(self, segment: Segment | None, field_no: int, offset: int) -> str:
        """XPN (offset 0) or XCN (offset 1) → DICOM PN ``Family^Given^Middle^Prefix^Suffix``."""
        if segment is None:
            return ""
        family = self.text(segment, field_no, 1 + offset)
        given = self.text(segment, field_no, 2 + offset)
        middle = self.text(segment, field_no, 3 + offset)
        suffix = self.text(segment, field_no, 4 + offset)
        prefix = self.text(segment, field_no, 5 + offset)
        return "^".join([family, given, middle, prefix, suffix]).rstrip("^")

    def new_order(self, pid: Segment, group: list[Segment], patient_id: str, issuer: str, facility: str,
                  n: int) -> NewOrder:
        orc = group[0]
        obr = _first(group, "OBR")
        tq1 = _first(group, "TQ1")
        if obr is None:
            raise Hl7Error("OBR segment is required after ORC for a new order", REQUIRED_FIELD_MISSING, "OBR",
                           sequence=n)
        name = self.person_name(pid, 5, 0)
        if not name:
            raise Hl7Error("PID-5 patient name is required", REQUIRED_FIELD_MISSING, "PID", 5)
        procedure = self.text(obr, 4, 2) or self.text(obr, 4, 1)
        if not procedure:
            raise Hl7Error("OBR-4 universal service identifier is required", REQUIRED_FIELD_MISSING, "OBR", 4, n)
        start_date, start_time = _ts_parts(self.text(tq1, 7) or self.text(orc, 7, 4) or self.text(obr, 7))
        return NewOrder(
            patient_id=patient_id, issuer_of_patient_id=issuer, patient_name=name,
            patient_birth_date=_ts_parts(self.text(pid, 7))[0], patient_sex=_sex(self.text(pid, 8)),
            modality=self._modality(obr), station_ae_title="", start_date=start_date, start_time=start_time,
            procedure_description=procedure, accession_number=self._accession(orc, obr),
            placer_order_number=self.text(orc, 2, 1) or self.text(obr, 2, 1),
            referring_physician_name=self.person_name(orc, 12, 1) or self.person_name(obr, 16, 1),
            priority=self._priority(orc, tq1, obr, n), reason=self._reason(orc, obr),
            facility=facility, source="hl7",
        )

    def cancel(self, group: list[Segment], control: str, n: int) -> CancelRequest:
        orc = group[0]
        obr = _first(group, "OBR")
        accession = self._accession(orc, obr)
        placer = self.text(orc, 2, 1) or self.text(obr, 2, 1)
        if not accession and not placer:
            raise Hl7Error(f"ORC-1 {control}: no order to cancel (ORC-2 placer or ORC-3/OBR-18 accession number)",
                           REQUIRED_FIELD_MISSING, "ORC", 2, n)
        return CancelRequest(control, accession, placer)

    def _accession(self, orc: Segment, obr: Segment | None) -> str:
        return self.text(orc, 3, 1) or self.text(obr, 18) or self.text(obr, 3, 1)

    def _modality(self, obr: Segment) -> str:
        """OBR-24 (a DICOM modality, or a table 0074 section such as NMR/RUS), else the leading letters of
        the OBR-4 code (``CTCHEST`` → CT, ``MR-BRAIN`` → MR), else OT."""
        section = self.text(obr, 24).upper()
        if section in DICOM_MODALITIES or section in _SECTION_MODALITIES:
            return _SECTION_MODALITIES.get(section, section)
        letters = _prefix(_LETTERS, self.text(obr, 4, 1)).upper()
        for prefix in (letters[:k] for k in (3, 2) if len(letters) >= k):
            if prefix in DICOM_MODALITIES or prefix in _CODE_PREFIXES:
                return _CODE_PREFIXES.get(prefix, prefix)
        return DEFAULT_MODALITY

    def _priority(self, orc: Segment, tq1: Segment | None, obr: Segment, n: int) -> str:
        code = (self.text(orc, 7, 6) or self.text(tq1, 9, 1) or self.text(obr, 27, 6)).upper()
        if not code:
            return "ROUTINE"
        if code not in _PRIORITIES:
            raise Hl7Error(f"unknown priority {code!r} (ORC-7.6/TQ1-9/OBR-27.6): S, A, R, T, P, C",
                           TABLE_VALUE_NOT_FOUND, "ORC", 7, n)
        return _PRIORITIES[code]

    def _reason(self, orc: Segment, obr: Segment) -> str:
        """OBR-31 reasons for study (text, else code; repetitions joined by "; "), then ORC-16 if different."""
        reasons = [self.text(obr, 31, 2, repetition=r) or self.text(obr, 31, 1, repetition=r)
                   for r in range(self.repetitions(obr, 31))]
        control_reason = self.text(orc, 16, 2) or self.text(orc, 16, 1)
        if control_reason and control_reason not in reasons:
            reasons.append(control_reason)
        return "; ".join(r for r in reasons if r)


def _field_reps(segment: Segment, field_no: int) -> list[Element]:
    """The repetitions of field ``field_no`` present in a parsed segment (by position, any version)."""
    return [c for c in segment.children if _position(c.name) == field_no]


def _child(element: Element, position: int) -> Element | None:
    return next((c for c in element.children if _position(c.name) == position), None)


def _position(name: str | None) -> int:
    """``PID_3`` → 3, ``CX_4`` → 4; an unnumbered child (a primitive's value) is position 1."""
    if not name:
        return 1
    head, _, tail = name.rpartition("_")
    return int(tail) if head and tail.isdigit() else 1


def _first(group: Sequence[Segment], name: str) -> Segment | None:
    return next((s for s in group if s.name == name), None)


_DIGITS = re.compile(r"\d*")
_LETTERS = re.compile(r"[A-Za-z]*")


def _prefix(pattern: re.Pattern[str], text: str) -> str:
    """The start of ``text`` that ``pattern`` matches (it matches the empty string too, so always)."""
    found = pattern.match(text)
    return found.group(0) if found else ""


def _ts_parts(value: str) -> tuple[str, str]:
    """HL7 TS/DTM ``YYYYMMDD[HHMM[SS[.S]]][+ZZZZ]`` → (YYYYMMDD, HHMMSS or HHMM or ""); a partial date → ("", "")."""
    digits = _prefix(_DIGITS, value.strip())
    if len(digits) < 8:
        return "", ""
    time_digits = digits[8:14]
    if len(time_digits) == 2:
        time_digits += "00"
    return digits[:8], time_digits if len(time_digits) in (4, 6) else ""


def _sex(value: str) -> str:
    """HL7 table 0001 → DICOM: M, F, O as they are; A (ambiguous) and N (not applicable) → O; U → ""."""
    code = value.strip().upper()
    return {"U": "", "A": "O", "N": "O"}.get(code, code)


# -- building helpers ---------------------------------------------------------------------------


def _hl7_text(value: str) -> str:
    """A value ready for hl7apy: control characters removed, backslashes already escaped as ``\\E\\``.

    hl7apy escapes ``|^~&`` and the escape character, but leaves a backslash alone when it is part of
    something that looks like an escape sequence (text such as ``C:\\F\\`` or ``|F\\`` would come out
    as real escapes). Escaping backslashes first makes every backslash hl7apy sees part of a valid
    sequence, which it never re-escapes; the other delimiters are still escaped by hl7apy.
    """
    return _one_line(value, keep_tabs=True).replace("\\", "\\E\\")


def _one_line(value: str, keep_tabs: bool = False) -> str:
    """Control characters (CR, LF, …) would break segments: each becomes a space."""
    return "".join(c if (c >= " " and c != "\x7f") or (keep_tabs and c == "\t") else " " for c in value)


def _put(element: Any, value: str) -> None:
    """Set a primitive field, component or subcomponent to literal text through hl7apy.

    The value is given as an hl7apy datatype object (not a bare string, which hl7apy would parse as
    ER7 at that element's level), so hl7apy escapes every delimiter in it when it writes ER7.
    """
    if value:
        element.value = datatype_factory(element.datatype or "ST", _hl7_text(value), version=element.version,
                                         validation_level=TOLERANT)


def _component(element: Any, position: int) -> Any:
    """The ``position``-th component of a field (or subcomponent of a component), whatever its datatype's name
    in this version (``MSG``, ``CM_MSG``, ``ELD``, ``CM_ELD``)."""
    return getattr(element, f"{element.datatype.lower()}_{position}")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _set_ts(element: Any, when: datetime) -> None:
    """A TS/DTM value with its UTC offset (``20261128093000+0700``); naive datetimes are taken as UTC.

    Digits and a sign only: assigned as ER7, which for these is the literal value."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    target = element.ts_1 if element.datatype == "TS" else element
    target.value = aware.strftime("%Y%m%d%H%M%S%z")


def _add_err(ack: Message, error: Hl7Error, version: str) -> None:
    err = ack.add_segment("ERR")
    code_text = _ERROR_TEXT.get(error.code, "")
    if _version_tuple(version) >= (2, 5):
        if error.segment:
            _put(err.err_2.erl_1, error.segment)
            _put(err.err_2.erl_2, str(error.sequence))
            if error.field_no:
                _put(err.err_2.erl_3, str(error.field_no))
        _put(err.err_3.cwe_1, str(error.code))
        _put(err.err_3.cwe_2, code_text)
        _put(err.err_3.cwe_3, "HL70357")
        _put(err.err_4, "E")
        _put(err.err_8, _one_line(error.message)[:250])
        return
    location = err.err_1  # ELD: segment^sequence^field^code (CE)
    if error.segment:
        _put(_component(location, 1), error.segment)
        _put(_component(location, 2), str(error.sequence))
        if error.field_no:
            _put(_component(location, 3), str(error.field_no))
    code = _component(location, 4)
    _put(_component(code, 1), str(error.code))
    _put(_component(code, 2), code_text)
    _put(_component(code, 3), "HL70357")


def _oru_msh(msh: Segment, doc: ReportDocument, control_id: str, receiving_application: str,
             receiving_facility: str, now: datetime) -> None:
    _put(msh.msh_3.hd_1, SENDING_APPLICATION)
    _put(msh.msh_4.hd_1, doc.facility)
    _put(msh.msh_5.hd_1, receiving_application)
    _put(msh.msh_6.hd_1, receiving_facility)
    _set_ts(msh.msh_7, now)
    _put(msh.msh_9.msg_1, "ORU")
    _put(msh.msh_9.msg_2, "R01")
    _put(msh.msh_9.msg_3, "ORU_R01")
    _put(msh.msh_10, control_id)
    _put(msh.msh_11.pt_1, "P")
    _put(msh.msh_12.vid_1, ORU_VERSION)
    _put(msh.msh_18, ORU_CHARSET)


def _oru_pid(pid: Segment, doc: ReportDocument) -> None:
    _put(pid.pid_1, "1")
    _put(pid.pid_3.cx_1, doc.patient_id)
    if doc.issuer_of_patient_id:
        _put(pid.pid_3.cx_4.hd_1, doc.issuer_of_patient_id)
    _put(pid.pid_3.cx_5, "MR")
    family, given, middle, prefix, suffix = (doc.patient_name.split("=")[0].split("^") + [""] * 5)[:5]
    name = pid.pid_5
    _put(name.xpn_1.fn_1, family)
    _put(name.xpn_2, given)
    _put(name.xpn_3, middle)
    _put(name.xpn_4, suffix)
    _put(name.xpn_5, prefix)
    if doc.patient_birth_date.isdigit():
        pid.pid_7.ts_1.value = doc.patient_birth_date  # digits: ER7 is the literal value
    _put(pid.pid_8, doc.patient_sex)


def _oru_orc(orc: Segment, doc: ReportDocument) -> None:
    _put(orc.orc_1, "RE")
    _put(orc.orc_2.ei_1, doc.placer_order_number)
    _put(orc.orc_3.ei_1, doc.accession_number)
    _put(orc.orc_5, "CM")
    _set_xcn(orc.orc_12, doc.referring_physician_name)


def _oru_obr(obr: Segment, doc: ReportDocument, status: str) -> None:
    _put(obr.obr_1, "1")
    _put(obr.obr_2.ei_1, doc.placer_order_number)
    _put(obr.obr_3.ei_1, doc.accession_number)
    _put(obr.obr_4.ce_2, doc.procedure or doc.study_description or "Imaging study")
    if doc.study_date.isdigit():  # digits only: ER7 is the literal value
        study_time = _prefix(_DIGITS, doc.study_time.replace(":", ""))[:6]
        obr.obr_7.ts_1.value = doc.study_date + study_time
    _set_xcn(obr.obr_16, doc.referring_physician_name)
    _put(obr.obr_18, doc.accession_number)
    reported_at = doc.signed_at or doc.created_at
    if reported_at is not None:
        _set_ts(obr.obr_22, reported_at)
    _put(obr.obr_24, doc.modalities[0] if doc.modalities else "RAD")
    _put(obr.obr_25, status)
    interpreter, interpreter_name = (doc.signed_by, doc.signed_by_name) if doc.signed_by else \
        (doc.author, doc.author_name)
    if interpreter:
        cnn = obr.obr_32.ndl_1
        _put(cnn.cnn_1, interpreter)
        _put(cnn.cnn_2, interpreter_name or interpreter)


def _oru_obx(obx: Segment, set_id: int, value_type: str, code: tuple[str, str, str], lines: list[str], status: str,
             doc: ReportDocument) -> None:
    _put(obx.obx_1, str(set_id))
    _put(obx.obx_2, value_type)
    _put(obx.obx_3.ce_1, code[0])
    _put(obx.obx_3.ce_2, code[1])
    _put(obx.obx_3.ce_3, code[2])
    for line in lines:  # one repetition per line; an empty line is an empty repetition
        repetition = obx.add_field("OBX_5")
        repetition.datatype = value_type
        _put(repetition, line)
    _put(obx.obx_11, status)
    if doc.signed_at is not None:
        _set_ts(obx.obx_14, doc.signed_at)


def _set_xcn(field_: Any, dicom_name: str) -> None:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` → XCN components 2-6."""
    if not dicom_name.strip():
        return
    family, given, middle, prefix, suffix = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    _put(field_.xcn_2.fn_1, family)
    _put(field_.xcn_3, given)
    _put(field_.xcn_4, middle)
    _put(field_.xcn_5, suffix)
    _put(field_.xcn_6, prefix)

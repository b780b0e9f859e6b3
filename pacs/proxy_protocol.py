"""The PROXY protocol, versions 1 and 2 (HAProxy's specification): a load balancer in TCP mode tells
the server who the real client is, in a header sent before the client's own bytes.

Pure parsing, independent of sockets: :func:`read_header` pulls exactly the header's bytes through a
``recv_exactly(n)`` callable (so nothing of the DICOM stream or TLS handshake after it is consumed) and
never reads more than :data:`MAX_V1_BYTES` (version 1, a text line) or ``16 + MAX_V2_BODY_BYTES``
(version 2, binary). ``dicom_scp.server`` applies it, only to connections from ``PACS_TRUSTED_PROXIES``
(:mod:`pacs.trusted_proxies`); from any other peer a PROXY header is just an invalid PDU.

What is accepted:

- v1: ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n``, the same with ``TCP6``, and ``PROXY UNKNOWN …\\r\\n``
  (the proxy does not know the client: the connection's own address stands);
- v2: the 12-byte signature, version 2, command ``LOCAL`` (the proxy's own connection, e.g. a health check:
  its own address stands) or ``PROXY`` with a TCP (stream) address block of family INET or INET6, or
  family UNSPEC / UNIX (address unknown: the connection's own address stands). TLVs after the address
  block are skipped; datagram transports and other versions or commands are errors.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1_BYTES = 107  # the longest v1 line, CRLF included (the specification's bound)
V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX address blocks
MAX_V2_TLV_BYTES = 1024  # TLVs we skip (HAProxy sends none unless configured to)
MAX_V2_BODY_BYTES = 216 + MAX_V2_TLV_BYTES


class ProxyProtocolError(ValueError):
    """Not a valid PROXY protocol header (or the connection ended inside it)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the proxy said. ``source`` is None when the connection's own address stands
    (v1 UNKNOWN, v2 LOCAL, v2 UNSPEC or UNIX addresses)."""

    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def read_header(recv_exactly: Callable[[int], bytes]) -> ProxyHeader:
    """Read and parse one header. ``recv_exactly(n)`` returns n bytes, or fewer when the connection ended."""
    start = _take(recv_exactly, 8)
    if start == V2_SIGNATURE[:8]:
        head = start + _take(recv_exactly, 8)
        length = struct.unpack(">H", head[14:16])[0]
        if head[:12] != V2_SIGNATURE:
            raise ProxyProtocolError("bad PROXY protocol v2 signature")
        if length > MAX_V2_BODY_BYTES:
            raise ProxyProtocolError(f"PROXY protocol v2 header of {16 + length} bytes, the limit is "
                                     f"{16 + MAX_V2_BODY_BYTES}")
        return parse_v2(head + _take(recv_exactly, length))
    if start[:6] == V1_PREFIX:
        line = start
        while not line.endswith(b"\r\n"):
            if len(line) >= MAX_V1_BYTES:
                raise ProxyProtocolError(f"PROXY protocol v1 line longer than {MAX_V1_BYTES} bytes")
            line += _take(recv_exactly, 1)
        return parse_v1(line)
    raise ProxyProtocolError("no PROXY protocol header")


def parse(data: bytes) -> ProxyHeader:
    """Parse a complete header (``data`` is exactly the header's bytes)."""
    if data.startswith(V2_SIGNATURE):
        return parse_v2(data)
    return parse_v1(data)


def parse_v1(line: bytes) -> ProxyHeader:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` or ``PROXY UNKNOWN[ …]\\r\\n``."""
    if len(line) > MAX_V1_BYTES:
        raise ProxyProtocolError(f"PROXY protocol v1 line longer than {MAX_V1_BYTES} bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n") or b"\r\n" in line[:-2]:
        raise ProxyProtocolError("malformed PROXY protocol v1 line")
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY protocol v1 line is not ASCII") from None
    if fields[1] == "UNKNOWN":
        return ProxyHeader(1)
    if fields[1] not in ("TCP4", "TCP6") or len(fields) != 6:
        raise ProxyProtocolError("malformed PROXY protocol v1 line")
    version = 4 if fields[1] == "TCP4" else 6
    source = (_address(fields[2], version), _port(fields[4]))
    destination = (_address(fields[3], version), _port(fields[5]))
    return ProxyHeader(1, source, destination)


def parse_v2(data: bytes) -> ProxyHeader:
    """The 16-byte v2 header and its body (address block, then TLVs)."""
    if len(data) < 16 or not data.startswith(V2_SIGNATURE):
        raise ProxyProtocolError("bad PROXY protocol v2 signature")
    version_command, family_transport, length = struct.unpack(">BBH", data[12:16])
    if len(data) != 16 + length:
        raise ProxyProtocolError(f"PROXY protocol v2 header announces {length} bytes, {len(data) - 16} given")
    if length > MAX_V2_BODY_BYTES:
        raise ProxyProtocolError(f"PROXY protocol v2 header of {16 + length} bytes, the limit is "
                                 f"{16 + MAX_V2_BODY_BYTES}")
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY protocol v2 version {version_command >> 4}")
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the proxy's own connection; the address block (if any) is ignored
        return ProxyHeader(2)
    if command != 0x1:
        raise ProxyProtocolError(f"PROXY protocol v2 command {command}")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family == 0x0:  # UNSPEC: the proxy does not know the client
        return ProxyHeader(2)
    if family not in V2_ADDRESS_BYTES or transport not in (0x0, 0x1):
        raise ProxyProtocolError(f"PROXY protocol v2 family/transport 0x{family_transport:02X} is not a stream")
    if length < V2_ADDRESS_BYTES[family]:
        raise ProxyProtocolError(f"PROXY protocol v2 address block of {length} bytes is too short")
    body = data[16:]
    if family == 0x3:  # UNIX sockets: no address of ours to use
        return ProxyHeader(2)
    size = 4 if family == 0x1 else 16
    source = str(ipaddress.ip_address(body[:size]))
    destination = str(ipaddress.ip_address(body[size:2 * size]))
    sport, dport = struct.unpack(">HH", body[2 * size:2 * size + 4])
    return ProxyHeader(2, (source, sport), (destination, dport))


def _take(recv_exactly: Callable[[int], bytes], n: int) -> bytes:
    data = recv_exactly(n) if n else b""
    if len(data) != n:
        raise ProxyProtocolError("connection ended inside the PROXY protocol header")
    return data


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY protocol v1: {text[:45]!r} is not an IP address") from None
    if address.version != version:
        raise ProxyProtocolError(f"PROXY protocol v1: {text!r} is not an IPv{version} address")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY protocol v1: {text[:8]!r} is not a port")
    return int(text)

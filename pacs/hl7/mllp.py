"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol): ``0x0B message 0x1C 0x0D``.

The reader is bounded: it refuses a message larger than ``max_bytes`` as soon as it has read
that many bytes (never holding more), so a hostile or broken peer cannot make a listener buffer
megabytes; :func:`skip_frame` then discards the rest of that frame without keeping it, so the
connection can go on with the next message.
"""

from __future__ import annotations

import io
import socket
import time

START = b"\x0b"  # vertical tab
END = b"\x1c\x0d"  # file separator, carriage return
_END_BYTE = 0x1C
_CHUNK = 65_536
_HEAD_BYTES = 4096  # kept of an oversized frame: enough for its MSH (the AR names its control id)


class MllpError(Exception):
    """The byte stream is not a well-formed MLLP stream (or it ended inside a frame)."""


class FrameTooLarge(MllpError):
    """A frame's content grew past the limit. ``head`` holds its first bytes (enough to read the MSH)."""

    def __init__(self, limit: int, head: bytes) -> None:
        super().__init__(f"message larger than {limit} bytes refused")
        self.limit = limit
        self.head = head


class MllpTimeout(MllpError):
    """The peer sent nothing for the socket's timeout, or took longer than the deadline for one frame."""


def frame(payload: bytes) -> bytes:
    """Wrap one HL7 message (bytes, segments separated by ``\\r``) in an MLLP block."""
    return START + payload + END


def socket_reader(sock: socket.socket, buffer_size: int = _CHUNK) -> io.BufferedReader:
    """``sock.makefile("rb", buffering=buffer_size)`` written out, so that its type is known to be a
    BufferedReader (``peek``): typeshed cannot tell it from an unbuffered file for a variable size."""
    return io.BufferedReader(sock.makefile("rb", buffering=0), buffer_size)


def read_frame(sock_file: io.BufferedReader, max_bytes: int, frame_timeout_s: float | None = None) -> bytes | None:
    """Read one MLLP frame's content from a buffered binary stream (``socket.makefile("rb")``).

    Waiting for a frame to start and each receive are bounded by the socket's own timeout; once it
    started, the whole frame must arrive within ``frame_timeout_s`` (so a peer trickling bytes
    cannot hold a connection forever). Returns None when the stream ends cleanly between frames.
    Raises :class:`FrameTooLarge` as soon as the content exceeds ``max_bytes`` (what was read is
    dropped, only its head is kept), :class:`MllpTimeout` on either timeout, and :class:`MllpError`
    for bytes outside a frame or a stream that ends inside one. Whitespace between frames (a stray
    CR/LF some senders add) is ignored. Never reads past the frame's end, so a peer may send its
    next message at once.
    """
    if not _skip_to_start(sock_file, None):
        return None
    deadline = time.monotonic() + frame_timeout_s if frame_timeout_s is not None else None
    parts: list[bytes] = []
    size = 0
    while True:
        buffered = _peek(sock_file, deadline)
        if not buffered:
            raise MllpError("connection closed inside an MLLP frame")
        end = buffered.find(_END_BYTE)
        body = buffered if end < 0 else buffered[:end]
        if size + len(body) > max_bytes:
            raise FrameTooLarge(max_bytes, (b"".join(parts) + body)[:_HEAD_BYTES])
        sock_file.read(len(body) if end < 0 else end + 1)
        parts.append(body)
        size += len(body)
        if end >= 0:
            _expect_cr(sock_file, deadline)
            return b"".join(parts)


def skip_frame(sock_file: io.BufferedReader, max_bytes: int, timeout_s: float | None = None) -> None:
    """Discard the rest of the current frame (after :class:`FrameTooLarge`) without keeping it.

    Gives up (raises :class:`MllpError`) after ``max_bytes`` more bytes, after ``timeout_s``, or at
    the end of the stream: then the caller closes the connection.
    """
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    skipped = 0
    while skipped <= max_bytes:
        buffered = _peek(sock_file, deadline)
        if not buffered:
            raise MllpError("connection closed inside an oversized frame")
        end = buffered.find(_END_BYTE)
        if end >= 0:
            sock_file.read(end + 1)
            _expect_cr(sock_file, deadline)
            return
        sock_file.read(len(buffered))
        skipped += len(buffered)
    raise MllpError(f"oversized frame still not ended after {max_bytes} more bytes")


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); ValueError when it is not one."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid HL7 destination address {address!r}: host:port")
    return host, int(port_text)


def send_and_receive(host: str, port: int, payload: bytes, timeout_s: float, max_reply_bytes: int = 1024**2) -> bytes:
    """Open a connection, send one framed message and return the content of the one reply frame.

    Raises OSError for network trouble and :class:`MllpError` (including :class:`MllpTimeout`) for a
    missing, late or malformed reply.
    """
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(frame(payload))
        with socket_reader(sock) as stream:
            reply = read_frame(stream, max_reply_bytes, timeout_s)
    if reply is None:
        raise MllpError(f"{host}:{port} closed the connection without an acknowledgement")
    return reply


def _skip_to_start(sock_file: io.BufferedReader, deadline: float | None) -> bool:
    """Consume bytes up to and including the start byte; False at a clean end of stream."""
    while True:
        byte = _read_exact(sock_file, 1, deadline)
        if not byte:
            return False
        if byte == START:
            return True
        if byte not in (b"\r", b"\n", b" ", b"\t"):
            raise MllpError(f"expected an MLLP start byte 0x0B, got 0x{byte[0]:02X}")


def _expect_cr(sock_file: io.BufferedReader, deadline: float | None) -> None:
    if _read_exact(sock_file, 1, deadline) != b"\r":
        raise MllpError("MLLP end byte 0x1C not followed by 0x0D")


def _peek(sock_file: io.BufferedReader, deadline: float | None) -> bytes:
    """What is buffered, or one receive's worth (empty at the end of the stream); consumes nothing."""
    _check_deadline(deadline)
    try:
        return sock_file.peek(_CHUNK)
    except TimeoutError as exc:  # socket.timeout
        raise MllpTimeout("the peer sent nothing within the timeout") from exc


def _read_exact(sock_file: io.BufferedReader, n: int, deadline: float | None) -> bytes:
    _check_deadline(deadline)
    try:
        return sock_file.read(n)
    except TimeoutError as exc:
        raise MllpTimeout("the peer sent nothing within the timeout") from exc


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise MllpTimeout("the peer took too long to send one message")

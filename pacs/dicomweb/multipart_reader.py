"""Reading a ``multipart/related`` body (RFC 2046 §5.1, RFC 2387) as a stream: a push parser.

The request body is fed in chunks of any size; the parser calls its :class:`PartSink` with each part's
headers, then its body in pieces, then the end of the part. It holds at most one chunk plus a
delimiter's length of body bytes, and at most :data:`MAX_HEADER_BYTES` of one part's headers, so a body
of any size is read in bounded memory (where the parts go is the sink's business).

Syntax accepted (lenient where RFC 2046 allows it):

- a preamble before the first delimiter is skipped (at most :data:`MAX_PREAMBLE_BYTES`);
- a delimiter line is ``CRLF --boundary``, optionally followed by spaces/tabs, then ``CRLF``
  (the first one may start the body without the CRLF);
- each part has header lines ``Name: value`` ended by an empty line (no headers at all is allowed);
- the close delimiter is ``--boundary--``; the epilogue after it is ignored.

Anything else raises :class:`MultipartError` (an :class:`~pacs.errors.InvalidInput`: HTTP 400).
"""

from __future__ import annotations

import re
from typing import Protocol

from pacs.errors import InvalidInput

MAX_HEADER_BYTES = 16 * 1024  # one part's header block
MAX_PREAMBLE_BYTES = 64 * 1024  # bytes before the first delimiter
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]$")  # RFC 2046 bchars


class MultipartError(InvalidInput):
    """The body is not a well-formed multipart body; the message says where it went wrong."""


class PartSink(Protocol):
    def begin_part(self, headers: dict[str, str]) -> None: ...

    def part_data(self, data: bytes) -> None: ...

    def end_part(self) -> None: ...


def check_boundary(boundary: str) -> bytes:
    """The boundary as bytes, or MultipartError when RFC 2046 does not allow it (1-70 characters of bchars)."""
    if not _BOUNDARY_RE.match(boundary):
        raise MultipartError(f"invalid multipart boundary {boundary[:80]!r} (RFC 2046: 1 to 70 characters)")
    return boundary.encode("ascii")


class MultipartReader:
    """Feed body chunks with :meth:`feed`; call :meth:`close` at the end of the body."""

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)

    def __init__(self, boundary: str, sink: PartSink) -> None:
        self._delimiter = b"\r\n--" + check_boundary(boundary)
        self._sink = sink
        self._buf = bytearray(b"\r\n")  # so that a delimiter at the very start is found like any other
        self._state = self._PREAMBLE
        self._skipped = 0
        self.parts = 0

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, chunk: bytes) -> None:
        if self._state == self._DONE or not chunk:
            return  # the epilogue is ignored
        self._buf += chunk
        while self._step():
            pass

    def close(self) -> None:
        """The body has ended: it must have ended with the close delimiter."""
        if self._state != self._DONE:
            where = {self._PREAMBLE: "before its first boundary delimiter",
                     self._HEADERS: f"inside the headers of part {self.parts + 1}",
                     self._BODY: f"inside part {self.parts} (no closing boundary)",
                     self._AFTER_DELIMITER: "after a boundary delimiter"}[self._state]
            raise MultipartError(f"the multipart body ends {where}")

    # -- states ---------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Advance by one state transition; False when more input is needed."""
        buf, delim = self._buf, self._delimiter
        if self._state == self._PREAMBLE:
            at = buf.find(delim)
            if at < 0:
                keep = len(delim) - 1
                if len(buf) > keep:
                    self._skipped += len(buf) - keep
                    del buf[:len(buf) - keep]
                if self._skipped > MAX_PREAMBLE_BYTES:
                    raise MultipartError(f"no boundary delimiter in the first {MAX_PREAMBLE_BYTES} bytes "
                                         "(does the body use the boundary of its Content-Type?)")
                return False
            del buf[:at + len(delim)]
            self._state = self._AFTER_DELIMITER
            return True
        if self._state == self._AFTER_DELIMITER:
            return self._after_delimiter()
        if self._state == self._HEADERS:
            return self._headers()
        if self._state == self._BODY:
            at = buf.find(delim)
            if at < 0:
                safe = len(buf) - (len(delim) - 1)
                if safe > 0:
                    self._emit(safe)
                    del buf[:safe]
                return False
            if at:
                self._emit(at)
            self._sink.end_part()
            del buf[:at + len(delim)]
            self._state = self._AFTER_DELIMITER
            return True
        return False

    def _emit(self, length: int) -> None:
        with memoryview(self._buf) as view:  # one copy of the body bytes, released before the buffer shrinks
            data = bytes(view[:length])
        self._sink.part_data(data)

    def _after_delimiter(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":
            self._state = self._DONE
            buf.clear()
            return False
        i = 0
        while i < len(buf) and buf[i] in b" \t":  # transport padding
            i += 1
            if i > 256:
                raise MultipartError("malformed boundary delimiter line (too much padding)")
        if len(buf) - i < 2:
            return False
        if buf[i:i + 2] != b"\r\n":
            raise MultipartError(f"malformed boundary delimiter line after part {self.parts} "
                                 "(a boundary must be followed by CRLF or --)")
        del buf[:i + 2]
        self._state = self._HEADERS
        return True

    def _headers(self) -> bool:
        buf = self._buf
        if buf[:2] == b"\r\n":  # no header lines
            block, consumed = b"", 2
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError(f"the headers of part {self.parts + 1} exceed {MAX_HEADER_BYTES} bytes")
                return False
            if end > MAX_HEADER_BYTES:
                raise MultipartError(f"the headers of part {self.parts + 1} exceed {MAX_HEADER_BYTES} bytes")
            block, consumed = bytes(buf[:end]), end + 4
        headers = _parse_headers(block, self.parts + 1)
        del buf[:consumed]
        self.parts += 1
        self._sink.begin_part(headers)
        self._state = self._BODY
        return True


def _parse_headers(block: bytes, number: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for raw in block.split(b"\r\n"):
        line = raw.decode("latin-1")
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise MultipartError(f"malformed header line in part {number}: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers

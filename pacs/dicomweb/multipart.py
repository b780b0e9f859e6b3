"""``multipart/related`` bodies (RFC 2387, PS3.18 8.7.1.2) written as a stream of byte chunks.

Each part is ``--boundary CRLF headers CRLF CRLF body``, the next one starts with ``CRLF --boundary``
and the body ends with ``CRLF --boundary-- CRLF``. Parts are produced one at a time from iterators of
chunks, so a study is never held in memory.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator


class MultipartWriter:
    def __init__(self, part_type: str) -> None:
        self.part_type = part_type
        self.boundary = f"pacs-{secrets.token_hex(16)}"
        self._parts = 0

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def part(self, content_type: str, body: Iterable[bytes] | bytes, location: str = "") -> Iterator[bytes]:
        """The chunks of one part (headers, then the body's own chunks)."""
        lead = b"\r\n" if self._parts else b""
        self._parts += 1
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        yield lead + head.encode("ascii") + b"\r\n"
        if isinstance(body, bytes | bytearray):
            yield bytes(body)
        else:
            yield from body

    def end(self) -> bytes:
        lead = b"\r\n" if self._parts else b""
        return lead + f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def parts(self) -> int:
        return self._parts

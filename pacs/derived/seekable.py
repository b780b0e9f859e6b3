"""Reading a stored object the way pydicom needs it: seekable, even from a store that streams (S3)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import BinaryIO

from storage import ObjectStore

#: Objects read from a store that cannot seek (S3) are copied to a temporary file, in memory up to this size.
SPOOL_BYTES = 32 * 1024 * 1024


@contextmanager
def open_seekable(store: ObjectStore, key: str) -> Iterator[BinaryIO]:
    """The stored object as a seekable stream: pydicom seeks back to read deferred values."""
    with ExitStack() as stack:
        stream = stack.enter_context(store.open(key))
        if not stream.seekable():
            spool = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES))
            shutil.copyfileobj(stream, spool, 1024 * 1024)
            stream.close()  # release the connection before the caller works on the copy
            spool.seek(0)
            stream = spool  # type: ignore[assignment]  # an IO[bytes]: BinaryIO's methods, not its nominal type
        yield stream

"""WADO-RS ``/metadata``: the DICOM JSON of a study, series or instance, streamed.

The workers keep a document per series and a fragment per instance in the store
(:mod:`pacs.dicomweb.metadata`, :mod:`pacs.derived`). A series' stored document is used only while it is current
(its series task is done: every instance the series has now is in it, as it is now); otherwise the
answer is assembled from the current instances' fragments, and an instance whose fragment is not built
yet (or is of a replaced version) is read from its stored object. So a worker that is behind, stopped
or failing makes ``/metadata`` slower, never wrong or missing.

Bulk data URIs are stored relative to the DICOMweb root; they are made absolute with the request's
base URL on the way out (a byte substitution on the compact JSON, never a parse of the document).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from sqlalchemy.orm import Session, sessionmaker

from pacs.dicomweb import metadata
from pacs.dicomweb.objects import open_seekable
from pacs.dicomweb.resources import StoredInstance, Target, iter_instances, series_documents, series_members
from storage import ObjectNotFound, ObjectStore, StorageUnavailable
from storage.base import CHUNK_SIZE
from storage.keys import instance_metadata_key

log = logging.getLogger(__name__)

_BULK = b'"BulkDataURI":"studies/'


class MetadataDocuments:
    def __init__(self, sessions: sessionmaker[Session], store: ObjectStore, assume_utf8_for_latin1: bool) -> None:
        self.sessions = sessions
        self.store = store
        self.assume_utf8_for_latin1 = assume_utf8_for_latin1

    def stream(self, target: Target, base_url: str) -> Iterator[bytes]:
        """The JSON array of the target's instances; ``base_url`` ends with the DICOMweb root and ``/``."""
        return absolute_bulk_uris(self._array(target), base_url)

    def _array(self, target: Target) -> Iterator[bytes]:
        yield b"["
        first = True
        for member in self._members(target):
            if not first:
                yield b","
            first = False
            yield from member
        yield b"]"

    def _members(self, target: Target) -> Iterator[Iterable[bytes]]:
        """Each instance's JSON object as chunks; a current series document counts as its whole run."""
        if target.sop_uid is not None:
            yield from self._fragments(list(iter_instances(self.sessions, target)))
            return
        for doc in series_documents(self.sessions, target):
            inner = self._stored_document(doc.metadata_key) if doc.current and doc.metadata_key else None
            if inner is not None:
                yield inner
            else:
                yield from self._fragments(series_members(self.sessions, target.study_uid, doc.series_uid))

    def _stored_document(self, key: str) -> Iterable[bytes] | None:
        """The stored array's members (without its brackets); None when it is missing, empty or not an
        array (the caller then builds the answer from the instances)."""
        try:
            stream = self.store.open(key)
        except ObjectNotFound:
            return None
        with stream:
            head = stream.read(CHUNK_SIZE)
            whole = not stream.read(1)
        if not head.startswith(b"["):
            log.warning("stored metadata document %s is not a JSON array: building the answer instead", key)
            return None
        if whole:
            inner = head.rstrip()[1:-1]
            return [inner] if inner.strip() else None
        return _without_brackets(self.store, key)

    def _fragments(self, members: list[StoredInstance]) -> Iterator[Iterable[bytes]]:
        for member in members:
            data = self._fragment(member)
            if data is not None:
                yield data

    def _fragment(self, member: StoredInstance) -> Iterable[bytes] | None:
        if member.fragment_current:
            key = instance_metadata_key(member.study_uid, member.series_uid, member.sop_uid)
            try:
                stored = self.store.get_bytes(key)
            except ObjectNotFound:
                pass
            else:
                if metadata.whole_fragment(stored):
                    return [stored]
                log.warning("stored fragment %s is not a whole JSON object: made from the object instead", key)
        try:
            with open_seekable(self.store, member.object_key) as fp:
                return [metadata.instance_metadata(fp, member.study_uid, member.series_uid, member.sop_uid,
                                                   assume_utf8_for_latin1=self.assume_utf8_for_latin1)]
        except (StorageUnavailable, ObjectNotFound):
            raise
        except Exception as exc:  # an unreadable object: left out, as the workers leave it out
            log.warning("metadata of %s left out: %s", member.sop_uid, exc)
            return None


def _without_brackets(store: ObjectStore, key: str) -> Iterator[bytes]:
    """A large stored array streamed without its opening ``[`` and closing ``]``."""
    with store.open(key) as stream:
        held = stream.read(CHUNK_SIZE)[1:]
        while chunk := stream.read(CHUNK_SIZE):
            yield held
            held = chunk
        yield held.rstrip()[:-1]


def absolute_bulk_uris(chunks: Iterable[bytes], base_url: str) -> Iterator[bytes]:
    """Prefix every stored relative ``BulkDataURI`` with ``base_url``, across chunk boundaries.

    The documents are compact JSON written by :func:`pacs.dicomweb.metadata.encode_json`, so the member always
    reads exactly ``"BulkDataURI":"studies/``; inside a JSON string the quotes would be escaped, so a
    value cannot imitate it.
    """
    replacement = b'"BulkDataURI":"' + base_url.encode("utf-8") + b"studies/"
    keep = len(_BULK) - 1  # a tail this long may be the start of a match the next chunk completes
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        data = (pending + chunk).replace(_BULK, replacement)
        cut = max(0, len(data) - keep)
        if cut:
            yield data[:cut]
        pending = data[cut:]
    if pending:
        yield pending

"""A new instance's DICOM JSON fragment, made at ingest from the dataset it already parsed.

The fragment is what ``/metadata`` and the series document (:mod:`pacs.derived.series`) serve for the instance.
Made here, it costs the walk of a dataset already in memory; made by a worker, it cost reading the object back,
parsing it again and the task's claim and bookkeeping (issue 13). A worker still makes it (the instance's derived
task, :mod:`pacs.derived.instance`) when ingest could not: no parsed dataset, a walk that failed, a new version of
an instance (its fragment is written only after the version is committed), or a store that refused the put.
"""

from __future__ import annotations

import logging

from pacs.dicomweb import metadata
from pacs.ingest.parsing import ReceivedObject

log = logging.getLogger(__name__)


def make_fragment(obj: ReceivedObject, *, assume_utf8_for_latin1: bool) -> bytes | None:
    """The encoded DICOM JSON object of ``obj``, bulk data as URIs under its UIDs; None when it cannot be made here."""
    if obj.dataset is None:
        return None
    try:
        return metadata.encode_json(metadata.instance_json(
            obj.dataset, obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid,
            assume_utf8_for_latin1=assume_utf8_for_latin1))
    except Exception as exc:  # an odd dataset: the worker's path reads the stored object and notes why
        log.info("fragment of %s left to the worker: %s", obj.sop_instance_uid, str(exc)[:200])
        return None

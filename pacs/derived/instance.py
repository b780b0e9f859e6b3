"""The instance handler (kind ``thumbnail``): an instance version's thumbnail and DICOM JSON fragment."""

from __future__ import annotations

import logging

from sqlalchemy import select

from pacs.context import AppContext
from pacs.db.models import Instance, Series, Study
from pacs.derived.outbox import redo_newer_version
from pacs.derived.seekable import open_seekable
from pacs.dicomweb import metadata
from pacs.failpoints import failpoint
from pacs.imaging.render import RenderBusy, RenderError, placeholder, thumbnail
from storage.keys import instance_metadata_key, thumbnail_key

log = logging.getLogger(__name__)


def build_thumbnail_and_fragment(ctx: AppContext, sop_uid: str, sha256: str) -> str | None:
    """Thumbnail and DICOM JSON fragment of one instance version, from one read of its stored object.

    The object is parsed once with its long values deferred: the fragment never touches the pixel
    data, and the thumbnail then reads just the pixel data from the same (local, seekable) copy.
    Returns a note when a placeholder thumbnail was used or no fragment could be made.
    """
    with ctx.read_sessions() as session:
        row = session.execute(
            select(Instance.object_key, Instance.sha256, Series.series_instance_uid, Study.study_instance_uid)
            .join(Series, Series.id == Instance.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .where(Instance.sop_instance_uid == sop_uid)
        ).one_or_none()
    if row is None:
        return "instance no longer indexed"
    object_key, current_sha, series_uid, study_uid = row
    if current_sha != sha256:
        return "superseded by a newer version"
    size = ctx.settings.thumbnail_size
    fragment: bytes | None = None
    image: bytes | None = None
    note = ""
    with open_seekable(ctx.store, object_key) as fp:
        try:
            ds = metadata.read_dataset(fp)
            fragment = metadata.encode_json(metadata.instance_json(
                ds, study_uid, series_uid, sop_uid, assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1))
            image = thumbnail(ds, size=size)
        except RenderBusy:  # the decode budget was taken for too long: retried later, never a placeholder
            raise
        except (RenderError, Exception) as exc:  # unreadable pixel data must not kill a worker
            note = f"placeholder: {exc}"[:500] if fragment else f"unreadable: {exc}"[:500]
            log.warning("thumbnail for %s uses a placeholder: %s", sop_uid, exc)
    if image is None:
        image = placeholder(size, note)
    key = thumbnail_key(study_uid, series_uid, sop_uid)
    failpoint("derived.before_write")
    ctx.store.put(key, image, length=len(image), content_type="image/jpeg")
    if fragment is not None:
        ctx.store.put(instance_metadata_key(study_uid, series_uid, sop_uid), fragment, length=len(fragment),
                      content_type="application/dicom+json", durable=False)  # checked when read (whole_fragment)
    failpoint("derived.after_write")
    with ctx.sessions() as session, session.begin():
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_uid).with_for_update()
        ).one_or_none()
        if instance is not None and instance.sha256 == sha256:
            instance.thumbnail_key = key
        elif instance is not None:
            redo_newer_version(session, instance.sop_instance_uid)
    return note or None

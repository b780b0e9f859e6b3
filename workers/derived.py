"""The task functions themselves: thin, idempotent, keyed by an outbox row id.

The same functions run in a Celery worker (scaled mode) and in the in-process pool
(embedded mode). A transient failure (store or index unavailable) raises
:class:`TransientError` so the caller retries; anything else is recorded on the row.
"""

from __future__ import annotations

import logging

import pydicom
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from pacs.context import AppContext
from pacs.db.models import DerivedTask, Instance, Series, Study
from pacs.imaging.render import RenderError, placeholder, thumbnail
from storage import StorageError, StorageUnavailable
from storage.keys import thumbnail_key

log = logging.getLogger(__name__)


class TransientError(Exception):
    """A dependency is down; the task should run again later."""


def run_derived_task(ctx: AppContext, task_id: int) -> str:
    """Run one outbox row's work; returns the row's final state."""
    try:
        with ctx.sessions() as session:
            task = session.get(DerivedTask, task_id)
            if task is None:
                return "missing"
            if task.state == "done":
                return "done"
            kind, subject_uid, sha256 = task.kind, task.subject_uid, task.sha256
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    handler = _HANDLERS.get(kind)
    if handler is None:
        return _finish(ctx, task_id, "failed", f"unknown task kind {kind!r}")
    try:
        error = handler(ctx, subject_uid, sha256)
    except (StorageUnavailable, SQLAlchemyError) as exc:
        attempts = _record_attempt(ctx, task_id, str(exc))
        if attempts >= ctx.settings.task_max_attempts:
            log.error("derived task %s (%s %s) failed after %d attempts: %s", task_id, kind, subject_uid,
                      attempts, exc)
            return _finish(ctx, task_id, "failed", f"gave up after {attempts} attempts: {exc}", count=False)
        raise TransientError(str(exc)) from exc
    except Exception as exc:  # a bug or an unexpected input: recorded for `pacs tasks failed`, not retried
        log.exception("derived task %s (%s %s) failed", task_id, kind, subject_uid)
        return _finish(ctx, task_id, "failed", f"{type(exc).__name__}: {exc}"[:2000])
    return _finish(ctx, task_id, "done", error or "")


def build_thumbnail(ctx: AppContext, sop_uid: str, sha256: str) -> str | None:
    """Render and store the instance's thumbnail; returns a note when a placeholder was used."""
    with ctx.sessions() as session:
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
    note = None
    try:
        with ctx.store.open(object_key) as stream:
            ds = pydicom.dcmread(stream, force=True)
        image = thumbnail(ds, size=ctx.settings.thumbnail_size)
    except StorageUnavailable:
        raise
    except (RenderError, StorageError, Exception) as exc:  # unreadable pixel data must not kill a worker
        note = f"placeholder: {exc}"[:500]
        log.warning("thumbnail for %s uses a placeholder: %s", sop_uid, exc)
        image = placeholder(ctx.settings.thumbnail_size, str(exc))
    key = thumbnail_key(study_uid, series_uid, sop_uid)
    ctx.store.put(key, image, length=len(image), content_type="image/jpeg")
    with ctx.sessions() as session, session.begin():
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one_or_none()
        if instance is not None and instance.sha256 == sha256:
            instance.thumbnail_key = key
    return note


_HANDLERS = {"thumbnail": build_thumbnail}


def _finish(ctx: AppContext, task_id: int, state: str, error: str, count: bool = True) -> str:
    try:
        with ctx.sessions() as session, session.begin():
            task = session.get(DerivedTask, task_id)
            if task is not None:
                task.state = state
                task.attempts += 1 if count else 0
                task.last_error = error
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    return state


def _record_attempt(ctx: AppContext, task_id: int, error: str) -> int:
    """Count a transient failure on the row; returns the attempts so far (0 if the index is down too)."""
    try:
        with ctx.sessions() as session, session.begin():
            task = session.get(DerivedTask, task_id)
            if task is None:
                return 0
            task.attempts += 1
            task.last_error = error[:2000]
            return task.attempts
    except SQLAlchemyError:
        log.warning("could not record attempt of derived task %s", task_id)
        return 0

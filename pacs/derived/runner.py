"""Running one derived task: claim its outbox row, call the handler of its kind, record the outcome.

The same function runs in a Celery worker (scaled mode: :mod:`workers.celery_app`) and in the in-process
pool (embedded mode: :mod:`pacs.derived.pool`); it takes the row's id and is idempotent. A transient
failure (store or index unavailable) raises :class:`~pacs.derived.outcomes.TransientError` so the caller
retries; anything else is recorded on the row. A handler that cannot do its work *yet* raises
:class:`~pacs.derived.outcomes.Deferred`: the row goes back to ``pending`` without counting an attempt,
and the outbox relay's sweep publishes it again.

Handlers, by kind (:mod:`pacs.derived.kinds`): the instance's thumbnail and DICOM JSON fragment
(:mod:`pacs.derived.instance`); the series' metadata document, representative thumbnails and order link
(:mod:`pacs.derived.series`); the DICOM SR of a signed report version (:mod:`pacs.reports.publish`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from pacs.context import AppContext
from pacs.derived import lease
from pacs.derived.instance import build_thumbnail_and_fragment
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.derived.outcomes import Completed, Deferred, TransientError
from pacs.derived.series import build_series_metadata
from pacs.failpoints import failpoint
from pacs.imaging.render import RenderBusy
from pacs.jobs import JobState
from pacs.reports.lifecycle import REPORT_SR_KIND  # the SR of a signed report version
from storage import StorageUnavailable

log = logging.getLogger(__name__)


def _build_report_sr(ctx: AppContext, subject_uid: str, sha256: str) -> str | None:
    from pacs.reports.publish import build_report_sr_task

    return build_report_sr_task(ctx, subject_uid, sha256)


#: A handler takes the row's subject UID and version (sha256, or ""); it returns a note for the row, or
#: :class:`Completed` when it marked the row done itself.
Handler = Callable[[AppContext, str, str], "str | Completed | None"]
HANDLERS: dict[str, Handler] = {INSTANCE_DERIVED_KIND: build_thumbnail_and_fragment,
                                SERIES_METADATA_KIND: build_series_metadata,
                                REPORT_SR_KIND: _build_report_sr}


def run_derived_task(ctx: AppContext, task_id: int) -> str:
    """Run one outbox row's work; returns the row's final state (``busy``: a live process runs it;
    ``deferred``: back to pending).

    The row is claimed first (:func:`pacs.derived.lease.claim`): that counts the attempt before the work
    starts, so a task in flight when this process dies has used one, and a poison object ends ``failed``.
    """
    settings = ctx.settings
    try:
        lease.process_heartbeat(ctx, ctx.sessions, settings.task_lease_s)
        claimed = lease.claim(ctx.sessions, task_id, lease_s=settings.task_lease_s,
                              max_crashes=settings.task_max_crashes)
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    if claimed.state != JobState.RUNNING:
        return claimed.state
    kind, subject_uid, sha256 = claimed.kind, claimed.subject_uid, claimed.sha256
    handler = HANDLERS.get(kind)
    if handler is None:
        return _finish(ctx, task_id, JobState.FAILED, f"unknown task kind {kind!r}")
    try:
        error = handler(ctx, subject_uid, sha256)
    except Deferred as exc:
        return _defer(ctx, task_id, str(exc))
    except (StorageUnavailable, SQLAlchemyError, RenderBusy) as exc:
        attempts = _record_attempt(ctx, task_id, str(exc))
        if attempts >= settings.task_max_attempts:
            log.error("derived task %s (%s %s) failed after %d attempts: %s", task_id, kind, subject_uid,
                      attempts, exc)
            return _finish(ctx, task_id, JobState.FAILED, f"gave up after {attempts} attempts: {exc}")
        raise TransientError(str(exc), attempts) from exc
    except Exception as exc:  # a bug or an unexpected input: recorded for `pacs tasks failed`, not retried
        log.exception("derived task %s (%s %s) failed", task_id, kind, subject_uid)
        return _finish(ctx, task_id, JobState.FAILED, f"{type(exc).__name__}: {exc}"[:2000])
    if isinstance(error, Completed):
        lease.forget(task_id)  # the handler marked its row done itself
        return JobState.DONE
    failpoint("derived.before_done")
    return _finish(ctx, task_id, JobState.DONE, error or "")


def _finish(ctx: AppContext, task_id: int, state: JobState, error: str) -> str:
    """The row's final state, without owner (its claim counted the attempt)."""
    try:
        lease.finish(ctx.sessions, task_id, state, error)
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    return state


def _record_attempt(ctx: AppContext, task_id: int, error: str) -> int:
    """A transient failure: the row goes back to ``queued`` for the retry (the in-process pool's caller
    makes it ``pending``); returns the attempts so far (0 if the index is down too)."""
    try:
        return lease.finish(ctx.sessions, task_id, JobState.QUEUED, error)
    except SQLAlchemyError:
        log.warning("could not record attempt of derived task %s", task_id)
        return 0


def _defer(ctx: AppContext, task_id: int, reason: str) -> str:
    """Back to pending without counting an attempt; the relay's sweep publishes it again."""
    try:
        lease.finish(ctx.sessions, task_id, JobState.PENDING, f"deferred: {reason}", undo_attempt=True,
                     only_if_not_done=True)
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    return "deferred"

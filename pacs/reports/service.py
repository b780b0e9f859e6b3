"""The report operations as one process runs them: a transaction each, and the nudges after commit.

Routes (and tests driving the archive the way the API does) call these; the rules live in
:mod:`pacs.reports.lifecycle`. Signing enqueues the HL7 ORU^R01 for every configured EMR endpoint
inside the signing transaction, then wakes the outbox relay (the SR task) and the HL7 delivery loop.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.context import AppContext
from pacs.db.models import DerivedTask
from pacs.reports import lifecycle
from pacs.reports.document import ReportDocument
from pacs.reports.lifecycle import ReportView
from pacs.reports.publish import facility_names
from pacs.security.principal import Principal

log = logging.getLogger(__name__)


def create_draft(ctx: AppContext, principal: Principal, study_instance_uid: str, findings: str, impression: str,
                 language: str = "") -> ReportView:
    with ctx.sessions() as session, session.begin():
        return lifecycle.create_draft(session, principal, study_instance_uid, findings, impression, language)


def edit(ctx: AppContext, principal: Principal, report_id: int, findings: str, impression: str) -> ReportView:
    with ctx.sessions() as session, session.begin():
        return lifecycle.edit(session, principal, report_id, findings, impression)


def make_preliminary(ctx: AppContext, principal: Principal, report_id: int) -> ReportView:
    with ctx.sessions() as session, session.begin():
        return lifecycle.make_preliminary(session, principal, report_id)


def amend(ctx: AppContext, principal: Principal, report_id: int, reason: str, findings: str,
          impression: str) -> ReportView:
    with ctx.sessions() as session, session.begin():
        return lifecycle.amend(session, principal, report_id, reason, findings, impression)


def sign(ctx: AppContext, principal: Principal, report_id: int) -> ReportView:
    """Sign; the SR, the ORU messages and the FHIR resource follow (see lifecycle's order of writes)."""
    with ctx.sessions() as session, session.begin():
        view = lifecycle.sign(session, principal, report_id, on_signed=_enqueue_results(ctx),
                              facility_name=facility_names(ctx))
    _wake(ctx, lifecycle.version_subject(view.id, view.version))
    return view


def _enqueue_results(ctx: AppContext) -> lifecycle.SignedHook:
    def enqueue(session: Session, doc: ReportDocument) -> None:
        from pacs.hl7.outbound import destinations_from_settings, enqueue_oru

        routes = ctx.settings.hl7_destination_facilities  # a hospital's EMR gets its own hospital's reports
        destinations = {name: dest for name, dest in destinations_from_settings(ctx.settings).items()
                        if name not in routes or doc.facility in routes[name]}
        if destinations:
            enqueue_oru(session, doc, destinations)

    return enqueue


def _wake(ctx: AppContext, sr_subject: str) -> None:
    """Publish the SR task now and send the ORU now, instead of at the next poll (best effort: the rows
    are committed, so the relay's sweep and the delivery loop's poll find them anyway)."""
    try:
        relay = ctx.extras.get("outbox_relay")
        notify = getattr(relay, "notify", None)
        if callable(notify):
            with ctx.read_sessions() as session:
                task_id = session.scalar(select(DerivedTask.id).where(
                    DerivedTask.kind == lifecycle.REPORT_SR_KIND, DerivedTask.subject_uid == sr_subject))
            if task_id is not None:
                notify([task_id])
        delivery = ctx.extras.get("hl7_delivery")
        wake = getattr(delivery, "wake", None)
        if callable(wake):
            wake()
    except Exception as exc:
        log.warning("could not nudge the report's publication (the next poll will): %s", exc)

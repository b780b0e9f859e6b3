"""The administrator's operations pages: storage use and retention, forwarding rules and queues, failed derived
tasks, the audit trail.

Included by :mod:`viewer_api.ui.admin_pages` (same prefix, same rules): changes go through
:mod:`pacs.admin_actions` (audited with the signed-in administrator); the audit page reads the trail with the same
filters, visibility rule and ``audit.read`` row as ``GET /api/audit``, and its chain check is
``GET /api/audit/verify``'s (archive-wide administrators only, audited).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from pacs import admin_actions, admin_stats, audit
from pacs.audit import search as audit_search
from pacs.derived import admin as derived_admin
from pacs.errors import Conflict, InvalidInput, PacsError
from pacs.forwarding.delivery import queue_stats
from pacs.forwarding.rules import list_rules
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.security import audit_access, context
from viewer_api.ui.core import N_, PageForbidden, check_csrf, redirect, render, require_page

router = APIRouter(prefix="/ui/admin", include_in_schema=False)

Admin = Annotated[Principal, require_page(Capability.ADMIN)]
Auditor = Annotated[Principal, require_page(Capability.AUDIT_READ)]
Csrf = Depends(check_csrf)
_ = N_  # marks an English message id; the template translates it where it is shown

AUDIT_PAGE = 50
OUTCOMES = ("success", "warning", "partial", "failure")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# -- storage use and retention ---------------------------------------------------------------------------------

@router.get("/storage", response_class=HTMLResponse)
def storage_page(request: Request, principal: Admin) -> HTMLResponse:
    ctx = context(request)
    use = admin_stats.storage_use(ctx, principal.scope)
    rows = [(f.facility, f.studies, f.instances, human_bytes(f.bytes)) for f in use.facilities] if use else None
    return render(request, "ui/admin/storage.html", principal, use=use, rows=rows,
                  total=human_bytes(use.bytes if use else None),
                  prior=human_bytes(use.prior_version_bytes if use else None),
                  due=admin_stats.retention_due_count(ctx, principal.scope),
                  policy=sorted(ctx.settings.study_retention_years.items()))


@router.get("/retention", response_class=HTMLResponse)
def retention_page(request: Request, principal: Admin,
                   offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> HTMLResponse:
    """The studies due under the retention policy (audited by the core: it names patients); each links to the
    study's page, where it can be deleted."""
    from pacs.studies.retention import list_due

    page = list_due(context(request), principal, limit=50, offset=offset)
    return render(request, "ui/admin/retention.html", principal, page=page, offset=offset, limit=50)


# -- forwarding ---------------------------------------------------------------------------------------------------

def _forwarding_page(request: Request, principal: Principal, *, status: int = 200,
                     errors: dict[str, str] | None = None, form: dict[str, str] | None = None,
                     error: str = "") -> HTMLResponse:
    from pacs.aes import list_aes

    with context(request).read_sessions() as session:
        rules = list_rules(session)
        stats = queue_stats(session)
        destinations = [a.ae_title for a in list_aes(session) if a.host and 1 <= a.port <= 65535]
    defaults = {"name": "", "destination_ae": "", "source_ae": "", "modality": "", "body_part_examined": "",
                "sop_class_uid": ""}
    return render(request, "ui/admin/forwarding.html", principal, status=status, rules=rules, stats=stats,
                  destinations=destinations, errors=errors or {}, form={**defaults, **(form or {})}, error=error)


@router.get("/forwarding", response_class=HTMLResponse)
def forwarding_page(request: Request, principal: Admin) -> HTMLResponse:
    return _forwarding_page(request, principal)


@router.post("/forwarding/rules", response_class=HTMLResponse, dependencies=[Csrf])
def forwarding_add(request: Request, principal: Admin, name: Annotated[str, Form(max_length=128)] = "",
                   destination_ae: Annotated[str, Form(max_length=64)] = "",
                   source_ae: Annotated[str, Form(max_length=64)] = "",
                   modality: Annotated[str, Form(max_length=32)] = "",
                   body_part_examined: Annotated[str, Form(max_length=128)] = "",
                   sop_class_uid: Annotated[str, Form(max_length=128)] = "") -> Response:
    form = {"name": name, "destination_ae": destination_ae, "source_ae": source_ae, "modality": modality,
            "body_part_examined": body_part_examined, "sop_class_uid": sop_class_uid}
    errors: dict[str, str] = {}
    if not 1 <= len(name.strip()) <= 64 or not name.isprintable():
        errors["name"] = _("A rule name has 1 to 64 printable characters.")
    if not destination_ae.strip():
        errors["destination_ae"] = _("Choose the destination: a registered AE with a host and port.")
    if errors:
        return _forwarding_page(request, principal, status=400, errors=errors, form=form)
    try:
        admin_actions.add_forward_rule(context(request), principal, admin_actions.RuleForm(
            name.strip(), destination_ae.strip(), source_ae.strip(), modality, body_part_examined, sop_class_uid))
    except Forbidden as exc:
        raise PageForbidden(str(exc)) from None
    except Conflict:
        return _forwarding_page(request, principal, status=409, form=form,
                                errors={"name": _("A rule with this name already exists.")})
    except PacsError as exc:
        return _forwarding_page(request, principal, status=400, form=form, error=str(exc))
    return redirect("/ui/admin/forwarding", flash=_("Rule %(name)s added."), flash_values={"name": name.strip()})


@router.post("/forwarding/rules/remove", response_class=HTMLResponse, dependencies=[Csrf])
def forwarding_remove(request: Request, principal: Admin, name: Annotated[str, Form(max_length=64)] = "") -> Response:
    try:
        admin_actions.remove_forward_rule(context(request), principal, name)
    except Forbidden as exc:
        raise PageForbidden(str(exc)) from None
    except PacsError:
        return redirect("/ui/admin/forwarding", flash=_("No such rule."))
    return redirect("/ui/admin/forwarding", flash=_("Rule %(name)s removed; what it queued is still sent."),
                    flash_values={"name": name})


@router.post("/forwarding/retry", response_class=HTMLResponse, dependencies=[Csrf])
def forwarding_retry(request: Request, principal: Admin,
                     destination_ae: Annotated[str, Form(max_length=64)] = "") -> Response:
    try:
        n = admin_actions.retry_forwarding(context(request), principal, destination_ae.strip() or None)
    except Forbidden as exc:
        raise PageForbidden(str(exc)) from None
    return redirect("/ui/admin/forwarding", flash=_("%(count)s failed deliveries queued again."),
                    flash_values={"count": n})


# -- derived tasks ------------------------------------------------------------------------------------------------

@router.get("/tasks", response_class=HTMLResponse)
def tasks_page(request: Request, principal: Admin) -> HTMLResponse:
    with context(request).read_sessions() as session:
        counts = derived_admin.counts(session)
        failed = derived_admin.failed(session, limit=200, scope=principal.scope)
    states = ("pending", "queued", "running", "done", "failed")
    return render(request, "ui/admin/tasks.html", principal, counts=sorted(counts.items()), states=states,
                  failed=failed)


@router.post("/tasks/retry", response_class=HTMLResponse, dependencies=[Csrf])
def tasks_retry(request: Request, principal: Admin, task_id: Annotated[int | None, Form(ge=1)] = None) -> Response:
    try:
        n = admin_actions.retry_tasks(context(request), principal, [task_id] if task_id else None)
    except Forbidden as exc:
        raise PageForbidden(str(exc)) from None
    return redirect("/ui/admin/tasks", flash=_("%(count)s failed tasks queued again."), flash_values={"count": n})


# -- the audit trail ----------------------------------------------------------------------------------------------

FILTER_FIELDS = ("actor", "action", "outcome", "patient_id", "study", "since", "until")


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, principal: Auditor,
               actor: Annotated[str, Query(max_length=128)] = "", action: Annotated[str, Query(max_length=65)] = "",
               outcome: Annotated[str, Query(max_length=16)] = "",
               patient_id: Annotated[str, Query(max_length=64)] = "", study: Annotated[str, Query(max_length=64)] = "",
               since: Annotated[str, Query(max_length=40)] = "", until: Annotated[str, Query(max_length=40)] = "",
               offset: Annotated[int | None, Query(ge=0, le=100_000_000)] = None) -> HTMLResponse:
    values = {"actor": actor, "action": action, "outcome": outcome, "patient_id": patient_id, "study": study,
              "since": since, "until": until}
    return _audit_page(request, principal, values, offset, verify=None)


def _audit_page(request: Request, principal: Principal, values: dict[str, str], offset: int | None,
                verify: dict[str, Any] | None) -> HTMLResponse:
    """One page of the trail, oldest first; without an offset the last page (the newest events)."""
    ctx = context(request)
    try:
        flt = audit_search.make_filter(**{k: (v.strip() or None) for k, v in values.items()})
    except InvalidInput as exc:
        return render(request, "ui/admin/audit.html", principal, status=400, filters=values, rows=[], total=0,
                      offset=0, page=AUDIT_PAGE, error=str(exc), outcomes=OUTCOMES, verify=verify, prev_url="",
                      next_url="", archive_wide=principal.scope.unrestricted)
    flt = audit_search.visible_to(flt, principal.scope, principal.subject)
    with ctx.read_sessions() as session:
        total = audit_search.count(session, flt)
        if offset is None:
            offset = max(0, total - AUDIT_PAGE)
        rows = audit_search.search(session, flt, AUDIT_PAGE, offset)
    audit_access(request, principal, "audit.read", detail=f"page rows={len(rows)} total={total}")
    kept = {k: v for k, v in values.items() if v}

    def page_url(at: int) -> str:
        return "/ui/admin/audit?" + urlencode({**kept, "offset": at})

    return render(request, "ui/admin/audit.html", principal, filters=values, rows=rows, total=total, offset=offset,
                  page=AUDIT_PAGE, error="", outcomes=OUTCOMES, verify=verify,
                  prev_url=page_url(max(0, offset - AUDIT_PAGE)) if offset > 0 else "",
                  next_url=page_url(offset + AUDIT_PAGE) if offset + AUDIT_PAGE < total else "",
                  archive_wide=principal.scope.unrestricted)


@router.post("/audit/verify", response_class=HTMLResponse, dependencies=[Csrf])
def audit_verify(request: Request, principal: Auditor) -> HTMLResponse:
    """The chain check of ``GET /api/audit/verify``: archive-wide administrators only; audited either way."""
    if not principal.scope.unrestricted:  # the chain spans every facility's rows
        audit_access(request, principal, "audit.read", outcome="failure", detail="verify refused: facility admin")
        raise PageForbidden("the audit chain spans every facility: verifying it is for an archive-wide administrator")
    checked, problems, last = audit.verify(context(request).read_sessions)
    audit_access(request, principal, "audit.read", outcome="success",
                 detail=f"verify rows={checked} problems={len(problems)}")
    result = {"intact": not problems, "rows": checked, "last_hash": last,
              "problems": [(p.event_id, p.reason) for p in problems[:100]]}
    return _audit_page(request, principal, dict.fromkeys(FILTER_FIELDS, ""), None, verify=result)

"""The administrator's pages: overview and health, DICOM peers (AEs), users, API tokens, storage use.

Each page calls the same core the ``pacs`` commands call; changes go through :mod:`pacs.admin_actions`, which
audits them with the signed-in administrator as the actor (the command line audits ``os:<account>``) and lets
only an archive-wide administrator change the configuration. Forwarding, derived tasks and the audit trail are in
:mod:`viewer_api.ui.admin_ops_pages`.

Texts a page builds in Python are English message ids marked with :func:`_` and translated when shown (the
templates call ``_()`` on them); a form's errors are a ``{field: message id}`` map shown next to each field.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from pacs import admin_actions, admin_stats, health
from pacs.ae_access import normal_tls_subject
from pacs.ae_scope import needs_scope_flag
from pacs.aes import list_aes, lookup, validate_ae_title
from pacs.errors import Conflict, InvalidInput, NotFound, PacsError
from pacs.security import accounts
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability, Role
from viewer_api.security import context
from viewer_api.ui import admin_ops_pages  # forwarding, tasks, storage, audit: the same prefix
from viewer_api.ui.admin_ops_pages import human_bytes
from viewer_api.ui.core import N_, ROLE_LABELS, PageForbidden, check_csrf, redirect, render, require_page

pages = APIRouter(prefix="/ui/admin", include_in_schema=False)

Admin = Annotated[Principal, require_page(Capability.ADMIN)]
Csrf = Depends(check_csrf)
MIN_PASSWORD = 10


_ = N_  # marks an English message id for the catalogue; the template translates it where it is shown

CHECK_LABELS = {"index": _("Index database"), "storage": _("Object store"), "broker": _("Task broker")}
QUEUE_LABELS = {"derived": _("Derived work (thumbnails, metadata)"), "forward": _("Forwarding"),
                "commitment": _("Storage commitment reports"), "hl7": _("HL7 results")}


def _archive_wide_only(principal: Principal) -> None:
    """The account lists name every facility's users, patient accounts (a patient's name and ID) included: an
    administrator of one facility may not read them."""
    if not principal.scope.unrestricted:
        raise PageForbidden("the account lists are for an archive-wide administrator")


def denied(exc: Forbidden) -> PageForbidden:
    """A change refused by the core (already audited there, e.g. by an administrator of one facility): the 403
    page."""
    return PageForbidden(str(exc))


def _values(request: Request, ok: bool, checks: dict[str, str]) -> dict[str, Any]:
    return {"ready": ok, "checks": [(CHECK_LABELS.get(name, name), value == "ok", value)
                                    for name, value in checks.items()]}


def _queues(depths: dict[tuple[str, str], int] | None) -> list[tuple[str, dict[str, int]]] | None:
    if depths is None:
        return None
    by_queue: dict[str, dict[str, int]] = {}
    for (queue, state), n in depths.items():
        by_queue.setdefault(queue, {})[state] = n
    return [(QUEUE_LABELS.get(q, q), states) for q, states in by_queue.items()]


# -- overview and health ----------------------------------------------------------------------------------------

@pages.get("", response_class=HTMLResponse)
def overview(request: Request, principal: Admin) -> HTMLResponse:
    ctx = context(request)
    ok, checks = health.readiness(ctx)
    use = admin_stats.storage_use(ctx, principal.scope)
    depths = admin_stats.queue_depths(ctx)
    failed = None if depths is None else depths.get(("derived", "failed"), 0)
    forward_failed = None if depths is None else depths.get(("forward", "failed"), 0)
    return render(request, "ui/admin/overview.html", principal, use=use, size=human_bytes(use.bytes if use else None),
                  failed_tasks=failed, failed_forwards=forward_failed, queues=_queues(depths),
                  **_values(request, ok, checks))


@pages.get("/health", response_class=HTMLResponse)
def health_page(request: Request, principal: Admin) -> HTMLResponse:
    ctx = context(request)
    ok, checks = health.readiness(ctx)
    return render(request, "ui/admin/health.html", principal, queues=_queues(admin_stats.queue_depths(ctx)),
                  **_values(request, ok, checks))


# -- DICOM peers --------------------------------------------------------------------------------------------------

def _ae_page(request: Request, principal: Principal, *, status: int = 200, errors: dict[str, str] | None = None,
             form: dict[str, Any] | None = None, error: str = "") -> HTMLResponse:
    with context(request).read_sessions() as session:
        rows = list_aes(session)
    defaults = {"title": "", "host": "", "port": "104", "description": "", "facility": "", "tls_subject": "",
                "allow_store": True, "allow_query": True, "allow_retrieve": True, "check_host": True,
                "archive_wide": False}
    return render(request, "ui/admin/aes.html", principal, status=status, aes=rows, errors=errors or {},
                  form={**defaults, **(form or {})}, error=error)


@pages.get("/aes", response_class=HTMLResponse)
def aes_page(request: Request, principal: Admin) -> HTMLResponse:
    return _ae_page(request, principal)


def _ae_errors(title: str, host: str, port: str, facility: str, archive_wide: bool, allow_query: bool,
               allow_retrieve: bool, check_host: bool, tls_subject: str) -> dict[str, str]:
    """Per-field errors, checked with the core's own rules before the core is called."""
    errors: dict[str, str] = {}
    try:
        validate_ae_title(title)
    except InvalidInput:
        errors["title"] = _("An AE title has 1 to 16 printable ASCII characters and no backslash.")
    if not port.strip().isdigit() or not 1 <= int(port) <= 65535:
        errors["port"] = _("The port is a number from 1 to 65535.")
    if check_host and not host.strip():
        errors["host"] = _("Give the host to check, or untick “Check the calling host”.")
    if facility.strip() and archive_wide:
        errors["facility"] = _("An AE is either of one facility or archive-wide, not both.")
    elif needs_scope_flag(allow_query, allow_retrieve, facility, archive_wide):
        errors["facility"] = _("An AE that may query or retrieve needs a facility, or “archive-wide”.")
    if len(facility.strip()) > 64:
        errors["facility"] = _("A facility name has at most 64 characters.")
    if tls_subject.strip():
        try:
            normal_tls_subject(tls_subject)
        except ValueError:
            errors["tls_subject"] = _("Not a certificate identity: a CN or DNS name, or sha256: and the fingerprint.")
    return errors


@pages.post("/aes", response_class=HTMLResponse, dependencies=[Csrf])
def aes_add(request: Request, principal: Admin, title: Annotated[str, Form(max_length=64)] = "",
            host: Annotated[str, Form(max_length=255)] = "", port: Annotated[str, Form(max_length=10)] = "",
            description: Annotated[str, Form(max_length=256)] = "",
            facility: Annotated[str, Form(max_length=128)] = "",
            tls_subject: Annotated[str, Form(max_length=256)] = "",
            allow_store: Annotated[bool, Form()] = False, allow_query: Annotated[bool, Form()] = False,
            allow_retrieve: Annotated[bool, Form()] = False, check_host: Annotated[bool, Form()] = False,
            archive_wide: Annotated[bool, Form()] = False) -> Response:
    form = {"title": title, "host": host, "port": port, "description": description, "facility": facility,
            "tls_subject": tls_subject, "allow_store": allow_store, "allow_query": allow_query,
            "allow_retrieve": allow_retrieve, "check_host": check_host, "archive_wide": archive_wide}
    errors = _ae_errors(title, host, port, facility, archive_wide, allow_query, allow_retrieve, check_host,
                        tls_subject)
    if errors:
        return _ae_page(request, principal, status=400, errors=errors, form=form)
    try:
        rec = admin_actions.add_ae(context(request), principal, admin_actions.AEForm(
            title.strip(), host.strip(), int(port), description.strip(), allow_store, allow_query, allow_retrieve,
            check_host, facility.strip(), archive_wide, tls_subject.strip()))
    except Forbidden as exc:
        raise denied(exc) from None
    except Conflict:
        return _ae_page(request, principal, status=409, form=form,
                        errors={"title": _("This AE title is already registered.")})
    except PacsError as exc:
        return _ae_page(request, principal, status=400, form=form, error=str(exc))
    return redirect("/ui/admin/aes", flash=_("Registered %(title)s."), flash_values={"title": rec.ae_title})


def _one_ae(request: Request, title: str) -> Any:
    with context(request).read_sessions() as session:
        rec = lookup(session, title)
    if rec is None:
        raise NotFound(f"AE {title} is not registered")
    return rec


@pages.get("/aes/edit", response_class=HTMLResponse)
def ae_edit(request: Request, principal: Admin, title: Annotated[str, Query(max_length=64)] = "") -> Response:
    try:
        rec = _one_ae(request, title)
    except NotFound:
        return redirect("/ui/admin/aes", flash=_("That AE is not registered."))
    return render(request, "ui/admin/ae_edit.html", principal, ae=rec, errors={}, error="")


@pages.post("/aes/identity", response_class=HTMLResponse, dependencies=[Csrf])
def ae_identity(request: Request, principal: Admin, title: Annotated[str, Form(max_length=64)] = "",
                check_host: Annotated[bool, Form()] = False,
                tls_subject: Annotated[str, Form(max_length=256)] = "") -> Response:
    try:
        rec = admin_actions.set_ae_identity(context(request), principal, title, check_host=check_host,
                                            tls_subject=tls_subject.strip())
    except Forbidden as exc:
        raise denied(exc) from None
    except NotFound:
        return redirect("/ui/admin/aes", flash=_("That AE is not registered."))
    except InvalidInput as exc:
        field = "tls_subject" if tls_subject.strip() and "host" not in str(exc) else "check_host"
        message = (_("Not a certificate identity: a CN or DNS name, or sha256: and the fingerprint.")
                   if field == "tls_subject" else _("This AE has no host to check."))
        return render(request, "ui/admin/ae_edit.html", principal, status=400, ae=_one_ae(request, title),
                      errors={field: message}, error="")
    return redirect("/ui/admin/aes", flash=_("Identity check of %(title)s saved."),
                    flash_values={"title": rec.ae_title})


@pages.get("/aes/remove", response_class=HTMLResponse)
def ae_remove_confirm(request: Request, principal: Admin,
                      title: Annotated[str, Query(max_length=64)] = "") -> Response:
    try:
        rec = _one_ae(request, title)
    except NotFound:
        return redirect("/ui/admin/aes", flash=_("That AE is not registered."))
    return render(request, "ui/admin/ae_remove.html", principal, ae=rec)


@pages.post("/aes/remove", response_class=HTMLResponse, dependencies=[Csrf])
def ae_remove(request: Request, principal: Admin, title: Annotated[str, Form(max_length=64)] = "") -> Response:
    try:
        admin_actions.remove_ae(context(request), principal, title)
    except Forbidden as exc:
        raise denied(exc) from None
    except NotFound:
        return redirect("/ui/admin/aes", flash=_("That AE is not registered."))
    return redirect("/ui/admin/aes", flash=_("Removed %(title)s."), flash_values={"title": title})


# -- users ----------------------------------------------------------------------------------------------------------

def _roles() -> list[tuple[str, str]]:
    return [(role.value, ROLE_LABELS[role]) for role in Role]


def _users_page(request: Request, principal: Principal, *, status: int = 200, errors: dict[str, str] | None = None,
                form: dict[str, Any] | None = None, error: str = "", created: dict[str, str] | None = None,
                ) -> HTMLResponse:
    with context(request).read_sessions() as session:
        users = [{"username": u.username, "role": ROLE_LABELS.get(Role(u.role), u.role), "facility": u.facility,
                  "patient_id": u.patient_id, "full_name": u.full_name, "active": u.active}
                 for u in accounts.list_users(session)]
    defaults = {"username": "", "full_name": "", "role": Role.TECHNOLOGIST.value, "facility": "", "patient_id": "",
                "issuer": "", "generate": True}
    return render(request, "ui/admin/users.html", principal, status=status, users=users, roles=_roles(),
                  errors=errors or {}, form={**defaults, **(form or {})}, error=error, created=created,
                  min_password=MIN_PASSWORD)


@pages.get("/users", response_class=HTMLResponse)
def users_page(request: Request, principal: Admin) -> HTMLResponse:
    _archive_wide_only(principal)
    return _users_page(request, principal)


def _password_error(password: str, confirm: str) -> str:
    if len(password) < MIN_PASSWORD:
        return _("A password has at least 10 characters.")
    if password != confirm:
        return _("The two passwords differ.")
    return ""


def _generated_password() -> str:
    import secrets

    return secrets.token_urlsafe(12)


@pages.post("/users", response_class=HTMLResponse, dependencies=[Csrf])
def users_add(request: Request, principal: Admin, username: Annotated[str, Form(max_length=128)] = "",
              full_name: Annotated[str, Form(max_length=128)] = "", role: Annotated[str, Form(max_length=32)] = "",
              facility: Annotated[str, Form(max_length=128)] = "",
              patient_id: Annotated[str, Form(max_length=128)] = "", issuer: Annotated[str, Form(max_length=128)] = "",
              generate: Annotated[bool, Form()] = False, password: Annotated[str, Form(max_length=256)] = "",
              confirm: Annotated[str, Form(max_length=256)] = "") -> Response:
    form = {"username": username, "full_name": full_name, "role": role, "facility": facility,
            "patient_id": patient_id, "issuer": issuer, "generate": generate}
    errors: dict[str, str] = {}
    if not 1 <= len(username.strip()) <= 64 or not username.isprintable():
        errors["username"] = _("A user name has 1 to 64 printable characters.")
    if role not in {r.value for r in Role}:
        errors["role"] = _("Choose a role.")
    elif role == Role.PATIENT.value and not (patient_id.strip() and facility.strip()):
        errors["patient_id"] = _("A patient account needs the patient's ID and facility.")
    elif role != Role.PATIENT.value and (patient_id.strip() or issuer.strip()):
        errors["patient_id"] = _("A patient ID is only for a patient account.")
    if len(facility.strip()) > 64:
        errors["facility"] = _("A facility name has at most 64 characters.")
    secret = _generated_password() if generate else password
    if not generate and (why := _password_error(password, confirm)):
        errors["password"] = why
    if errors:
        return _users_page(request, principal, status=400, errors=errors, form=form)
    try:
        name = admin_actions.add_user(context(request), principal, admin_actions.UserForm(
            username.strip(), secret, role, facility.strip(), patient_id.strip(), issuer.strip(), full_name.strip()))
    except Forbidden as exc:
        raise denied(exc) from None
    except Conflict:
        return _users_page(request, principal, status=409, form=form,
                           errors={"username": _("A user with this name already exists.")})
    except PacsError as exc:
        return _users_page(request, principal, status=400, form=form, error=str(exc))
    # a generated password is shown on this answer only (never stored but as its hash, never redirected with)
    return _users_page(request, principal, created={"username": name, "password": secret if generate else ""})


@pages.post("/users/active", response_class=HTMLResponse, dependencies=[Csrf])
def users_active(request: Request, principal: Admin, username: Annotated[str, Form(max_length=64)] = "",
                 active: Annotated[bool, Form()] = False) -> Response:
    try:
        admin_actions.set_user_active(context(request), principal, username, active)
    except Forbidden as exc:
        raise denied(exc) from None
    except NotFound:
        return redirect("/ui/admin/users", flash=_("No such user."))
    except InvalidInput:
        return redirect("/ui/admin/users", flash=_("You cannot disable your own account."))
    message = _("User %(name)s enabled.") if active else _("User %(name)s disabled: their sessions end now.")
    return redirect("/ui/admin/users", flash=message, flash_values={"name": username})


@pages.get("/users/password", response_class=HTMLResponse)
def users_password_form(request: Request, principal: Admin,
                        username: Annotated[str, Query(max_length=64)] = "") -> HTMLResponse:
    return render(request, "ui/admin/password.html", principal, username=username, errors={}, generated="",
                  min_password=MIN_PASSWORD)


@pages.post("/users/password", response_class=HTMLResponse, dependencies=[Csrf])
def users_password(request: Request, principal: Admin, username: Annotated[str, Form(max_length=64)] = "",
                   generate: Annotated[bool, Form()] = False, password: Annotated[str, Form(max_length=256)] = "",
                   confirm: Annotated[str, Form(max_length=256)] = "") -> Response:
    if not generate and (why := _password_error(password, confirm)):
        return render(request, "ui/admin/password.html", principal, status=400, username=username,
                      errors={"password": why}, generated="", min_password=MIN_PASSWORD)
    secret = _generated_password() if generate else password
    try:
        admin_actions.set_user_password(context(request), principal, username, secret)
    except Forbidden as exc:
        raise denied(exc) from None
    except NotFound:
        return redirect("/ui/admin/users", flash=_("No such user."))
    if generate:
        return render(request, "ui/admin/password.html", principal, username=username, errors={}, generated=secret,
                      min_password=MIN_PASSWORD)
    return redirect("/ui/admin/users", flash=_("Password of %(name)s changed."), flash_values={"name": username})


# -- API tokens -----------------------------------------------------------------------------------------------------

def _tokens_page(request: Request, principal: Principal, *, status: int = 200, errors: dict[str, str] | None = None,
                 form: dict[str, Any] | None = None, error: str = "", created: Any = None) -> HTMLResponse:
    ctx = context(request)
    with ctx.read_sessions() as session:
        tokens = [{"id": t.id, "name": t.name, "role": ROLE_LABELS.get(Role(t.role), t.role), "facility": t.facility,
                   "patient_id": t.patient_id, "created_by": t.created_by,
                   "expires": f"{t.expires_at:%Y-%m-%d}", "revoked": t.revoked_at is not None,
                   "last_used": f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else ""}
                  for t in accounts.list_tokens(session)]
    defaults = {"name": "", "role": Role.EMR.value, "days": str(ctx.settings.api_token_default_days), "facility": "",
                "patient_id": "", "issuer": "", "images": False}
    return render(request, "ui/admin/tokens.html", principal, status=status, tokens=tokens, roles=_roles(),
                  errors=errors or {}, form={**defaults, **(form or {})}, error=error, created=created)


@pages.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, principal: Admin) -> HTMLResponse:
    _archive_wide_only(principal)
    return _tokens_page(request, principal)


@pages.post("/tokens", response_class=HTMLResponse, dependencies=[Csrf])
def tokens_create(request: Request, principal: Admin, name: Annotated[str, Form(max_length=128)] = "",
                  role: Annotated[str, Form(max_length=32)] = "", days: Annotated[str, Form(max_length=10)] = "",
                  facility: Annotated[str, Form(max_length=128)] = "",
                  patient_id: Annotated[str, Form(max_length=128)] = "",
                  issuer: Annotated[str, Form(max_length=128)] = "",
                  images: Annotated[bool, Form()] = False) -> Response:
    form = {"name": name, "role": role, "days": days, "facility": facility, "patient_id": patient_id,
            "issuer": issuer, "images": images}
    errors: dict[str, str] = {}
    if not 1 <= len(name.strip()) <= 64 or not name.isprintable():
        errors["name"] = _("A token name has 1 to 64 printable characters.")
    if role not in {r.value for r in Role}:
        errors["role"] = _("Choose a role.")
    elif role == Role.PATIENT.value and not (patient_id.strip() and facility.strip()):
        errors["patient_id"] = _("A patient token needs the patient's ID and facility.")
    elif role != Role.PATIENT.value and (patient_id.strip() or issuer.strip() or images):
        errors["patient_id"] = _("Patient ID and images are only for a patient token.")
    if not days.strip().isdigit() or not 1 <= int(days) <= 3650:
        errors["days"] = _("A token lives 1 to 3650 days.")
    if errors:
        return _tokens_page(request, principal, status=400, errors=errors, form=form)
    try:
        token = admin_actions.create_token(context(request), principal, admin_actions.TokenForm(
            name.strip(), role, int(days), facility.strip(), patient_id.strip(), issuer.strip(), images))
    except Forbidden as exc:
        raise denied(exc) from None
    except PacsError as exc:
        return _tokens_page(request, principal, status=400, form=form, error=str(exc))
    return _tokens_page(request, principal, created=token)


@pages.post("/tokens/revoke", response_class=HTMLResponse, dependencies=[Csrf])
def tokens_revoke(request: Request, principal: Admin, token_id: Annotated[int, Form(ge=1)]) -> Response:
    try:
        admin_actions.revoke_token(context(request), principal, token_id)
    except Forbidden as exc:
        raise denied(exc) from None
    except NotFound:
        return redirect("/ui/admin/tokens", flash=_("No such token."))
    return redirect("/ui/admin/tokens", flash=_("Token %(id)s revoked: it stops working now."),
                    flash_values={"id": token_id})


router = APIRouter(include_in_schema=False)  # what viewer_api.ui.router includes: both modules' pages
router.include_router(pages)
router.include_router(admin_ops_pages.router)

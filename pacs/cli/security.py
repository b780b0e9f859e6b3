"""`pacs user`, `pacs token`, `pacs share` and `pacs audit`: identities, sharing and the audit trail."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from pacs.cli.common import audit_config_change, console, load_settings, open_context, operator, out, transaction
from pacs.errors import PacsError

if TYPE_CHECKING:
    from pacs.audit.search import AuditFilter
    from pacs.context import AppContext

user_app = typer.Typer(help="Local user accounts (login to the web API).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens for service accounts (EMR, gateways) and patients.", no_args_is_help=True)
audit_app = typer.Typer(help="The append-only, hash-chained audit trail.", no_args_is_help=True)
share_app = typer.Typer(help="Share a study with another facility (teleconsultation).", no_args_is_help=True)

ROLE_HELP = "admin, radiologist, technologist, clinician, emr or patient"
FACILITY_HELP = ("Facility whose studies {who} sees (empty: all; an admin with a facility reads only that "
                 "facility's audit rows). Required for the patient role: a Patient ID names one facility's patient")
PATIENT_HELP = "For the patient role: the patient's ID (with --facility and --issuer: one patient record)"
ISSUER_HELP = ("For the patient role: the patient's Issuer of Patient ID; required when the facility records "
               "that ID with an issuer")


def register(app: typer.Typer) -> None:
    app.add_typer(user_app, name="user")
    app.add_typer(token_app, name="token")
    app.add_typer(audit_app, name="audit")
    app.add_typer(share_app, name="share")


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@user_app.command("add")
def user_add(
    username: str,
    role: Annotated[str, typer.Option(help=ROLE_HELP)],
    facility: Annotated[str, typer.Option(help=FACILITY_HELP.format(who="the user"))] = "",
    patient_id: Annotated[str, typer.Option(help=PATIENT_HELP)] = "",
    issuer: Annotated[str, typer.Option(help=ISSUER_HELP)] = "",
    full_name: Annotated[str, typer.Option(help="Display name")] = "",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin")] = False,
) -> None:
    """Create a user with a password (at least 10 characters; stored as an argon2 hash).

    A patient user is bound to one patient record: --patient-id, --facility and (when the facility records
    that ID with an issuer) --issuer."""
    from pacs.security.accounts import create_user

    password = _read_password(password_stdin)
    with transaction() as session:
        user = create_user(session, username, password, role, facility=facility, patient_id=patient_id,
                           issuer=issuer, full_name=full_name)
        audit_config_change(session, "config.user-add",
                            f"user={user.username} role={user.role} facility={user.facility}")
    out.print(f"user {username} created ({role})")


@user_app.command("list")
def user_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List users (never their passwords)."""
    from pacs.security.accounts import list_users

    ctx = open_context()
    with ctx.read_sessions() as session:
        rows: list[dict[str, Any]] = [
            {"username": u.username, "role": u.role, "facility": u.facility, "patient_id": u.patient_id,
             "patient_issuer": u.patient_issuer, "active": u.active, "full_name": u.full_name}
            for u in list_users(session)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("user", "role", "facility", "patient", "active", "name")
    for r in rows:
        table.add_row(r["username"], r["role"], r["facility"], r["patient_id"], "yes" if r["active"] else "no",
                      r["full_name"])
    out.print(table)


def _set_active(username: str, active: bool) -> None:
    from pacs.security.accounts import set_active

    with transaction() as session:
        set_active(session, username, active)
        audit_config_change(session, "config.user-enable" if active else "config.user-disable",
                            f"user={username}")
    out.print(f"user {username} {'enabled' if active else 'disabled'}")


@user_app.command("disable")
def user_disable(username: str) -> None:
    """Disable a user: their session tokens stop working at once."""
    _set_active(username, False)


@user_app.command("enable")
def user_enable(username: str) -> None:
    """Enable a disabled user again."""
    _set_active(username, True)


@user_app.command("passwd")
def user_passwd(
    username: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin")] = False,
) -> None:
    """Set a user's password."""
    from pacs.security.accounts import set_password

    password = _read_password(password_stdin)
    with transaction() as session:
        set_password(session, username, password)
        audit_config_change(session, "config.user-password", f"user={username}")
    out.print(f"password of {username} changed")


@token_app.command("create")
def token_create(
    name: str,
    role: Annotated[str, typer.Option(help=ROLE_HELP)],
    days: Annotated[int | None, typer.Option(help="Lifetime in days (default: PACS_API_TOKEN_DEFAULT_DAYS)")] = None,
    facility: Annotated[str, typer.Option(help=FACILITY_HELP.format(who="it"))] = "",
    patient_id: Annotated[str, typer.Option(help=PATIENT_HELP)] = "",
    issuer: Annotated[str, typer.Option(help=ISSUER_HELP)] = "",
    images: Annotated[bool, typer.Option(help="Patient tokens: may also see the images")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Create an API token; the secret is printed once and only its SHA-256 is stored.

    A patient token is bound to one patient record: --patient-id, --facility and (when the facility records
    that ID with an issuer) --issuer; without a facility it is refused (exit 1)."""
    from pacs.security.accounts import create_token

    default_days = load_settings().api_token_default_days
    with transaction() as session:
        token = create_token(session, name, role, days=days or default_days,
                             facility=facility, patient_id=patient_id, issuer=issuer, images=images,
                             created_by=operator())
        audit_config_change(session, "config.token-create",
                            f"token_id={token.id} name={name} role={role} facility={facility} "
                            f"patient={patient_id} issuer={issuer} images={images} "
                            f"expires={token.expires_at.isoformat()}")
    if as_json:
        out.print_json(json.dumps({"id": token.id, "name": token.name, "token": token.secret,
                                   "expires_at": token.expires_at.isoformat()}))
        return
    console.print(f"token {token.id} ({name}, {role}) expires {token.expires_at:%Y-%m-%d}; "
                  "keep the secret now, it is not shown again:")
    out.print(token.secret, soft_wrap=True)


@token_app.command("list")
def token_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List tokens (never their secrets)."""
    from pacs.security.accounts import list_tokens

    ctx = open_context()
    with ctx.read_sessions() as session:
        rows: list[dict[str, Any]] = [
            {"id": t.id, "name": t.name, "role": t.role, "facility": t.facility, "patient_id": t.patient_id,
             "patient_issuer": t.patient_issuer, "images": t.images_granted, "expires_at": t.expires_at.isoformat(),
             "revoked": t.revoked_at is not None} for t in list_tokens(session)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("id", "name", "role", "facility", "patient", "expires", "revoked")
    for r in rows:
        table.add_row(str(r["id"]), r["name"], r["role"], r["facility"], r["patient_id"], r["expires_at"][:10],
                      "yes" if r["revoked"] else "no")
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke a token: it stops working at once."""
    from pacs.security.accounts import revoke_token

    with transaction() as session:
        row = revoke_token(session, token_id)
        audit_config_change(session, "config.token-revoke", f"token_id={token_id} name={row.name}")
    out.print(f"token {token_id} revoked")


@share_app.command("add")
def share_add(study_instance_uid: str, facility: str) -> None:
    """Make a study visible to the users of another facility."""
    from pacs.security.access import share_study

    with transaction() as session:
        share_study(session, study_instance_uid, facility, operator())
        audit_config_change(session, "study.share", f"facility={facility} study={study_instance_uid}")
    out.print(f"study {study_instance_uid} shared with {facility}")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the hash chain of the whole audit trail; exit 1 and name the rows if it is broken."""
    from pacs import audit

    ctx = open_context()
    checked, problems, last = audit.verify(ctx.read_sessions)
    for p in problems:
        console.print(f"[red]audit row {p.event_id}: {p.reason}[/red]")
    if problems:
        console.print(f"[red]audit trail BROKEN: {len(problems)} problem(s) in {checked} rows[/red]")
        raise typer.Exit(1)
    out.print(f"audit trail intact: {checked} rows, last hash {last or '-'}")


def _audit_filter(actor: str | None, action: str | None, outcome: str | None, patient_id: str | None,
                  study: str | None, since: str | None, until: str | None) -> AuditFilter:
    from pacs.audit import search as audit_search

    try:
        return audit_search.make_filter(actor=actor, action=action, outcome=outcome, patient_id=patient_id,
                                        study=study, since=since, until=until)
    except PacsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


def _audit_read(ctx: AppContext, detail: str) -> None:
    """Reading the trail is itself audited (as the HTTP API does)."""
    from pacs import audit

    audit.record(ctx.sessions, action="audit.read", actor=f"os:{operator()}", role="operator",
                 source_address="cli", detail=detail)


ActorOpt = Annotated[str | None, typer.Option(help="Exact actor (user, token, AE title, os:USER)")]
ActionOpt = Annotated[str | None, typer.Option(help="Exact action, or a prefix ending in '.' or '*' (dimse.)")]
OutcomeOpt = Annotated[str | None, typer.Option(help="success, warning, partial or failure")]
PatientOpt = Annotated[str | None, typer.Option("--patient-id", help="Exact Patient ID")]
StudyOpt = Annotated[str | None, typer.Option(help="Study Instance UID")]
SinceOpt = Annotated[str | None, typer.Option(help="ISO 8601 date or date-time, inclusive (naive: UTC)")]
UntilOpt = Annotated[str | None, typer.Option(help="ISO 8601 date or date-time, inclusive (a date: the whole day)")]


@audit_app.command("list")
def audit_list(
    actor: ActorOpt = None, action: ActionOpt = None, outcome: OutcomeOpt = None, patient_id: PatientOpt = None,
    study: StudyOpt = None, since: SinceOpt = None, until: UntilOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Rows to show (at most 1000)")] = 100,
    offset: Annotated[int, typer.Option(min=0, help="Rows to skip")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List audit events, oldest first, with the filters of GET /api/audit."""
    from pacs.audit import search as audit_search

    flt = _audit_filter(actor, action, outcome, patient_id, study, since, until)
    ctx = open_context()
    with ctx.read_sessions() as session:
        total = audit_search.count(session, flt)
        rows = audit_search.search(session, flt, limit, offset)
    _audit_read(ctx, f"cli list rows={len(rows)} total={total} {flt.describe()}".strip())
    if as_json:
        out.print_json(json.dumps(rows, ensure_ascii=False))
        return
    table = Table("id", "at (UTC)", "actor", "role", "action", "outcome", "patient", "study", "detail")
    for r in rows:
        table.add_row(str(r["id"]), r["at"][:19].replace("T", " "), r["actor"], r["role"], r["action"],
                      r["outcome"], r["patient_id"], r["study_instance_uid"], r["detail"][:80])
    out.print(table)
    console.print(f"{len(rows)} of {total} event(s)")


@audit_app.command("export")
def audit_export(
    fhir: Annotated[str, typer.Option("--fhir", help="Write a FHIR R4 Bundle of AuditEvent resources to this "
                                      "file ('-': standard output)")],
    actor: ActorOpt = None, action: ActionOpt = None, outcome: OutcomeOpt = None, patient_id: PatientOpt = None,
    study: StudyOpt = None, since: SinceOpt = None, until: UntilOpt = None,
) -> None:
    """Export the matching audit events (all of them by default) as a FHIR searchset Bundle."""
    from pathlib import Path

    from pacs.audit import fhir_export as audit_fhir
    from pacs.audit import search as audit_search

    flt = _audit_filter(actor, action, outcome, patient_id, study, since, until)
    ctx = open_context()
    with ctx.read_sessions() as session:
        total = audit_search.count(session, flt)
    observer = audit_fhir.Observer(ctx.settings.ae_title)
    # The export stops at the rows that matched when it was counted, so total and entries agree.
    chunks = audit_fhir.iter_bundle_json(audit_search.iter_events(ctx.read_sessions, flt, limit=total), observer,
                                         total=total)
    if fhir == "-":
        for chunk in chunks:
            sys.stdout.write(chunk)
        sys.stdout.flush()
    else:
        path = Path(fhir)
        try:
            with path.open("w", encoding="utf-8") as fh:
                for chunk in chunks:
                    fh.write(chunk)
        except OSError as exc:
            console.print(f"[red]cannot write {path}: {exc.strerror or exc}[/red]")
            raise typer.Exit(1) from exc
    _audit_read(ctx, f"cli export fhir rows={total} {flt.describe()}".strip())
    console.print(f"{total} audit event(s) exported to {'standard output' if fhir == '-' else fhir}")

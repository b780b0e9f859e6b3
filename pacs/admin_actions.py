"""Configuration changes made by a signed-in administrator (the web pages under ``/ui/admin``).

Each function does what the matching ``pacs`` command does — the same core call (:mod:`pacs.aes`,
:mod:`pacs.security.accounts`, :mod:`pacs.forwarding`, :mod:`pacs.derived.admin`) in one transaction — and
audits it in that transaction with the same action and detail as the command, but with the administrator as
the actor (the command writes ``os:<account>``). A refusal (bad input, a conflict, not allowed) is audited
with outcome ``failure`` before it reaches the caller (:func:`pacs.studies.common.refusals_audited`).

Only an archive-wide administrator changes the configuration: an administrator of one facility
(``--facility``) could otherwise create an archive-wide account, and the trail shows them only their
facility's rows, not configuration changes (:mod:`pacs.audit.search`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session

from pacs import aes, audit
from pacs.ae_scope import needs_scope_flag
from pacs.context import AppContext
from pacs.errors import InvalidInput
from pacs.security import accounts, token_cache
from pacs.security.access import Forbidden, authorize
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies.common import refusals_audited


def require_archive_admin(principal: Principal) -> None:
    """Raise :class:`Forbidden` unless ``principal`` is an administrator of every facility."""
    authorize(principal, Capability.ADMIN)
    if not principal.scope.unrestricted:
        raise Forbidden("configuration changes are for an archive-wide administrator")


@contextmanager
def _change(ctx: AppContext, principal: Principal, action: str) -> Iterator[Session]:
    """One audited write transaction of ``action`` by an archive-wide admin; refusals audited as failures."""
    with refusals_audited(ctx, principal, action):
        require_archive_admin(principal)
        with ctx.sessions() as session, session.begin():
            yield session


def _audit(session: Session, principal: Principal, action: str, detail: str) -> None:
    audit.append(session, action=action, actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, detail=detail)


# -- DICOM peers (pacs ae add|identity|remove) ----------------------------------------------------------------

@dataclass(frozen=True)
class AEForm:
    title: str
    host: str
    port: int
    description: str = ""
    allow_store: bool = True
    allow_query: bool = True
    allow_retrieve: bool = True
    check_host: bool = True
    facility: str = ""
    archive_wide: bool = False
    tls_subject: str = ""


def add_ae(ctx: AppContext, principal: Principal, form: AEForm) -> aes.AERecord:
    with _change(ctx, principal, "config.ae-add") as session:
        if why := needs_scope_flag(form.allow_query, form.allow_retrieve, form.facility, form.archive_wide):
            raise InvalidInput(why)
        rec = aes.add_ae(session, form.title, form.host, form.port, form.description, form.allow_store,
                         form.allow_query, form.allow_retrieve, form.check_host, form.facility,
                         archive_wide=form.archive_wide, tls_subject=form.tls_subject)
        _audit(session, principal, "config.ae-add",
               f"ae={rec.ae_title} host={rec.host}:{rec.port} store={form.allow_store} query={form.allow_query} "
               f"retrieve={form.allow_retrieve} check_host={form.check_host} facility={form.facility} "
               f"archive_wide={form.archive_wide} tls_subject={rec.tls_subject}")
    return rec


def set_ae_identity(ctx: AppContext, principal: Principal, title: str, *, check_host: bool,
                    tls_subject: str) -> aes.AERecord:
    with _change(ctx, principal, "config.ae-identity") as session:
        rec = aes.set_identity(session, title, check_host=check_host, tls_subject=tls_subject)
        _audit(session, principal, "config.ae-identity",
               f"ae={rec.ae_title} check_host={rec.check_host} tls_subject={rec.tls_subject}")
    return rec


def remove_ae(ctx: AppContext, principal: Principal, title: str) -> None:
    with _change(ctx, principal, "config.ae-remove") as session:
        aes.remove_ae(session, title)
        _audit(session, principal, "config.ae-remove", f"ae={title}")


# -- users and API tokens (pacs user …, pacs token …) ---------------------------------------------------------

@dataclass(frozen=True)
class UserForm:
    username: str
    password: str
    role: str
    facility: str = ""
    patient_id: str = ""
    issuer: str = ""
    full_name: str = ""


def add_user(ctx: AppContext, principal: Principal, form: UserForm) -> str:
    """Create a user; returns the stored user name."""
    with _change(ctx, principal, "config.user-add") as session:
        user = accounts.create_user(session, form.username, form.password, form.role, facility=form.facility,
                                    patient_id=form.patient_id, issuer=form.issuer, full_name=form.full_name)
        _audit(session, principal, "config.user-add",
               f"user={user.username} role={user.role} facility={user.facility}")
        return user.username


def set_user_active(ctx: AppContext, principal: Principal, username: str, active: bool) -> None:
    action = "config.user-enable" if active else "config.user-disable"
    with _change(ctx, principal, action) as session:
        if not active and principal.kind in ("user", "session") and username == principal.subject:
            raise InvalidInput("you cannot disable your own account")
        accounts.set_active(session, username, active)
        _audit(session, principal, action, f"user={username}")


def set_user_password(ctx: AppContext, principal: Principal, username: str, password: str) -> None:
    with _change(ctx, principal, "config.user-password") as session:
        accounts.set_password(session, username, password)
        _audit(session, principal, "config.user-password", f"user={username}")


@dataclass(frozen=True)
class TokenForm:
    name: str
    role: str
    days: int
    facility: str = ""
    patient_id: str = ""
    issuer: str = ""
    images: bool = False


def create_token(ctx: AppContext, principal: Principal, form: TokenForm) -> accounts.NewToken:
    """Create an API token; its secret is in the result and nowhere else."""
    with _change(ctx, principal, "config.token-create") as session:
        token = accounts.create_token(session, form.name, form.role, days=form.days, facility=form.facility,
                                      patient_id=form.patient_id, issuer=form.issuer, images=form.images,
                                      created_by=principal.subject[:64])
        _audit(session, principal, "config.token-create",
               f"token_id={token.id} name={form.name} role={form.role} facility={form.facility} "
               f"patient={form.patient_id} issuer={form.issuer} images={form.images} "
               f"expires={token.expires_at.isoformat()}")
    return token


def revoke_token(ctx: AppContext, principal: Principal, token_id: int) -> None:
    with _change(ctx, principal, "config.token-revoke") as session:
        row = accounts.revoke_token(session, token_id)
        _audit(session, principal, "config.token-revoke", f"token_id={token_id} name={row.name}")
    token_cache.forget_all()  # this process's DICOMweb reads stop trusting it at once (others within 1 s)


# -- forwarding (pacs forward …) and derived tasks (pacs tasks retry) -------------------------------------------

@dataclass(frozen=True)
class RuleForm:
    name: str
    destination_ae: str
    source_ae: str = ""
    modality: str = ""
    body_part_examined: str = ""
    sop_class_uid: str = ""


def add_forward_rule(ctx: AppContext, principal: Principal, form: RuleForm) -> None:
    from pacs.forwarding.rules import add_rule

    with _change(ctx, principal, "config.forward-add") as session:
        rule = add_rule(session, form.name, form.destination_ae, source_ae=form.source_ae, modality=form.modality,
                        body_part_examined=form.body_part_examined, sop_class_uid=form.sop_class_uid)
        _audit(session, principal, "config.forward-add",
               f"rule={rule.name} to={rule.destination_ae} source_ae={rule.source_ae} modality={rule.modality} "
               f"body_part={rule.body_part_examined} sop_class={rule.sop_class_uid}")


def remove_forward_rule(ctx: AppContext, principal: Principal, name: str) -> None:
    from pacs.forwarding.rules import remove_rule

    with _change(ctx, principal, "config.forward-remove") as session:
        remove_rule(session, name)
        _audit(session, principal, "config.forward-remove", f"rule={name}")


def retry_forwarding(ctx: AppContext, principal: Principal, destination_ae: str | None) -> int:
    """Failed forward jobs (of one destination, or all) back to pending; how many."""
    from pacs.forwarding.delivery import retry_failed

    with _change(ctx, principal, "forward.retry") as session:
        n = retry_failed(session, destination_ae or None)
        _audit(session, principal, "forward.retry", f"destination={destination_ae or 'all'} queued={n}")
    return n


def retry_tasks(ctx: AppContext, principal: Principal, ids: list[int] | None) -> int:
    """Failed derived tasks (these, or all) back to pending; how many."""
    from pacs.derived.admin import retry

    with _change(ctx, principal, "tasks.retry") as session:
        n = retry(session, ids, principal.scope)
        _audit(session, principal, "tasks.retry", f"ids={ids or 'all failed'} queued={n}")
    return n

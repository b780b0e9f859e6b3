"""A test's world set up in the test process, through the core, as `pacs token create`, `pacs user add` and
`pacs ae add` do it (same core call, same audit row), without a `pacs` process each (~1.4 s of CPU each).

The command line itself is tested as a process in tests/test_cli.py (and where a test is about a command's
output); everywhere else a token or an AE is only the setting of the scene.
"""

from __future__ import annotations

from pacs.ae_scope import needs_scope_flag
from pacs.aes import add_ae
from pacs.cli.common import audit_config_change, operator
from pacs.context import AppContext
from pacs.errors import InvalidInput
from pacs.security.accounts import create_token, create_user


def new_token(ctx: AppContext, role: str, *, name: str | None = None, facility: str = "", patient_id: str = "",
              issuer: str = "", images: bool = False, days: int = 1) -> str:
    """A new API token for ``role`` (the secret), as `pacs token create NAME --role ROLE ...` makes it."""
    name = name or f"test-{role}"
    with ctx.sessions() as session, session.begin():
        token = create_token(session, name, role, days=days, facility=facility, patient_id=patient_id,
                             issuer=issuer, images=images, created_by=operator())
        audit_config_change(session, "config.token-create",
                            f"token_id={token.id} name={name} role={role} facility={facility} "
                            f"patient={patient_id} issuer={issuer} images={images} "
                            f"expires={token.expires_at.isoformat()}")
    return token.secret


def register_ae(ctx: AppContext, title: str, host: str, port: int, *, facility: str = "", archive_wide: bool = False,
                store: bool = True, query: bool = True, retrieve: bool = True, check_host: bool = True) -> None:
    """Register a DICOM peer as `pacs ae add TITLE HOST PORT [--facility F | --archive-wide] ...` does."""
    if why := needs_scope_flag(query, retrieve, facility, archive_wide):
        raise InvalidInput(why)
    with ctx.sessions() as session, session.begin():
        rec = add_ae(session, title, host, port, "", store, query, retrieve, check_host, facility,
                     archive_wide=archive_wide)
        audit_config_change(session, "config.ae-add",
                            f"ae={rec.ae_title} host={rec.host}:{rec.port} store={store} query={query} "
                            f"retrieve={retrieve} check_host={check_host} facility={facility} "
                            f"archive_wide={archive_wide} tls_subject={rec.tls_subject}")


def new_user(ctx: AppContext, username: str, password: str, role: str, *, facility: str = "") -> None:
    """A user with a password, as `pacs user add USERNAME --role ROLE [--facility F] --password-stdin` makes it."""
    with ctx.sessions() as session, session.begin():
        user = create_user(session, username, password, role, facility=facility)
        audit_config_change(session, "config.user-add",
                            f"user={user.username} role={user.role} facility={user.facility}")

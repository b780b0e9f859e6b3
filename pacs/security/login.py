"""Signing in with a user name and password: one path for ``POST /api/auth/login`` and the sign-in page.

The attempt goes through the :class:`~pacs.security.login_guard.LoginGuard` (failed-login limits reserved before
the password is hashed, a cap on concurrent verifications) and every outcome is audited as ``auth.login``
(a failure names the claimed user name, never a verified user).
"""

from __future__ import annotations

from collections.abc import Collection

from pacs import audit
from pacs.context import AppContext
from pacs.security.accounts import check_password
from pacs.security.authenticate import AuthenticationError
from pacs.security.login_guard import LoginGuard, LoginRefused, unverified_actor
from pacs.security.models import User

__all__ = ["LoginRefused", "RoleWithoutAccess", "WrongCredentials", "password_login"]


class WrongCredentials(AuthenticationError):
    """Wrong user name or password (or a disabled user): 401."""


class RoleWithoutAccess(AuthenticationError):
    """The password is right but this way in is not for the user's role (e.g. web pages for an EMR account)."""

    def __init__(self, role: str) -> None:
        super().__init__(f"role {role} cannot sign in here")
        self.role = role


def password_login(ctx: AppContext, guard: LoginGuard, username: str, password: str, *, host: str, address: str,
                   roles: Collection[str] | None = None, detail: str = "") -> User:
    """The user ``username`` when ``password`` is theirs (and their role is one of ``roles``, if given).

    Raises :class:`LoginRefused` (429/503: over the limits, not evaluated), :class:`WrongCredentials` or
    :class:`RoleWithoutAccess`; each outcome writes one ``auth.login`` audit row. ``host`` is the client's address
    without port (the guard's key), ``address`` what the audit row shows, ``detail`` says which way in was used.
    """
    claimed = unverified_actor(username)

    def verify() -> User | None:
        with ctx.read_sessions() as session:
            return check_password(session, username, password)

    try:
        user = guard.attempt(username, host, verify)
    except LoginRefused as exc:
        audit.record(ctx.sessions, action="auth.login", actor=claimed, outcome="failure", source_address=address,
                     detail=_join(exc.reason, detail))
        raise
    if user is None:
        audit.record(ctx.sessions, action="auth.login", actor=claimed, outcome="failure", source_address=address,
                     detail=_join("wrong user name or password", detail))
        raise WrongCredentials("wrong user name or password")
    if roles is not None and user.role not in roles:
        audit.record(ctx.sessions, action="auth.login", actor=user.username, role=user.role, outcome="failure",
                     source_address=address, detail=_join(f"role {user.role} cannot sign in here", detail))
        raise RoleWithoutAccess(user.role)
    audit.record(ctx.sessions, action="auth.login", actor=user.username, role=user.role, source_address=address,
                 detail=detail)
    return user


def _join(reason: str, detail: str) -> str:
    return f"{detail}: {reason}" if detail else reason

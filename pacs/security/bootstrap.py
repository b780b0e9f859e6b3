"""First start: create an admin credential and say where it is (SPEC §7)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from pacs import audit
from pacs.context import AppContext
from pacs.security.accounts import create_user, has_admin
from pacs.security.roles import Role

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

CREDENTIAL_FILE = "initial-admin-credential.txt"
ADMIN_USERNAME = "admin"


def ensure_initial_admin(ctx: AppContext) -> tuple[Path, str] | None:
    """Create user ``admin`` with a random password when no active admin exists.

    Returns (file, password) the first time (the caller prints them once), None afterwards.
    The file is created with mode 0600 and is not rewritten later: delete it once the password
    is kept somewhere safe, or change the password with ``pacs user passwd admin``.
    """
    with ctx.sessions() as session, session.begin():
        if has_admin(session):
            return None
        password = secrets.token_urlsafe(18)
        username = ADMIN_USERNAME
        if _user_exists(session, username):
            username = f"admin-{secrets.token_hex(3)}"
        create_user(session, username, password, Role.ADMIN, full_name="Initial administrator")
        audit.append(session, action="config.initial-admin", actor="system", role="system",
                     detail=f"user={username}")
    path = Path(ctx.settings.data_dir) / CREDENTIAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f"username: {username}\npassword: {password}\n")
    os.chmod(path, 0o600)
    return path, f"{username} / {password}"


def _user_exists(session: Session, username: str) -> bool:
    from sqlalchemy import select

    from pacs.security.models import User

    return session.scalar(select(User.id).where(User.username == username)) is not None

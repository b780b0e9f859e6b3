"""The web pages' hand-off to the OHIF viewer: which study a user may open there, where, and in which language.

A signed-in page user opens ``/ui/viewer/{study}``; the page's script gets the session's token from
``POST /ui/viewer-token`` and keeps it where OHIF's ``app-config.js`` reads it (sessionStorage,
:data:`pacs.viewer.TOKEN_STORAGE_KEY`), then opens :func:`study_url`. The study must be one the user sees as
images — :func:`pacs.security.access.study_condition` with ``hide_empty``, the rule of WADO-RS, which then
serves the viewer's requests — else the page is the same 404 as for an unknown study.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import jwt
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.db.models import Patient, Study
from pacs.errors import NotFound
from pacs.security.access import study_condition
from pacs.security.principal import Principal
from pacs.viewer import BASE_PATH

# Our page languages → OHIF's i18next language codes (OHIF 3.13 ships "vi" and "en-US").
OHIF_LANGUAGES = {"vi": "vi", "en": "en-US"}


def study_url(study_instance_uid: str) -> str:
    """The OHIF viewer page of one study (the stable viewer URL's path, same origin)."""
    return f"{BASE_PATH}viewer?StudyInstanceUIDs={quote(study_instance_uid, safe='.')}"


def viewer_path(target: str | None) -> str | None:
    """``target`` when it is a page of the viewer on this site (``/ohif/…``, no scheme, host or ``..``), else None:
    where the hand-off may send a user back to after a new sign-in."""
    if not target or len(target) > 2000 or not target.startswith(BASE_PATH):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or ".." in parts.path or any(ch in target for ch in "\\\r\n\t\x00"):
        return None
    if parts.path.rsplit("/", 1)[-1] in ("login.html", "app-config.js"):
        return None
    return target


def ohif_language(language: str) -> str:
    return OHIF_LANGUAGES.get(language, "en-US")


def viewable_study(session: Session, principal: Principal, study_instance_uid: str) -> str:
    """The Patient ID of a study ``principal`` may open in the viewer (for the audit row); NotFound otherwise —
    unknown, outside the principal's scope, or with no current image: the same answer."""
    row = session.execute(
        select(Patient.patient_id).select_from(Study).join(Patient, Patient.id == Study.patient_fk)
        .where(Study.study_instance_uid == study_instance_uid,
               study_condition(principal.scope, hide_empty=True)).limit(1)).first()
    if row is None:
        raise NotFound(f"no study {study_instance_uid}")
    return str(row.patient_id or "")


def token_expiry_ms(token: str) -> int:
    """When a session token ends (ms since the epoch; 0 when it carries no expiry). Read without checking the
    signature: the caller has just authenticated the token with :class:`pacs.security.authenticate.Authenticator`."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return 0
    expires = claims.get("exp")
    return int(expires) * 1000 if isinstance(expires, int | float) else 0

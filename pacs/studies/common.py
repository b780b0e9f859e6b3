"""What the study-management operations share: the reason every change must give, auditing refusals, batching
UID lists into bounded ``IN`` clauses."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from pacs import audit
from pacs.context import AppContext
from pacs.errors import InvalidInput, PacsError
from pacs.security.principal import Principal

log = logging.getLogger(__name__)

MAX_REASON = 1024
# UIDs per IN (...) clause: far below SQLite's and PostgreSQL's bound-parameter limits, whatever the study's size
IN_CHUNK = 500

T = TypeVar("T")


def check_reason(reason: str | None, what: str = "change") -> str:
    """The reason a change gives, trimmed: required (it is written to the audit trail) and bounded."""
    text = (reason or "").strip()
    if not text:
        raise InvalidInput(f"say why (reason): a {what} is written to the audit trail with its reason")
    if len(text) > MAX_REASON:
        raise InvalidInput(f"the reason is longer than {MAX_REASON} characters")
    return text


@contextmanager
def refusals_audited(ctx: AppContext, principal: Principal, action: str, study_uid: str = "",
                     what: str = "") -> Iterator[None]:
    """Audit a refusal (any :class:`PacsError`) of ``action`` with outcome failure, then let it propagate: every
    refusal of a study-management operation is in the audit trail, whichever transport asked (issue 15)."""
    try:
        yield
    except PacsError as exc:
        try:
            audit.record(ctx.sessions, action=action, outcome="failure", actor=principal.subject,
                         role=principal.role.value, source_address=principal.source_address,
                         study_instance_uid=study_uid[:64], detail=f"{what}{type(exc).__name__}: {str(exc)[:300]}")
        except SQLAlchemyError as audit_exc:  # the refusal itself still reaches the caller
            log.error("audit write failed: %s", audit_exc)
        raise


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> list[Sequence[T]]:
    """``items`` in slices of at most ``size`` (for ``IN`` clauses)."""
    return [items[i:i + size] for i in range(0, len(items), size)]

"""Run an UPDATE or DELETE through a Session and say how many rows it touched."""

from __future__ import annotations

from sqlalchemy import CursorResult, Delete, Update
from sqlalchemy.orm import Session


def affected_rows(session: Session, statement: Update | Delete) -> int:
    """``rowcount`` of ``statement``. ``Session.execute`` is typed to return a plain ``Result``; for DML
    without RETURNING it is a ``CursorResult``, which is what carries the count."""
    result = session.execute(statement)
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected a CursorResult for {type(statement).__name__}, got {type(result).__name__}")
    return result.rowcount

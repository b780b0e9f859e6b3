"""How the command line prints timestamps: in tables, and in ``--json`` output."""

from __future__ import annotations

from datetime import datetime


def json_default(value: object) -> str:
    """``json.dumps(..., default=json_default)``: datetimes as ISO 8601, anything else unserializable fails."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table_time(value: datetime | None) -> str:
    """A UTC timestamp in a table cell ("-" for none)."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"

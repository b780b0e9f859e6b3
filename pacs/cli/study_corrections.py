"""`pacs study` commands of one operation (see pacs.cli.studies)."""

from __future__ import annotations

from pacs.cli.studies import retention_app, study_app  # noqa: F401

"""Study management over HTTP (pacs.studies): thin routes, the logic is in pacs."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["study management"])

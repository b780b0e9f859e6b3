"""Report templates shipped with the archive (``templates.json``): per modality and procedure, in
Vietnamese and English. A radiologist starts a draft from one; the text is theirs to change."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from pacs.errors import InvalidInput, NotFound
from pacs.text import fold

LANGUAGES = ("vi", "en")


@dataclass(frozen=True)
class Template:
    id: str
    modalities: tuple[str, ...]
    keywords: tuple[str, ...]
    title: str
    findings: str
    impression: str
    language: str


@cache
def _raw() -> list[dict[str, Any]]:
    return json.loads(resources.files("pacs.reports").joinpath("templates.json").read_text(encoding="utf-8"))


def templates(language: str = "vi", modality: str = "", procedure: str = "") -> list[Template]:
    """Templates in ``language``; for a modality (and a procedure text), the matching ones first."""
    if language not in LANGUAGES:
        raise InvalidInput(f"language is one of {', '.join(LANGUAGES)}")
    out = [_template(raw, language) for raw in _raw()]
    if modality:
        out = [t for t in out if modality.strip().upper() in t.modalities]
    if procedure:
        words = fold(procedure).lower()
        out.sort(key=lambda t: not any(fold(k).lower() in words for k in t.keywords))
    return out


def template(template_id: str, language: str = "vi") -> Template:
    for t in templates(language):
        if t.id == template_id:
            return t
    raise NotFound(f"no report template {template_id!r}")


def _template(raw: dict[str, Any], language: str) -> Template:
    modalities = tuple(raw.get("modalities") or [raw["modality"]])
    return Template(raw["id"], modalities, tuple(raw.get("keywords", ())), raw["title"][language],
                    raw["findings"][language], raw["impression"][language], language)

"""Every text of the web pages is translated into Vietnamese and English (issue 16, must-show 2).

Babel's own extractors read the pages' templates (viewer_api/templates/ui/**, the Jinja2 ``_()`` calls and
``{% trans %}`` blocks, with the environment's whitespace rules) and their Python modules (viewer_api/ui/*.py:
``_()``, ``N_()``, ``gettext(language, …)`` and ``translate(request, …)``). Each message id must be defined, with a
non-empty, non-fuzzy translation, in the ``.po`` files of both languages; a message id is defined in one file only
(the catalogues of pacs/locale/{vi,en}/LC_MESSAGES/*.po are merged: pacs.i18n); and a translation has exactly the
``%(name)s`` placeholders of its message id. In-process, no server: a fraction of a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_file
from babel.messages.pofile import read_po

from pacs.i18n import LANGUAGES, LOCALE_DIR, catalogue_files, translations

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "viewer_api" / "templates" / "ui"
MODULES = ROOT / "viewer_api" / "ui"
# pacs.i18n.gettext and viewer_api.ui.core.translate take the message as their second argument
PYTHON_KEYWORDS: dict[str, tuple[int, ...] | None] = {"_": None, "N_": None, "gettext": (2,), "translate": (2,),
                                                       "ngettext": (1, 2)}
JINJA_OPTIONS = {"trim_blocks": "true", "lstrip_blocks": "true", "newstyle_gettext": "true"}
PLACEHOLDER = re.compile(r"%\((\w+)\)[sdif]")


def extracted() -> dict[str, list[str]]:
    """Every message id of the pages, with where it is used."""
    found: dict[str, list[str]] = {}

    def add(messages: object, where: Path) -> None:
        for lineno, message, _comments, _context in messages:  # type: ignore[attr-defined]
            ids = message if isinstance(message, tuple) else (message,)
            for msgid in ids:
                if msgid:
                    found.setdefault(msgid, []).append(f"{where.relative_to(ROOT)}:{lineno}")

    for path in sorted(TEMPLATES.rglob("*.html")):
        add(extract_from_file("jinja2.ext:babel_extract", str(path), options=JINJA_OPTIONS), path)
    for path in sorted(MODULES.glob("*.py")):
        add(extract_from_file("python", str(path), keywords=PYTHON_KEYWORDS), path)
    return found


def catalogue(language: str) -> dict[str, list[tuple[str, str, bool]]]:
    """msgid → [(file, msgstr, fuzzy)] over every .po file of ``language``."""
    entries: dict[str, list[tuple[str, str, bool]]] = {}
    for path in catalogue_files(language):
        with path.open("rb") as po:
            for message in read_po(po, locale=language):
                if not message.id:
                    continue
                msgid = message.id if isinstance(message.id, str) else message.id[0]
                text = message.string if isinstance(message.string, str) else " ".join(message.string)
                entries.setdefault(msgid, []).append((path.name, text, message.fuzzy))
    return entries


@pytest.fixture(scope="module")
def messages() -> dict[str, list[str]]:
    found = extracted()
    assert len(found) > 20, "the extractor found almost nothing: are the templates where this test looks?"
    return found


def test_extractor_sees_templates_and_modules(messages: dict[str, list[str]]) -> None:
    """A guard against a silently empty extraction: known texts of base.html, a {% trans %} block and core.py."""
    assert "Sign out" in messages
    assert "Welcome, %(name)s" in messages  # {% trans name=… %}Welcome, {{ name }}{% endtrans %}
    assert "Reading list" in messages  # N_() in viewer_api/ui/core.py


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_page_text_is_translated(language: str, messages: dict[str, list[str]]) -> None:
    entries = catalogue(language)
    missing = [f"{msgid!r} ({', '.join(where[:2])})" for msgid, where in sorted(messages.items())
               if msgid not in entries]
    untranslated = [f"{msgid!r} in {entries[msgid][0][0]}" for msgid in sorted(messages)
                    if msgid in entries and (not entries[msgid][0][1].strip() or entries[msgid][0][2])]
    assert not missing, f"{len(missing)} page texts missing from the {language} catalogues:\n" + "\n".join(missing)
    assert not untranslated, f"untranslated or fuzzy in {language}:\n" + "\n".join(untranslated)
    # and the merged run-time catalogue (pacs.i18n) gives those translations
    merged = translations(language)
    for msgid in messages:
        assert merged.gettext(msgid) == entries[msgid][0][1], msgid


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_message_defined_twice(language: str) -> None:
    twice = {msgid: [f for f, _t, _z in defs] for msgid, defs in catalogue(language).items() if len(defs) > 1}
    assert not twice, f"message ids defined in more than one {language} file (keep one): {twice}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_placeholders_match(language: str) -> None:
    wrong = []
    for msgid, defs in catalogue(language).items():
        for filename, text, _fuzzy in defs:
            if text and sorted(PLACEHOLDER.findall(msgid)) != sorted(PLACEHOLDER.findall(text)):
                wrong.append(f"{filename}: {msgid!r} → {text!r}")
    assert not wrong, "translations whose %(name)s placeholders differ from the message id:\n" + "\n".join(wrong)


def test_both_languages_define_the_same_ids() -> None:
    vi, en = catalogue("vi"), catalogue("en")
    assert sorted(set(vi) ^ set(en)) == [], "ids in one language's catalogues but not the other's"
    for language in LANGUAGES:
        for path in (LOCALE_DIR / language / "LC_MESSAGES").glob("*.po"):
            assert (LOCALE_DIR / ("en" if language == "vi" else "vi") / "LC_MESSAGES" / path.name).exists(), path


def test_extraction_finds_an_untranslated_text(tmp_path: Path) -> None:
    """The check can fail: a template with a new text yields an id no catalogue has."""
    page = tmp_path / "new.html"
    page.write_text('{% extends "ui/base.html" %}{% block content %}{{ _("A text nobody translated") }}'
                    '{% trans n=3 %}{{ n }} studies{% endtrans %}{% endblock %}', encoding="utf-8")
    ids = [m[1] for m in extract_from_file("jinja2.ext:babel_extract", str(page), options=JINJA_OPTIONS)]
    assert ids == ["A text nobody translated", "%(n)s studies"]
    assert "A text nobody translated" not in catalogue("vi")

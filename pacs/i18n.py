"""Vietnamese and English for the web pages: gettext catalogues (Babel) and Jinja2 templates.

The catalogues are the ``.po`` files under ``pacs/locale/{vi,en}/LC_MESSAGES/`` (message ids are the English
text): ``messages.po`` (the share and consult pages) and one ``ui_<area>.po`` per area of the web pages
(viewer_api.ui), merged into one catalogue per language (a message id is defined in one file only:
tests/test_ui_catalogues.py). They are read at run time with Babel (:func:`babel.messages.pofile.read_po`) and
turned into :class:`babel.support.Translations` in memory, once per process, so an installation needs no compile
step.
:func:`environment` gives a Jinja2 environment per template folder and language, autoescaping on, with the
``i18n`` extension installed (``{{ _("…") }}``, ``{% trans %}``); environments are cached and never changed
after they are built, so they are shared by threads.

:func:`choose_language`: ``?lang=vi|en`` first, then the browser's ``Accept-Language``, then Vietnamese.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations
from jinja2 import Environment, FileSystemLoader, select_autoescape

LANGUAGES = ("vi", "en")
DEFAULT_LANGUAGE = "vi"
LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "messages"


@lru_cache(maxsize=8)
def translations(language: str) -> Translations:
    """The catalogue of ``language`` (one of :data:`LANGUAGES`): its ``.po`` files merged (the first definition
    of a message id wins)."""
    if language not in LANGUAGES:
        raise ValueError(f"no catalogue for language {language!r} (have: {', '.join(LANGUAGES)})")
    catalog = read_po(io.BytesIO(b""), locale=language, domain=DOMAIN)
    for path in catalogue_files(language):
        with path.open("rb") as po:
            part = read_po(po, locale=language, domain=DOMAIN)
        for message in part:
            if message.id and message.id not in catalog:
                catalog[message.id] = message
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(fp=compiled, domain=DOMAIN)


def catalogue_files(language: str) -> list[Path]:
    """The ``.po`` files of ``language``: ``messages.po`` first, then the others by name."""
    folder = LOCALE_DIR / language / "LC_MESSAGES"
    return sorted(folder.glob("*.po"), key=lambda path: (path.stem != DOMAIN, path.name))


def gettext(language: str, message: str, **values: object) -> str:
    """``message`` in ``language``, with ``%(name)s`` placeholders filled from ``values``."""
    text = translations(language).gettext(message)
    return text % values if values else text


@lru_cache(maxsize=16)
def environment(template_dir: Path, language: str) -> Environment:
    """A Jinja2 environment for the templates in ``template_dir``, translating into ``language`` (shared: not to
    be changed by callers; :func:`new_environment` gives one to add globals to)."""
    return new_environment(template_dir, language)


def new_environment(template_dir: Path, language: str) -> Environment:
    """A new Jinja2 environment for the templates in ``template_dir``, translating into ``language``: autoescape
    on, the ``i18n`` extension (``{{ _("…") }}``, ``{% trans %}``), ``language`` as a global."""
    env = Environment(loader=FileSystemLoader(str(template_dir)), autoescape=select_autoescape(default=True),
                      extensions=["jinja2.ext.i18n"], trim_blocks=True, lstrip_blocks=True)
    env.install_gettext_translations(translations(language), newstyle=True)  # type: ignore[attr-defined]
    env.globals["language"] = language
    return env


def choose_language(query: str | None, accept_language: str | None) -> str:
    """``query`` (``?lang=``) when it names a language we have, else the first of ``Accept-Language`` (by
    q-value) we have, else :data:`DEFAULT_LANGUAGE`."""
    if query and query.strip().lower() in LANGUAGES:
        return query.strip().lower()
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate((accept_language or "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGUAGES and quality > 0:
            ranked.append((-quality, position, primary))
    return min(ranked)[2] if ranked else DEFAULT_LANGUAGE

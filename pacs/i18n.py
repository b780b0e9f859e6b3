"""Vietnamese and English for the web pages: gettext catalogues (Babel) and Jinja2 templates.

The catalogues are the ``.po`` files under ``pacs/locale/{vi,en}/LC_MESSAGES/messages.po`` (message ids are the
English text). They are read at run time with Babel (:func:`babel.messages.pofile.read_po`) and turned into
:class:`babel.support.Translations` in memory, once per process, so an installation needs no compile step.
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
    """The catalogue of ``language`` (one of :data:`LANGUAGES`), read from its ``.po`` file."""
    if language not in LANGUAGES:
        raise ValueError(f"no catalogue for language {language!r} (have: {', '.join(LANGUAGES)})")
    path = LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"
    with path.open("rb") as po:
        catalog = read_po(po, locale=language, domain=DOMAIN)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(fp=compiled, domain=DOMAIN)


def gettext(language: str, message: str, **values: object) -> str:
    """``message`` in ``language``, with ``%(name)s`` placeholders filled from ``values``."""
    text = translations(language).gettext(message)
    return text % values if values else text


@lru_cache(maxsize=16)
def environment(template_dir: Path, language: str) -> Environment:
    """A Jinja2 environment for the templates in ``template_dir``, translating into ``language``."""
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

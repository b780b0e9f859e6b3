"""Move a built OHIF app from the site root to a sub-path (``/ohif/``) without rebuilding it.

The npm package is built with ``PUBLIC_URL=/``: index.html, the CSS, the web manifest and the bundler's
runtime (``__webpack_require__.p``, which every lazily loaded chunk, worker and wasm file goes through) name
their files as ``/x``. OHIF reads ``window.PUBLIC_URL`` for its own URLs and ``routerBasename`` (app-config.js)
for its routes, so rewriting those absolute references is all a sub-path needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = frozenset({".html", ".js", ".mjs", ".css", ".json"})
WEBPACK_PUBLIC_PATH = '__webpack_require__.p = "/";'
PUBLIC_URL = 'window.PUBLIC_URL="/"'


@dataclass
class RebaseReport:
    files_changed: dict[str, int] = field(default_factory=dict)  # relative path -> references rewritten
    public_path_files: list[str] = field(default_factory=list)


def rebase(dist: Path, base: str) -> RebaseReport:
    """Rewrite root-absolute references to the files of ``dist`` so they point under ``base`` (``/ohif/``).

    Only a quote, backquote or ``url(`` followed by ``/<top-level entry of dist>`` is rewritten, so URLs of
    other things (``/dicom-web``, routes) are left alone. Raises ValueError when the bundle does not look like
    the one this code knows (nothing to rewrite where something must be).
    """
    if not (base.startswith("/") and base.endswith("/")) or base == "/":
        raise ValueError(f"base path must look like /name/: {base!r}")
    names = sorted((p.name for p in dist.iterdir()), key=len, reverse=True)
    if not names:
        raise ValueError(f"{dist} is empty")
    reference = re.compile(r"""(["'`(])/(""" + "|".join(map(re.escape, names)) + r""")(?=[/"'`)?#])""")
    prefix = base.rstrip("/")
    report = RebaseReport()
    for path in sorted(dist.rglob("*")):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new, count = reference.subn(lambda m: f"{m.group(1)}{prefix}/{m.group(2)}", text)
        if WEBPACK_PUBLIC_PATH in new:
            count += new.count(WEBPACK_PUBLIC_PATH)
            new = new.replace(WEBPACK_PUBLIC_PATH, f'__webpack_require__.p = "{base}";')
            report.public_path_files.append(path.relative_to(dist).as_posix())
        if PUBLIC_URL in new:
            count += new.count(PUBLIC_URL)
            new = new.replace(PUBLIC_URL, f'window.PUBLIC_URL="{base}"')
        if count:
            path.write_text(new, encoding="utf-8")
            report.files_changed[path.relative_to(dist).as_posix()] = count
    _check(dist, base, report)
    return report


def _check(dist: Path, base: str, report: RebaseReport) -> None:
    index = (dist / "index.html").read_text(encoding="utf-8")
    if f'window.PUBLIC_URL="{base}"' not in index:
        raise ValueError("index.html does not set window.PUBLIC_URL as expected: unknown OHIF build layout")
    inside = re.escape(base.lstrip("/"))
    stray = re.findall(r'(?:src|href|content)="(/(?!' + inside + r')[^"]*)"', index)
    if stray:
        raise ValueError(f"index.html still references the site root: {stray[:3]}")
    main_bundles = re.findall(r'src="' + re.escape(base) + r'(app\.bundle\.[^"]+\.js)"', index)
    if not main_bundles or main_bundles[0] not in report.public_path_files:
        raise ValueError("the main bundle's public path (__webpack_require__.p) was not found: unknown OHIF build "
                         "layout")

"""Transports do not reach past ``pacs/`` (issue: structure; STYLE.md "What this means in our layout").

The DIMSE SCP (``dicom_scp/``), the HTTP API (``viewer_api/``) and the Celery workers (``workers/``) adapt
requests onto ``pacs`` services; the index (``sqlalchemy``, ``pacs.db``) and the object store
(``storage``) are ``pacs``' business. Every ``.py`` file there is read with :mod:`ast` (nothing is
imported) and each import of those packages, at any depth in the module, must be listed in
:data:`ALLOWED` with its reason. The list only shrinks: a listed import that is gone fails too, so
whoever moves code into ``pacs/`` also strikes its line here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRANSPORTS = ("dicom_scp", "viewer_api", "workers")
FORBIDDEN = ("sqlalchemy", "pacs.db", "storage")

MOVE = "to move into pacs/ (issue: structure)"

# (module, imported module) -> why it is allowed, for now or for good.
ALLOWED: dict[tuple[str, str], str] = {
    # dicom_scp: the index errors these pacs services let through (their modules are owned elsewhere)
    ("dicom_scp.commitment_service", "sqlalchemy.exc"):
        f"catches SQLAlchemyError from pacs.commitment.service.record_request; {MOVE}: wrap it in IndexUnavailable",
    ("dicom_scp.mpps_service", "sqlalchemy.exc"):
        f"catches SQLAlchemyError from pacs.ris.mpps create_step/set_step; {MOVE}: wrap it in IndexUnavailable",
    ("dicom_scp.worklist_service", "sqlalchemy.exc"):
        f"catches SQLAlchemyError from pacs.ris.worklist.find; {MOVE}: wrap it in IndexUnavailable there",
    # viewer_api
    ("viewer_api.dicomweb.stow", "storage.keys"): f"is_valid_uid for request paths; {MOVE}",
    ("viewer_api.errors", "storage"): f"maps StorageError to HTTP 503; {MOVE}: one pacs error hierarchy (STYLE 8)",
    ("viewer_api.fhir", "storage"): f"catches StorageError; {MOVE}: one pacs error hierarchy (STYLE 8)",
    ("viewer_api.fhir", "storage.keys"): f"is_valid_uid for request parameters; {MOVE}",
}


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def forbidden_imports(tree: ast.AST, module: str) -> set[str]:
    """The forbidden modules ``tree`` imports, at any depth (in functions, under ``if TYPE_CHECKING``).

    Each statement counts once: ``from storage.keys import x`` as ``storage.keys``; ``from pacs import db``
    as ``pacs.db`` (the name may be a submodule); relative imports are resolved against ``module``.
    """
    found: set[str] = set()
    package = module.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if _forbidden(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            if _forbidden(base):
                found.add(base)
            else:
                found.update(f"{base}.{alias.name}" for alias in node.names
                             if _forbidden(f"{base}.{alias.name}".lstrip(".")))
    return found


def offending_imports(root: Path = ROOT) -> set[tuple[str, str]]:
    """``(module, imported module)`` for each import of a forbidden package in the transports under ``root``."""
    offenders: set[tuple[str, str]] = set()
    for folder in TRANSPORTS:
        for path in sorted((root / folder).rglob("*.py")):
            module = _module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            offenders.update((module, name) for name in forbidden_imports(tree, module))
    return offenders


def test_transports_import_neither_the_index_nor_the_store_except_as_listed() -> None:
    offenders = offending_imports()
    new = sorted(offenders - ALLOWED.keys())
    assert not new, ("imports of sqlalchemy / pacs.db / storage outside pacs/ (go through a pacs service, or "
                     f"list them in ALLOWED with a reason): {new}")


def test_listed_exceptions_still_exist() -> None:
    gone = sorted(ALLOWED.keys() - offending_imports())
    assert not gone, f"these imports are gone: strike them from ALLOWED so the list only shrinks: {gone}"


def test_every_exception_has_a_reason() -> None:
    assert all(reason.strip() for reason in ALLOWED.values())


def test_the_rule_catches_every_form_of_import(tmp_path: Path) -> None:
    """A new offending import fails the rule, however it is written (the detector checked on its own)."""
    (tmp_path / "dicom_scp").mkdir()
    (tmp_path / "dicom_scp" / "sub").mkdir()
    sources = {
        "dicom_scp/a.py": "import sqlalchemy\n",
        "dicom_scp/b.py": "from sqlalchemy.orm import Session\n",
        "dicom_scp/c.py": "from pacs import db\n",
        "dicom_scp/d.py": "from pacs.db.models import Study\n",
        "dicom_scp/e.py": "def f():\n    import storage.keys as keys\n    return keys\n",
        "dicom_scp/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from storage import ObjectStore\n",
        "dicom_scp/sub/__init__.py": "from storage import open_store\n",
        "dicom_scp/fine.py": ("from pacs.aes import AERegistry\nimport pacs.dbx\nfrom storagex import y\n"
                              "from . import a\n"),
    }
    for name, source in sources.items():
        (tmp_path / name).write_text(source)
    assert offending_imports(tmp_path) == {
        ("dicom_scp.a", "sqlalchemy"), ("dicom_scp.b", "sqlalchemy.orm"), ("dicom_scp.c", "pacs.db"),
        ("dicom_scp.d", "pacs.db.models"), ("dicom_scp.e", "storage.keys"), ("dicom_scp.f", "storage"),
        ("dicom_scp.sub", "storage"),
    }

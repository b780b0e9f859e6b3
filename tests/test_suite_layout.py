"""Rules of the test suite itself: shared helpers live in tests/support/, and the tiers hold (tests/support/tiers.py).

A test module that imports another test module (or conftest) runs that module's import-time code, ties the
two together and hides helpers where nobody looks for them; tests/support/ is the one place for them.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import tomllib
from pathlib import Path

import psycopg
import pytest

from tests.support.tiers import is_integration, starts_servers

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_test_module_imports_another_or_conftest() -> None:
    offenders = []
    for path in sorted([*TESTS.glob("*.py"), *(TESTS / "support").glob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for module in _imported_modules(path):
            if module.startswith("tests.test_") or module in ("tests.conftest", "conftest"):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == [], "move the shared code to tests/support/:\n" + "\n".join(offenders)


def test_the_integration_marker_is_declared_and_strict() -> None:
    """`-m "not integration"` (make test-fast) must not silently match nothing because of a typo."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("integration:") for m in options["markers"])
    assert "--strict-markers" in options["addopts"]


def test_an_unmarked_test_cannot_reach_a_server() -> None:
    """This test is in the fast tier: the guard refuses every door to a server, however the code catches errors."""
    with pytest.raises(pytest.fail.Exception, match="is not marked integration but connects to"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)  # it catches OSError, not the guard's failure
    with pytest.raises(pytest.fail.Exception, match="listens on a socket"), socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # a free port is fine; listening on it is a server
        listener.listen()
    with pytest.raises(pytest.fail.Exception, match="starts the program 'echoscu'"):
        subprocess.run(["/usr/bin/echoscu", "--version"], capture_output=True)
    with pytest.raises(pytest.fail.Exception, match="connects to PostgreSQL"):
        psycopg.connect("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=1)
    assert subprocess.run(["openssl", "version"], capture_output=True).returncode == 0  # a file tool is fine


@pytest.fixture()
@starts_servers
def _pretend_server() -> str:
    return "127.0.0.1:1"


def test_a_test_using_a_server_fixture_is_marked_integration(request: pytest.FixtureRequest,
                                                              _pretend_server: str) -> None:
    assert is_integration(request.node)

"""The two test tiers: the ``integration`` marker and the guard that keeps the fast tier honest.

A test is *integration* when it starts or talks to a server: a `pacs` process, an SCP (ours, DCMTK's or an
in-process pynetdicom one), the S3 server, PostgreSQL, Redis, RabbitMQ, a browser. ``make test-fast`` runs the
rest (``-m "not integration"``), so a server used by an unmarked test would slip into the fast tier and make it
slow or flaky. Two rules prevent that:

- a test that uses a fixture decorated with :func:`starts_servers` (directly or through other fixtures) is
  marked ``integration`` at collection; a module whose tests all need servers says so once with
  ``pytestmark = pytest.mark.integration``;
- while an unmarked test sets up and runs, opening a TCP connection or a listening socket, connecting to
  PostgreSQL or starting any program outside :data:`OFFLINE_TOOLS` fails it with a message naming what it did
  (``pytest.fail``: a ``BaseException``, so a ``wait_until`` or an ``except Exception`` cannot swallow it).

Teardown is not guarded: module-scoped servers are stopped during the teardown of the module's last test,
whatever its tier. The hooks are imported into ``tests/conftest.py``, which registers them.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

INTEGRATION = "integration"
F = TypeVar("F", bound=Callable[..., Any])

# Programs a unit test may run: file checkers and converters, no network peers.
# (systemd-analyze verify and haproxy -c only read unit and configuration files: tests/test_deploy.py)
OFFLINE_TOOLS = frozenset({"dciodvfy", "pdftotext", "pdfinfo", "openssl", "docker-compose", "docker", "git",
                           "dcmdump", "dcm2json", "dcm2xml", "pdftoppm", "zbarimg", "systemd-analyze", "haproxy"})

_INET = (socket.AF_INET, socket.AF_INET6)
_unit_test: pytest.Item | None = None  # the unmarked test now in setup or call; None: nothing is guarded
# Only the thread that runs the test is guarded: a background thread of an earlier integration test's
# module-scoped server (a delivery loop, a relay) may still connect while a unit test of that module runs.
_test_thread: int | None = None


def is_integration(item: pytest.Item) -> bool:
    return item.get_closest_marker(INTEGRATION) is not None


def starts_servers(fixture_function: F) -> F:
    """Put under ``@pytest.fixture``: every test using the fixture, even through other fixtures, is integration."""
    fixture_function.starts_servers = True  # type: ignore[attr-defined]
    return fixture_function


def _uses_servers(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(getattr(d.func, "starts_servers", False) for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not is_integration(item) and _uses_servers(item):
            item.add_marker(INTEGRATION)


def _refuse(what: str) -> None:
    item = _unit_test
    if item is not None and threading.get_ident() == _test_thread:
        pytest.fail(f"{item.nodeid} is not marked integration but {what}: mark it (`@pytest.mark.integration`, "
                    f"`pytestmark`, or `@starts_servers` on the fixture that starts the server) so `make test-fast` "
                    f"leaves it out", pytrace=False)


def _program(args: Any) -> str:
    first = args if isinstance(args, str | bytes | Path) else next(iter(args), "")
    text = str(first, "utf-8") if isinstance(first, bytes) else str(first)
    command = text.split()[0] if isinstance(first, str | bytes) and text.split() else text  # a shell=True line
    return Path(command).name if command else ""


def _guarded_socket(original: Callable[..., Any], verb: str) -> Callable[..., Any]:
    def guarded(self: socket.socket, *args: Any) -> Any:
        if _unit_test is not None and self.family in _INET:  # _refuse checks the thread
            target = f" {args[0]!r}" if args else ""
            _refuse(f"{verb}{target}")
        return original(self, *args)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    return guarded


def _install() -> None:
    """Wrap the few doors to a server once per process; they only check while ``_unit_test`` is set."""
    if getattr(socket.socket.connect, "__wrapped__", None) is not None:
        return
    socket.socket.connect = _guarded_socket(socket.socket.connect, "connects to")  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_socket(socket.socket.connect_ex, "connects to")  # type: ignore[method-assign]
    socket.socket.listen = _guarded_socket(socket.socket.listen, "listens on a socket")  # type: ignore[method-assign]

    popen_init = subprocess.Popen.__init__

    def guarded_popen(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if _unit_test is not None and _program(args) not in OFFLINE_TOOLS:
            _refuse(f"starts the program {_program(args)!r}")
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded_popen  # type: ignore[method-assign]

    pg_connect = psycopg.connect  # what SQLAlchemy's dialect and tests.support.postgres call

    def guarded_pg_connect(*args: Any, **kwargs: Any) -> Any:
        _refuse("connects to PostgreSQL")
        return pg_connect(*args, **kwargs)

    psycopg.connect = guarded_pg_connect  # type: ignore[assignment]


def pytest_configure(config: pytest.Config) -> None:
    _install()


def _guarding(item: pytest.Item) -> Generator[None, Any, Any]:
    global _unit_test, _test_thread
    _unit_test = None if is_integration(item) else item
    _test_thread = threading.get_ident()
    try:
        return (yield)
    finally:
        _unit_test = _test_thread = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarding(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarding(item))


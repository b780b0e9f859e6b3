"""pacs.db.sqlite_writers: an embedded index's write transactions of one process queue on a lock that is given back
however the transaction ends, and nothing about the transactions themselves changes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

import pacs.db.engine as db_engine
from pacs.db.engine import make_engine, make_read_session_factory


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    yield engine
    engine.dispose()


def _gate_free(engine: Engine) -> bool:
    """Another thread can begin a write transaction at once (the gate and SQLite's lock are free)."""
    began = threading.Event()

    def write() -> None:
        with engine.begin() as connection:
            connection.execute(text("SELECT 1"))
            began.set()

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(5)
    return began.is_set()


def _count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM t")).scalar_one())


def test_concurrent_writers_all_commit(engine: Engine) -> None:
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(50):
                with engine.begin() as connection:
                    connection.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"{n}-{i}"})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert _count(engine) == 300
    assert _gate_free(engine)


def test_the_gate_is_given_back_after_a_rollback_an_exception_and_a_connection_returned_mid_transaction(
        engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as connection:
        connection.execute(text("INSERT INTO t (v) VALUES ('rolled back')"))
        raise RuntimeError("the caller's error")
    assert _gate_free(engine)

    connection = engine.connect()
    transaction = connection.begin()
    connection.execute(text("INSERT INTO t (v) VALUES ('rolled back too')"))
    transaction.rollback()
    connection.close()
    assert _gate_free(engine)

    connection = engine.connect()
    connection.begin()
    connection.execute(text("INSERT INTO t (v) VALUES ('never committed')"))
    connection.close()  # returned to the pool inside its transaction: the pool rolls it back
    assert _gate_free(engine)

    connection = engine.connect()
    connection.begin()
    connection.execute(text("INSERT INTO t (v) VALUES ('invalidated')"))
    connection.invalidate()  # its driver connection closed: SQLite drops the transaction
    connection.close()
    assert _gate_free(engine)
    assert _count(engine) == 0


def test_readers_do_not_wait_for_a_writer(engine: Engine) -> None:
    with engine.begin() as writer:
        writer.execute(text("INSERT INTO t (v) VALUES ('uncommitted')"))
        read = make_read_session_factory(engine)
        with read() as session:  # a read transaction (plain BEGIN): neither the gate nor SQLite's write lock
            assert session.execute(text("SELECT count(*) FROM t")).scalar_one() == 0
    assert _count(engine) == 1


def test_a_write_nested_in_another_on_one_thread_fails_as_sqlite_would_not_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate is never a deadlock: past the busy timeout the inner writer goes on to SQLite, which refuses it."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT_S", 0.3)
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
        with engine.begin() as outer:
            outer.execute(text("INSERT INTO t (v) VALUES ('outer')"))
            with pytest.raises(OperationalError, match="locked"), engine.begin() as inner:
                inner.execute(text("INSERT INTO t (v) VALUES ('inner')"))
        assert _count(engine) == 1
        assert _gate_free(engine)
    finally:
        engine.dispose()

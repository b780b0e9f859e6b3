"""PS3.4 C.2.2.2 matching types, each checked against rows in a real (SQLite) table."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select

from pacs.query.matching import InvalidMatchValue, condition, multi_valued, person_name
from pacs.text import fold

meta = MetaData()
rows = Table("rows", meta, Column("id", Integer, primary_key=True), Column("uid", String), Column("date", String),
             Column("time", String), Column("text", String), Column("name", String), Column("mods", String))
DATA = [
    (1, "1.2.3", "20260101", "083000", "CHEST PA", "Nguyễn^Văn An", "CT"),
    (2, "1.2.4", "20260215", "101500.5", "CHEST_LAT", "NGUYEN^THI HA", "CT\\MR"),
    (3, "1.2.5", "20261128", "235959", "ABDOMEN 50%", "Trần^Bình", "US"),
]


@pytest.fixture(scope="module")
def conn():
    engine = create_engine("sqlite://")
    meta.create_all(engine)
    with engine.begin() as c:
        for r in DATA:
            c.execute(insert(rows).values(id=r[0], uid=r[1], date=r[2], time=r[3], text=r[4], name=fold(r[5]),
                                          mods=r[6]))
    with engine.connect() as c:
        yield c


def ids(conn, cond) -> list[int]:
    stmt = select(rows.c.id).order_by(rows.c.id)
    return list(conn.scalars(stmt if cond is None else stmt.where(cond)))


@pytest.mark.parametrize(("column", "value", "vr", "expected"), [
    ("uid", "1.2.4", "UI", [2]),
    ("uid", "1.2.3\\1.2.5", "UI", [1, 3]),
    ("uid", "", "UI", [1, 2, 3]),
    ("date", "20260101-20260301", "DA", [1, 2]),
    ("date", "20260201-", "DA", [2, 3]),
    ("date", "-20260101", "DA", [1]),
    ("date", "2026.02.15", "DA", [2]),
    ("time", "100000-101500", "TM", [2]),
    ("text", "CHEST*", "LO", [1, 2]),
    ("text", "CHEST?PA", "LO", [1]),
    ("text", "CHEST_LAT", "LO", [2]),  # '_' is a literal, not SQL's wildcard
    ("text", "*50%", "LO", [3]),  # '%' too
    ("text", "chest pa", "LO", []),  # single value matching is case-sensitive
    ("text", "*", "LO", [1, 2, 3]),
])
def test_matching_types(conn, column: str, value: str, vr: str, expected: list[int]) -> None:
    assert ids(conn, condition(rows.c[column], value, vr)) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("Nguyen", [1, 2]), ("nguyễn^văn an", [1]), ("NGUYEN^VAN AN", [1]), ("Tran^Binh", [3]), ("TRẦN", [3]),
    ("ngu*", [1, 2]), ("*HA", [2]), ("Nguyen^V?n*", [1]), ("", [1, 2, 3]), ("Smith", []),
])
def test_person_names_with_and_without_diacritics(conn, value: str, expected: list[int]) -> None:
    assert ids(conn, person_name(rows.c.name, value)) == expected


@pytest.mark.parametrize(("value", "expected"), [("CT", [1, 2]), ("MR", [2]), ("US\\MR", [2, 3]), ("C", [])])
def test_multi_valued_column(conn, value: str, expected: list[int]) -> None:
    assert ids(conn, multi_valued(rows.c.mods, value)) == expected


@pytest.mark.parametrize(("value", "vr"), [("2026-01-01-2027", "DA"), ("abc-def", "DA"), ("-", "DA")])
def test_malformed_ranges_are_refused(value: str, vr: str) -> None:
    with pytest.raises(InvalidMatchValue):
        condition(rows.c.date, value, vr)


def test_huge_uid_list_is_refused() -> None:
    with pytest.raises(InvalidMatchValue):
        condition(rows.c.uid, "\\".join(f"1.2.{i}" for i in range(5000)), "UI")


def test_sql_like_values_are_only_data(conn) -> None:
    assert ids(conn, condition(rows.c.text, "x' OR '1'='1", "LO")) == []
    assert ids(conn, condition(rows.c.text, "*' OR 1=1 --", "LO")) == []

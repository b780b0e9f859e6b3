"""The 10^7-instance benchmark's generator (bench/scale_data.py) makes rows that hold together.

``python -m bench.index_scale`` loads them with COPY after dropping the foreign keys and unique constraints, and
re-creates those afterwards: rows that do not hold together would fail there after many minutes. This checks
the same properties on 3,000 instances, in-process (no database).
"""

from __future__ import annotations

from collections import Counter

import pytest

from bench.scale_data import FACILITY_CODES, TABLES, Totals, generate
from pacs.text import fold


def _rows(instances: int, chunk_studies: int) -> tuple[dict[str, list[list[str]]], Totals]:
    totals = Totals()
    rows: dict[str, list[list[str]]] = {t: [] for t, _ in TABLES}
    for chunk in generate(instances, seed=3, chunk_studies=chunk_studies, totals=totals):
        for table, columns in TABLES:
            for line in chunk.buffers[table].getvalue().splitlines():
                fields = line.split("\t")
                assert len(fields) == len(columns), f"{table}: {line!r}"
                rows[table].append(fields)
    return rows, totals


def test_generated_archive_is_consistent() -> None:
    rows, totals = _rows(3000, chunk_studies=40)
    patients = {int(r[0]): r for r in rows["patient"]}
    studies = {int(r[0]): r for r in rows["study"]}
    series = {int(r[0]): r for r in rows["series"]}
    instances = rows["instance"]

    assert len(instances) == 3000 == totals.rows["instance"]  # exactly what was asked, the last study cut
    assert [int(r[0]) for r in instances] == list(range(1, 3001))
    for table in ("patient", "study", "series", "report"):
        assert totals.rows[table] == len(rows[table])

    # unique keys (the constraints the load re-creates)
    for table, col in (("study", 1), ("study", 5), ("series", 1), ("instance", 1)):
        values = [r[col] for r in rows[table]]
        assert len(values) == len(set(values)), f"duplicate {table} column {col}"
    identities = [(r[1], r[2], r[3]) for r in rows["patient"]]
    assert len(identities) == len(set(identities))
    assert len({r[0] for r in rows["imaging_order"]}) == len(rows["imaging_order"])

    # foreign keys and the counts the query engine returns
    per_series = Counter(int(r[2]) for r in instances)
    for sid, s in series.items():
        assert int(s[2]) in studies
        assert per_series[sid] == int(s[10]) > 0
    per_study_series = Counter(int(s[2]) for s in series.values())
    per_study_instances: Counter[int] = Counter()
    for s in series.values():
        per_study_instances[int(s[2])] += int(s[10])
    for st_id, st in studies.items():
        patient = patients[int(st[2])]
        assert st[11] == patient[3] and st[11] in FACILITY_CODES  # a study is of its patient's facility
        assert int(st[14]) == per_study_series[st_id] and int(st[15]) == per_study_instances[st_id]
        assert st[13] == series[min(k for k, s in series.items() if int(s[2]) == st_id)][3]
        assert len(st[5]) <= 16  # imaging_order.accession_number is String(16)
    for inst in instances:
        study_uid = studies[int(series[int(inst[2])][2])][1]
        assert inst[1].startswith(series[int(inst[2])][1] + ".") and inst[9].startswith(f"dicom/{study_uid}/")

    # names: both spellings, and the folded column is the project's fold()
    names = [p[4] for p in patients.values()]
    assert all(p[5] == fold(p[4]) for p in patients.values())
    assert any(n != fold(n) for n in names) and any(n == fold(n) for n in names)

    # reports: at most one per study, signed ones final; the waiting count is what has no final report
    reported = Counter(r[1] for r in rows["report"])
    assert max(reported.values()) == 1
    finals = {r[1] for r in rows["report"] if r[5] == "final"}
    assert totals.waiting == len(studies) - len(finals) > 0
    assert all(c[0] not in finals for c in rows["study_claim"])


def test_generator_is_deterministic_and_chunking_does_not_change_rows() -> None:
    a, _ = _rows(1200, chunk_studies=7)
    b, _ = _rows(1200, chunk_studies=5000)
    assert a == b


@pytest.mark.integration
def test_the_bench_loads_and_measures_a_small_archive(fresh_pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench.index_scale`` end to end on 2,000 instances: the schema after its load is the migrations' (the
    constraints and indexes it dropped are back), and every query kind finds what it must."""
    from bench.index_scale import main
    from pacs.db import migrate
    from pacs.db.engine import make_engine

    assert main(["--database-url", fresh_pg_url, "--load", "--instances", "2000", "--runs", "1",
                 "--no-explain"]) == 0
    out = capsys.readouterr().out
    assert "instance 2,000" in out and "FAILED" not in out
    for label in ("C-FIND PatientID", "QIDO first page, no filter", "reading list, first page",
                  "GET /studies?AccessionNumber="):
        assert out.count(label) == 2, label  # archive-wide and one facility's technologist
    engine = make_engine(fresh_pg_url)
    try:
        assert migrate.is_current(engine)
        with engine.connect() as conn:
            names = set(conn.exec_driver_sql(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'instance'::regclass "
                "UNION SELECT indexname FROM pg_indexes WHERE tablename = 'study'").scalars())
        assert {"instance_sop_instance_uid_key", "instance_series_fk_fkey", "ix_study_listed_date",
                "ix_study_study_date"} <= names, names
    finally:
        engine.dispose()

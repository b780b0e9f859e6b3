"""Fill an index database with synthetic patients/studies/series/instances, fast (PostgreSQL COPY).

    python -m bench.bulk_index DATABASE_URL [--studies 20000] [--series 5] [--instances 10]

The rows look like a province's archive (Vietnamese names with diacritics, dates over five
years, CT/MR/CR/US/DX modalities, accession numbers), so that the query benchmarks exercise
the same indexes real queries do. Objects are not written: C-FIND answers from the index alone.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from datetime import UTC, date, datetime, timedelta

import psycopg
from sqlalchemy.engine import make_url

from pacs.db import migrate
from pacs.db.engine import make_engine
from pacs.text import fold

FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ", "Hồ", "Ngô"]
MIDDLE = ["Văn", "Thị", "Hữu", "Đức", "Minh", "Thanh", "Ngọc", "Quốc"]
GIVEN = ["An", "Bình", "Châu", "Dũng", "Hà", "Hạnh", "Hùng", "Lan", "Long", "Mai", "Nam", "Phúc", "Tâm", "Tuấn"]
MODALITIES = ["CT", "MR", "CR", "US", "DX"]
ROOT = "1.2.826.0.1.3680043.10.543"  # synthetic UIDs under one root


def _copy(cur: psycopg.Cursor, table: str, columns: list[str], rows: io.StringIO) -> None:
    rows.seek(0)
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        while chunk := rows.read(1 << 20):
            copy.write(chunk)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", " ").replace("\n", " ")


def load(url: str, studies: int, series_per_study: int, instances_per_series: int, seed: int = 7) -> int:
    """Create the schema and COPY the synthetic rows in; returns the number of instances."""
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    rnd = random.Random(seed)
    now = datetime.now(UTC).isoformat()
    patients = max(studies // 2, 1)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        buf = io.StringIO()
        for p in range(1, patients + 1):
            name = f"{rnd.choice(FAMILY)}^{rnd.choice(MIDDLE)} {rnd.choice(GIVEN)}"
            born = date(1940, 1, 1) + timedelta(days=rnd.randrange(30000))
            buf.write(f"{p}\tPID{p:07d}\t\t{_esc(name)}\t{_esc(fold(name))}\t{born:%Y%m%d}\t{rnd.choice('MF')}\t{now}\n")
        _copy(cur, "patient", ["id", "patient_id", "issuer_of_patient_id", "patient_name", "patient_name_search",
                               "patient_birth_date", "patient_sex", "created_at"], buf)
        study_buf, series_buf, inst_buf = io.StringIO(), io.StringIO(), io.StringIO()
        series_id = inst_id = 0
        start = date(2021, 1, 1)
        for s in range(1, studies + 1):
            modality = rnd.choice(MODALITIES)
            when = start + timedelta(days=rnd.randrange(5 * 365))
            study_buf.write(
                f"{s}\t{ROOT}.1.{s}\t{rnd.randrange(1, patients + 1)}\t{when:%Y%m%d}\t{rnd.randrange(70000, 180000)}"
                f"\tACC{s:08d}\t{s}\t{modality} study\t{modality} STUDY\t\tBenh vien Tinh\t{modality}"
                f"\t{series_per_study}\t{series_per_study * instances_per_series}\tISO_IR 192\t\\N\t{now}\t{now}\n")
            for k in range(1, series_per_study + 1):
                series_id += 1
                series_buf.write(f"{series_id}\t{ROOT}.2.{s}.{k}\t{s}\t{modality}\t{k}\tseries {k}\t\t{when:%Y%m%d}"
                                 f"\t\t\t{instances_per_series}\t\\N\t\\N\t{now}\n")
                for i in range(1, instances_per_series + 1):
                    inst_id += 1
                    sop = f"{ROOT}.3.{s}.{k}.{i}"
                    inst_buf.write(f"{inst_id}\t{sop}\t{series_id}\t1.2.840.10008.5.1.4.1.1.2\t{i}"
                                   f"\t1.2.840.10008.1.2.1\t512\t512\t\\N\tdicom/{ROOT}.1.{s}/{ROOT}.2.{s}.{k}/{sop}/"
                                   f"{'0' * 64}.dcm\t525000\t{'0' * 64}\t{now}\tbench\t\t\t1\t\\N\n")
            if s % 2000 == 0 or s == studies:  # flush in chunks: memory stays small
                _copy(cur, "study", ["id", "study_instance_uid", "patient_fk", "study_date", "study_time",
                                     "accession_number", "study_id", "study_description", "study_description_search",
                                     "referring_physician_name", "institution_name", "modalities_in_study",
                                     "number_of_series", "number_of_instances", "specific_character_set",
                                     "thumbnail_key", "created_at", "updated_at"], study_buf)
                _copy(cur, "series", ["id", "series_instance_uid", "study_fk", "modality", "series_number",
                                      "series_description", "body_part_examined", "series_date", "series_time",
                                      "station_name", "number_of_instances", "thumbnail_key", "metadata_key",
                                      "created_at"], series_buf)
                _copy(cur, "instance", ["id", "sop_instance_uid", "series_fk", "sop_class_uid", "instance_number",
                                        "transfer_syntax_uid", "rows", "columns", "number_of_frames", "object_key",
                                        "size", "sha256", "received_at", "source", "source_ae", "source_address",
                                        "version", "thumbnail_key"], inst_buf)
                study_buf, series_buf, inst_buf = io.StringIO(), io.StringIO(), io.StringIO()
        for table in ("patient", "study", "series", "instance"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.commit()
        cur.execute("ANALYZE")
    return inst_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database_url")
    parser.add_argument("--studies", type=int, default=20_000)
    parser.add_argument("--series", type=int, default=5)
    parser.add_argument("--instances", type=int, default=10)
    args = parser.parse_args()
    t0 = time.monotonic()
    n = load(args.database_url, args.studies, args.series, args.instances)
    print(f"loaded {n} instances in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()

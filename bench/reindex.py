"""Reindex benchmark: rebuild the embedded index (SQLite + filesystem) of a CT study from its objects.

    python -m bench.reindex [--slices 500] [--size 512] [--repeats 3]

Imports the study once with `pacs import`, then, ``--repeats`` times, deletes the index, recreates the
schema and times :func:`pacs.maintenance.reindex.reindex` in this process. Prints the median instances/s
and MB/s (10^6 bytes of stored objects read per second), and the time `check` takes to verify the same
objects. Timings are reported, never judged: the exit status is 1 only when an object was not indexed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.ingest import study_files
from pacs.context import AppContext
from pacs.db import migrate
from pacs.maintenance.check import check
from pacs.maintenance.reindex import reindex
from pacs.settings import Settings
from tests.support.pacs_process import run_pacs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    files = study_files(args.slices, args.size)
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-reindex-"))
    data = work / "data"
    try:
        started = time.monotonic()
        result = run_pacs(["import", "--json", str(files[0].parent)], {"PACS_DATA_DIR": str(data)}, timeout=3600)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-2000:])
            return 1
        # (the folder's .complete marker is refused as not DICOM)
        print(f"imported {json.loads(result.stdout)['counts']} in {time.monotonic() - started:.1f} s")

        rates, mb_rates, ok = [], [], True
        for repeat in range(1, args.repeats + 1):
            for path in data.glob("index.sqlite3*"):
                path.unlink()
            ctx = AppContext.create(Settings(data_dir=data))
            try:
                migrate.upgrade(ctx.engine)
                summary = reindex(ctx.sessions, ctx.store)
            finally:
                ctx.close()
            ok = ok and summary.complete and summary.instances == args.slices
            rates.append(summary.instances / summary.seconds)
            mb_rates.append(summary.bytes_read / 1e6 / summary.seconds)
            print(f"[{repeat}/{args.repeats}] reindex {summary.instances} instances in {summary.seconds:.2f} s: "
                  f"{rates[-1]:.0f} instances/s, {mb_rates[-1]:.0f} MB/s")

        ctx = AppContext.create(Settings(data_dir=data))
        try:
            verified = check(ctx.sessions, ctx.store)
        finally:
            ctx.close()
        print(f"reindex, median of {args.repeats}: {statistics.median(rates):.0f} instances/s, "
              f"{statistics.median(mb_rates):.0f} MB/s ({args.slices} slices of {args.size}x{args.size}, "
              f"SQLite + filesystem)")
        check_mb_s = verified.bytes_read / 1e6 / max(verified.seconds, 1e-9)
        print(f"check: {verified.checked} objects in {verified.seconds:.2f} s ({check_mb_s:.0f} MB/s), "
              f"problems: {len(verified.problems)}")
        return 0 if ok and verified.ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

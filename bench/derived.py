"""Derived-work benchmark: time from C-STORE response to thumbnail available while a study streams in.

    python -m bench.derived [--slices 500] [--size 512] [--workers 1 2] [--repeats 2]

Scaled configuration (PostgreSQL, the S3 server, Redis, `pacs scp` + N `pacs worker` processes of
concurrency 1). The latency of an instance is measured from its index commit time (``received_at``,
set just before the C-STORE response is sent) to the first time a 50 ms poller sees its thumbnail
recorded in the index. Prints p50/p95 latency and thumbnails per second per worker process (while the
workers keep up with ingest this is bounded by the arrival rate, not by the workers), medians
over the repeats. Never fails on time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db.models import Instance
from pacs.settings import Settings
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.postgres import create_database, drop_database
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedS3

OUT = Path(__file__).resolve().parent / "out"
console = Console(width=140)


class ThumbnailWatcher(threading.Thread):
    """Records when each instance's thumbnail first shows up in the index."""

    def __init__(self, ctx: AppContext, expected: int) -> None:
        super().__init__(daemon=True)
        self.ctx, self.expected = ctx, expected
        self.seen: dict[str, tuple[datetime, datetime]] = {}  # sop -> (received_at, seen_at)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and len(self.seen) < self.expected:
            with self.ctx.sessions() as s:
                rows = s.execute(select(Instance.sop_instance_uid, Instance.received_at)
                                 .where(Instance.thumbnail_key.is_not(None))).all()
            now = datetime.now(UTC)
            for sop, received in rows:
                if sop not in self.seen:
                    received = received if received.tzinfo else received.replace(tzinfo=UTC)
                    self.seen[sop] = (received, now)
            time.sleep(0.05)


def one_run(root: Path, files: list[Path], s3: SeaweedS3, redis: RedisServer, workers: int) -> dict[str, float]:
    db_name, db_url = create_database()
    env = {
        "PACS_DATA_DIR": str(root / "data"),
        "PACS_DATABASE_URL": db_url,
        "PACS_STORAGE_URL": s3.url_for(f"bench-{uuid.uuid4().hex[:10]}"),
        "PACS_BROKER_URL": redis.url,
        "PACS_TASK_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "PACS_DICOM_PORT": str(free_port()),
        "PACS_OUTBOX_POLL_S": "1",
        "PACS_LOG_LEVEL": "WARNING",
    }
    procs: list[PacsProcess] = []
    ctx = AppContext.create(Settings(database_url=db_url, storage_url=env["PACS_STORAGE_URL"]))
    try:
        assert run_pacs(["db", "upgrade"], env).returncode == 0
        procs = [PacsProcess(["worker", "--concurrency", "1"], env, root / f"worker{i}.log").start()
                 for i in range(workers)]
        scp = PacsProcess(["scp"], env, root / "scp.log").start()
        procs.append(scp)
        scp.wait_dicom(int(env["PACS_DICOM_PORT"]))
        time.sleep(3)  # let the Celery workers connect before the study starts streaming
        watcher = ThumbnailWatcher(ctx, len(files))
        watcher.start()
        sent = subprocess.run([dcmtk("storescu"), "-aec", "PACS", "-xe", "127.0.0.1", env["PACS_DICOM_PORT"],
                               *map(str, files)], env=dcmtk_env(), capture_output=True, text=True)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-1000:]}")
        wait_until(lambda: len(watcher.seen) >= len(files), timeout=1800, interval=0.5, what="all thumbnails")
        watcher.stop.set()
        latencies = sorted((seen - received).total_seconds() for received, seen in watcher.seen.values())
        first = min(seen for _, seen in watcher.seen.values())
        last = max(seen for _, seen in watcher.seen.values())
        span = max((last - first).total_seconds(), 1e-3)
        return {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
                "per_worker": len(files) / span / workers}
    finally:
        for p in procs:
            p.stop()
        ctx.close()
        drop_database(db_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    study = OUT / f"ct-{args.slices}-{args.size}"
    files = sorted(study.glob("*.dcm"))
    if len(files) != args.slices:
        files = write_ct_series(study, slices=args.slices, size=args.size)
    work = OUT / f"derived-{uuid.uuid4().hex[:6]}"
    s3 = SeaweedS3(work / "s3")
    s3.start()
    redis = RedisServer(work / "redis").start()
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
    try:
        for r in range(args.repeats):
            for n in args.workers:  # alternate configurations within each repeat
                res = one_run(work / f"run{r}-{n}", files, s3, redis, n)
                console.print(f"repeat {r + 1}, {n} worker(s): {res}")
                results[n].append(res)
    finally:
        redis.stop()
        s3.stop()
    table = Table(title=f"C-STORE → thumbnail, {args.slices} slices {args.size}×{args.size}, scaled config")
    for col in ("worker processes", "p50 latency s", "p95 latency s", "thumbnails/s per worker", "runs"):
        table.add_column(col)
    for n, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in ("p50", "p95", "per_worker")}
        table.add_row(str(n), f"{med['p50']:.2f}", f"{med['p95']:.2f}", f"{med['per_worker']:.1f}", str(len(runs)))
    console.print(table)


if __name__ == "__main__":
    main()

"""Crash drill, long form: kill `pacs serve`, `pacs scp` and `pacs worker` at every failpoint, and take
the S3 server, PostgreSQL and Redis away, round after round; nothing acknowledged may be lost.

    python -m bench.crash_drill --rounds 200
    python -m bench.crash_drill --rounds 40 --modes embedded --slices 6

The machinery (and what a round is) is tests/support/drill.py, shared with the short form in CI
(tests/test_crash_drills.py). Rounds alternate between the modes; within a mode they walk through every
failpoint in turn, the armed hit count cycling 1..3; every ``--outage-every``-th scaled round is an
outage round instead (S3 down, database down, broker down in turn). At the end of each mode every
process is restarted without failpoints, everything acknowledged is retrieved again by C-GET, derived
work must complete, and ``pacs check --repair --grace-minutes 1`` runs (when the build has it).

Prints one line per round and then, per mode and round kind: rounds, kills at the failpoint,
instances acknowledged, missing, different; and per mode: index rows without their object, orphans,
temporary files, derived work not done or failed, what the repair removed and kept.

Correctness, never time, decides the exit status: 1 when an acknowledged instance is missing or
different, an index row has no object, derived work did not complete or failed, an armed failpoint was
never reached, or a server went down during an outage round with a Success for an instance it then lost;
0 otherwise. Needs PostgreSQL on 127.0.0.1:5432 (trust) and Redis on 127.0.0.1:6379 (db 13, through a
fault proxy; only this drill's own queue is used) for the scaled mode; SeaweedFS is started here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pacs.failpoints import FAILPOINTS
from tests.support.drill import OUTAGES, Drill, EmbeddedStack, Finish, Round, ScaledStack, Stack, report
from tests.support.seaweed import SeaweedS3


def _plan(rounds: int, modes: list[str], outage_every: int) -> list[tuple[str, str, int]]:
    """(mode, kind, nth) for each round: modes alternate; failpoints in turn; hit counts cycle 1..3."""
    out: list[tuple[str, str, int]] = []
    seen = dict.fromkeys(modes, 0)
    outages = 0
    for i in range(rounds):
        mode = modes[i % len(modes)]
        k = seen[mode]
        seen[mode] += 1
        if mode == "scaled" and outage_every and k % outage_every == outage_every - 1:
            out.append((mode, OUTAGES[outages % len(OUTAGES)], 0))
            outages += 1
            continue
        out.append((mode, FAILPOINTS[k % len(FAILPOINTS)], 1 + k % 3))  # 7 and 3: every pairing in 21
    return out


def _line(n: int, total: int, rnd: Round) -> str:
    what = f"{rnd.kind}={rnd.nth}" if rnd.nth else rnd.kind
    verdict = "killed" if rnd.killed else ("outage" if rnd.kind in OUTAGES else "NOT KILLED")
    return (f"[{n:>4}/{total}] {rnd.mode:8} {what:30} {verdict:10} acked {len(rnd.acknowledged):>3} "
            f"{rnd.seconds:>6.1f} s {rnd.note}")


def _failures(finish: Finish) -> list[str]:
    out = []
    if finish.missing or finish.different:
        out.append(f"{len(finish.missing)} acknowledged instance(s) missing, {len(finish.different)} different")
    if finish.index_rows_without_object:
        out.append(f"{finish.index_rows_without_object} index row(s) without their object ({finish.check})")
    if finish.derived_not_done or finish.derived_failed:
        out.append(f"derived work: {finish.derived_not_done} not done, {finish.derived_failed} failed")
    if finish.repair_available and finish.repair_exit != 0:
        out.append(f"pacs check --repair exited {finish.repair_exit}")
    for rnd in finish.rounds:
        if rnd.kind not in OUTAGES and not rnd.killed:
            out.append(f"{rnd.mode} {rnd.kind}={rnd.nth}: the process did not die there ({rnd.note})")
        if rnd.kind in ("s3-down", "database-down") and rnd.note.startswith("while down") and "0x0000" in rnd.note:
            out.append(f"{rnd.mode} {rnd.kind}: a Success while the server was away")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--modes", default="embedded,scaled", help="comma-separated: embedded, scaled")
    parser.add_argument("--slices", type=int, default=4, help="instances per batch (at least 3)")
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each slice")
    parser.add_argument("--outage-every", type=int, default=8, help="every N-th scaled round is an outage (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs of every process life)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"embedded", "scaled"} or args.slices < 3:
        parser.error("--modes takes embedded and/or scaled; --slices at least 3")
    out = Path(__file__).parent / "out"  # git-ignored, like every benchmark's work folders
    out.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="crash-drill-", dir=out))
    plan = _plan(args.rounds, modes, args.outage_every)
    print(f"crash drill: {args.rounds} rounds ({', '.join(modes)}), {args.slices} slices of {args.size}² per batch; "
          f"logs in {work}", flush=True)
    started = time.monotonic()
    s3: SeaweedS3 | None = None
    stacks: dict[str, Stack] = {}
    drills: dict[str, Drill] = {}
    finishes: list[Finish] = []
    try:
        for mode in modes:
            if mode == "scaled":
                s3 = SeaweedS3(work / "seaweed")
                s3.start()
                stacks[mode] = ScaledStack(work / mode, s3)
            else:
                stacks[mode] = EmbeddedStack(work / mode)
            drills[mode] = Drill(stacks[mode], work / f"{mode}-batches", slices=args.slices, size=args.size)
        for n, (mode, kind, nth) in enumerate(plan, 1):
            drill = drills[mode]
            rnd = drill.outage_round(kind) if kind in OUTAGES else drill.kill_round(kind, nth)
            print(_line(n, len(plan), rnd), flush=True)
        for mode in modes:
            finishes.append(drills[mode].finish())
    finally:
        for stack in stacks.values():
            stack.close()
        if s3 is not None:
            s3.stop()
    print()
    print(report(finishes))
    failures = [f for finish in finishes for f in _failures(finish)]
    print(f"\n{len(plan)} rounds in {time.monotonic() - started:.0f} s; "
          + ("no acknowledged instance lost" if not failures else f"{len(failures)} FAILURE(S):"))
    for failure in failures:
        print(f"  - {failure}")
    if not args.keep and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

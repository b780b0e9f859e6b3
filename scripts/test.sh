#!/usr/bin/env bash
# Install everything the tests need and run them: the whole suite (unit + integration on real servers), or with
# --fast only the unit tier (`-m "not integration"`: no server, no process; tests/support/tiers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [[ "${1:-}" == "--fast" ]]; then
  fast=1
  shift
fi
scripts/bootstrap.sh --test
# pytest rewrites the asserts of every test module in each xdist worker (~10 s of CPU per worker) unless it finds
# its cached rewrite (tests/__pycache__/*-pytest-*.pyc), which it never writes where PYTHONDONTWRITEBYTECODE is set
# (CI machines). One collection with writing allowed fills that cache (and compiles tests/support, bench) on the
# core the single-threaded type check leaves idle; the workers then read it. Nothing about the tests changes.
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m pytest --collect-only -q -p no:cacheprovider >/dev/null 2>&1 &
warm_pid=$!
trap 'kill "$warm_pid" 2>/dev/null || true' EXIT
.venv/bin/ruff check .
.venv/bin/mypy  # [tool.mypy] in pyproject.toml: pacs, storage, dicom_scp, viewer_api, workers
wait "$warm_pid" || true  # only a cache: a collection error is reported by the run below
trap - EXIT
set +e
if [[ $fast -eq 1 ]]; then
  # CPU-bound and independent: spread test by test over every core.
  .venv/bin/python -m pytest -m "not integration" -n "${PACS_TEST_WORKERS:-auto}" --dist load "$@"
else
  # Most tests wait on real servers and processes, not on the CPU: three pytest workers on the 2-core CI machine
  # keep the suite well under 15 minutes. A test module runs whole on one worker (its servers are started once),
  # in collection order, which puts the longest modules first (tests/support/scheduling.py); xdist's own reorder
  # (by number of tests) would start the few-but-long modules last and leave the run waiting on one worker.
  .venv/bin/python -m pytest -n "${PACS_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
fi
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit $rc

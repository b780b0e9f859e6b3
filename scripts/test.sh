#!/usr/bin/env bash
# Install everything the tests need and run the whole suite (unit + integration on real servers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit $rc

#!/usr/bin/env bash
# Install everything the tests need and run the whole suite (unit + integration on real servers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
.venv/bin/ruff check .
set +e
# Most tests wait on real servers and processes, not on the CPU: three pytest workers on the 2-core CI machine
# keep the suite well under 15 minutes. A test module runs whole on one worker (its servers are started once).
.venv/bin/python -m pytest -n "${PACS_TEST_WORKERS:-3}" --dist loadfile "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit $rc

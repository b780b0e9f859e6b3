#!/usr/bin/env bash
# Install and start the whole pipeline on the embedded defaults (SQLite, files, in-process workers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/pacs serve "$@"

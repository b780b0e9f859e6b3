#!/usr/bin/env bash
# Install and start the whole pipeline on the embedded defaults (SQLite, files, in-process workers),
# with the OHIF viewer under /ohif/ (fetched once from the npm registry when npm is available).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
ohif_dir="${PACS_OHIF_DIR:-${PACS_DATA_DIR:-pacs-data}/ohif}"
if [[ ! -f "$ohif_dir/pacs-ohif.json" ]]; then  # written last by a complete install
  if command -v npm >/dev/null; then
    .venv/bin/pacs viewer install-ohif || echo "OHIF viewer not installed (see README, Viewer); the archive runs without it" >&2
  else
    echo "npm not found: the OHIF viewer is not installed (README, Viewer: --from-tarball)" >&2
  fi
fi
exec .venv/bin/pacs serve "$@"

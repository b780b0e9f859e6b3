#!/usr/bin/env bash
# Ingest benchmark: installs what it needs when missing (DCMTK and Orthanc from Debian, the venv with the
# test extras), then runs `python -m bench.ingest` with the arguments given, e.g.
#   scripts/bench.sh                                 # 500 slices 512x512, 3 repeats, 4 in parallel
#   scripts/bench.sh --slices 50 --size 256 --repeats 1
#   scripts/bench.sh --skip-scaled --skip-orthanc
# The scaled configuration also needs PostgreSQL on 127.0.0.1:5432 (trust auth for `postgres`) and Redis
# on 127.0.0.1:6379 (db 8 is flushed); leave it out with --skip-scaled.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[[ -x /usr/bin/storescu && -x /usr/bin/echoscu ]] || missing+=(dcmtk)
[[ -x "${ORTHANC_BIN:-/usr/sbin/Orthanc}" ]] || missing+=(orthanc)
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing ${missing[*]} with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  # The Debian package starts a system-wide Orthanc on port 4242/8042; the benchmark runs its own.
fi

if ! [[ -x .venv/bin/python ]] || ! .venv/bin/python -c 'import pacs, psutil, httpx, rich' 2>/dev/null \
    || ! [[ -x .venv/bin/weed ]]; then
  scripts/bootstrap.sh --test
fi

exec .venv/bin/python -m bench.ingest "$@"

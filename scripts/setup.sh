#!/usr/bin/env bash
# Install cdi-ray and its dependencies into a virtual environment (default: .venv in the checkout;
# VENV=DIR to choose another). The environment is created when missing, never with the system's
# site-packages, so what is installed by hand elsewhere on the machine is not visible to it.
#   --test   also the test extras
#   --fresh  delete the environment first (CI: prove that a clean install works)
# The CPU build of torch goes in first where the environment has no torch: an unpinned `torch`
# requirement would otherwise pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
extras="" fresh=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    --fresh) fresh=1 ;;
    *) echo "usage: scripts/setup.sh [--test] [--fresh]" >&2; exit 2 ;;
  esac
done
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE
if [ "$fresh" = 1 ]; then rm -rf "$VENV"; fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "${PYTHON:-python3}" -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately; install it where we can (root with apt-get).
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      ver=$("${PYTHON:-python3}" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "python${ver}-venv" >/dev/null 2>&1 \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv >/dev/null
      rm -rf "$VENV"
      "${PYTHON:-python3}" -m venv "$VENV"
    else
      echo "error: '${PYTHON:-python3} -m venv' failed; install your Python's venv module (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
PY="$VENV/bin/python"
# Installed without byte-compiling, then compiled on all cores at once: pip compiles file by file
# on one core (≈ 50 s of the install here), and the byte code must be there before the first run —
# where PYTHONDONTWRITEBYTECODE is set, nothing compiled on import is ever kept, and every process
# (test workers, Ray workers, drivers) would compile torch, Ray and diffusers again on each start.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-compile "torch==2.13.0"
fi
"$PY" -m pip install --quiet --no-compile -e ".${extras}"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# packages' own test suites are never imported; cdi_ray and jobs are the editable checkout. A few
# files are written for a newer Python (torch's testing helpers) and fail to compile, as under pip.
"$PY" -m compileall -q -j 0 -x 'site-packages/.*/tests?/' "$site" cdi_ray jobs >/dev/null 2>&1 || true

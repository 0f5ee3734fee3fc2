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
# Byte-compiled at install (pip's default): with --no-compile the install took ~70 s less, but every
# process of the first run — test workers, Ray workers, drivers — compiled the same modules again.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".${extras}"

#!/usr/bin/env bash
# Install cdi-ray and its dependencies into the current Python.
# The CPU build of torch goes in first where no torch is present: an unpinned `torch`
# requirement would otherwise pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".${extras}"

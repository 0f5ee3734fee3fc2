#!/usr/bin/env bash
# Before/after of the e2e benchmark on one machine: BASE_REV (checked out in a temporary git worktree,
# same Python environment) and this checkout run the same benchmark in turn, in the order $ORDER
# (default ABBA: base main main base), each writing OUT/<version>_<n>.json; then compare them.
#
#   scripts/benchmark_ab.sh a78595b /tmp/ab                                   # four e2e runs, ≈ 65 min
#   ORDER="base main" scripts/benchmark_ab.sh a78595b /tmp/ab --preset gray-box --source local
#
# Extra arguments go to both benchmarks (after --only e2e). docs/PERFORMANCE.md says how to read it.
set -euo pipefail
base_rev=${1:?usage: scripts/benchmark_ab.sh BASE_REV OUT [benchmark args…]}
out=${2:?usage: scripts/benchmark_ab.sh BASE_REV OUT [benchmark args…]}
shift 2
main=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
mkdir -p "$out"
out=$(cd "$out" && pwd)
base=$(mktemp -d)/base
git -C "$main" worktree add --detach "$base" "$base_rev" >/dev/null
trap 'git -C "$main" worktree remove --force "$base"' EXIT
declare -A seen=()
compare=()
for version in ${ORDER:-base main main base}; do
  seen[$version]=$(( ${seen[$version]:-0} + 1 ))
  dir=$([ "$version" = base ] && echo "$base" || echo "$main")
  file="$out/${version}_${seen[$version]}.json"
  echo "$(date -u +%H:%M:%S) start $version ${seen[$version]} load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/run.log"
  rc=0  # the benchmark exits 1 when a target row says NO: its figures are still the measurement
  (cd "$dir" && PYTHONPATH="$dir" "$python" jobs/benchmark.py --only e2e "$@" --json "$file" > "${file%.json}.out" 2>&1) || rc=$?
  echo "$(date -u +%H:%M:%S) end $version ${seen[$version]} rc $rc" | tee -a "$out/run.log"
  [ -s "$file" ] || { echo "no figures in $file: see ${file%.json}.out" >&2; exit 1; }
  compare+=("$version=$file")
done
"$python" "$main/jobs/benchmark_compare.py" "${compare[@]}"

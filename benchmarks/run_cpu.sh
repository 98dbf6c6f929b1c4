#!/usr/bin/env bash
# The CPU benchmark suite (about 10 minutes on 2 shared cores): every CPU case of benchmarks/,
# results in $OUT (default benchmarks/results/cpu-<date>/): machine.json (CPU model, cores,
# threads, torch, load average), bench_cpu.json, bench_cpu.log, summary.md. Then run
# python benchmarks/report.py --write-readme to refresh the README's tables.
#
#   bash benchmarks/run_cpu.sh            # env: PYTHON, OUT, PYTEST_ARGS (e.g. "-k configs")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/cpu-$(date +%Y%m%d)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "=== [+$(( $(date +%s) - T0 ))s] $*"; }

# the peer cases (MONAI over the same network; the engine in bf16 beside it) need the bench extra:
# without it they would be skipped and the run would look complete
if ! "$PY" -c "import monai" 2>/dev/null; then
  echo "run_cpu.sh: MONAI is missing (the peer benchmark): pip install -e '.[bench]'" >&2
  exit 2
fi

step "machine"
"$PY" benchmarks/_harness.py describe cpu | tee "$OUT/machine.json"

step "CPU benchmarks"
# shellcheck disable=SC2086
"$PY" -m pytest benchmarks -m "not cuda" --benchmark-only -q -s -p no:cacheprovider \
  --durations=12 --benchmark-json="$OUT/bench_cpu.json" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/bench_cpu.log" \
  | grep --line-buffered -E '^\[|passed|failed|error|Error|^[0-9.]+s (call|setup)' | cut -c1-240
status=${PIPESTATUS[0]}
echo "suite took $(( $(date +%s) - T0 )) s, load average $(cut -d' ' -f1-3 /proc/loadavg)" \
  | tee -a "$OUT/bench_cpu.log"

step "summary"
"$PY" benchmarks/report.py --summary "$OUT" > "$OUT/summary.md" && head -n 40 "$OUT/summary.md"
step "done (benchmarks exit $status)"
exit "$status"

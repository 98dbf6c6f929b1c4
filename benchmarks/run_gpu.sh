#!/usr/bin/env bash
# The GPU run, one command on a GPU machine (no internet needed): builds the extension for the
# present GPU, then runs benchmarks/gpu_run.py, which writes one JSON (gpu_run.json), rewritten
# after every section, each section under its own time limit. Planned to end within TOTAL_S
# (default 480 s), build included, on a 16-core H100/H200 host: the build (one architecture,
# MAX_JOBS = the machine's cores) takes what it takes, the sections share what is left
# (docs/performance.md has the budget), and a hard timeout stops a hung section.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh
#   env: PYTHON, MAX_JOBS (default: nproc), TOTAL_S (480)
#
# Files in $OUT (default benchmarks/results/gpu-<date>/): build.log, gpu_run.json, gpu_run.log,
# cuda_tests.log, summary.md (benchmarks/report.py --summary). Afterwards, in the repository:
# copy the folder to benchmarks/results/<gpu>-<date>/ and run
# python benchmarks/report.py --write-readme.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}
JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "=== [+$(( $(date +%s) - T0 ))s] $*"; }

if ! CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))"); then
  echo "no CUDA device is visible to $PY"; exit 2
fi
step "build for compute capability $CAP with $JOBS jobs"
if ! MAX_JOBS=$JOBS TORCH_CUDA_ARCH_LIST=$CAP "$PY" setup.py build_ext --inplace \
     > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -m fastunet | tee -a "$OUT/build.log"
BUDGET=$(( TOTAL_S - ($(date +%s) - T0) - 20 ))  # 20 s: interpreter start-up and the summary
(( BUDGET < 60 )) && BUDGET=60
step "gpu_run.py with a budget of ${BUDGET}s"
timeout -k 10 $(( BUDGET + 30 )) "$PY" benchmarks/gpu_run.py --out "$OUT" --budget "$BUDGET" \
  2>&1 | tee "$OUT/gpu_run.log"
status=${PIPESTATUS[0]}
step "summary"
"$PY" benchmarks/report.py --summary "$OUT" > "$OUT/summary.md"
head -n 80 "$OUT/summary.md"
step "done (gpu_run.py exit $status: 0 all sections ok, 1 some failed or ran out of time)"
exit "$status"

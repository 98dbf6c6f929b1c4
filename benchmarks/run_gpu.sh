#!/usr/bin/env bash
# One-shot check for a lent GPU machine (no internet; torch with CUDA, nvcc, pytest,
# pytest-benchmark there). Builds the extension for the present GPU, runs the CUDA tests and the
# GPU benchmarks, and writes results named by device to $OUT (or benchmarks/results/gpu-<date>/).
# Every step streams into its own file, so a run cut off by its time limit still tells something;
# each step's time limit is capped so that the whole run ends within TOTAL_S (default 420 s), and
# benchmarks are stopped with SIGINT, which still writes the JSON of the finished cases.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh
#   env: PYTHON, MAX_JOBS, TOTAL_S, TEST_TIMEOUT (120), BENCH_TIMEOUT (110), CONFIGS_TIMEOUT (140)
#
# Files (7, one folder): device.json, build.log, cuda_tests.log, bench_gpu.log, bench_gpu.json
# (kernels, tiles, inference, training), bench_gpu_configs.json (every published config and
# inference mode), summary.md (benchmarks/report.py --summary). Afterwards, in the repository:
# copy the folder to benchmarks/results/<gpu>-<date>/ and run python benchmarks/report.py
# --write-readme.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "=== [+$(( $(date +%s) - T0 ))s] $*"; }
# limit WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the later steps
limit() {
  local left=$(( T0 + TOTAL_S - $(date +%s) - $2 ))
  local want=$1
  (( left < want )) && want=$left
  (( want < 15 )) && want=15
  echo "$want"
}
progress() { grep --line-buffered -E '^\[|passed|failed|error|Error' | cut -c1-240; }

step "device"
"$PY" - > "$OUT/device.json" <<'PY'
import datetime, json, platform, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"device": torch.cuda.get_device_name(0),
                  "capability": "%d.%d" % torch.cuda.get_device_capability(0),
                  "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
                  "date": datetime.date.today().isoformat()}, indent=1))
PY
cat "$OUT/device.json"
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")

step "build for compute capability $CAP"
if ! MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=$CAP "$PY" setup.py build_ext --inplace \
     > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -m fastunet | tee -a "$OUT/build.log"

step "CUDA tests"
timeout -k 10 "$(limit "${TEST_TIMEOUT:-120}" 240)" "$PY" -m pytest tests -m cuda -q \
  -p no:cacheprovider -rf 2>&1 | tee "$OUT/cuda_tests.log" | grep --line-buffered -v "^ *$" \
  | tail -n 25
test_status=${PIPESTATUS[0]}

step "GPU benchmarks: kernels, tiles, inference, training"
timeout -s INT -k 15 "$(limit "${BENCH_TIMEOUT:-110}" 150)" "$PY" -m pytest benchmarks -m cuda \
  --ignore=benchmarks/bench_configs.py --benchmark-only -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | progress
bench_status=${PIPESTATUS[0]}

step "GPU benchmarks: every published config and inference mode"
timeout -s INT -k 15 "$(limit "${CONFIGS_TIMEOUT:-140}" 10)" "$PY" -m pytest \
  benchmarks/bench_configs.py -m cuda --benchmark-only -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/bench_gpu_configs.json" 2>&1 | tee -a "$OUT/bench_gpu.log" | progress
configs_status=${PIPESTATUS[0]}

step "summary"
"$PY" benchmarks/report.py --summary "$OUT" | tee "$OUT/summary.md" | head -n 80
step "done (tests exit $test_status, benchmarks exit $bench_status, configs exit $configs_status)"
[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$configs_status" -eq 0 ]

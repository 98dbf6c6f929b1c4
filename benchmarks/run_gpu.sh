#!/usr/bin/env bash
# One-shot check for a lent GPU machine (no internet; torch with CUDA, nvcc, pytest,
# pytest-benchmark there). Builds the extension for the present GPU, runs the CUDA tests and the
# GPU benchmarks, and writes results named by device to $OUT (or benchmarks/results/gpu-<date>/).
# Every step streams into its own file, so a run cut off by its time limit still tells something.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh        # env: PYTHON, MAX_JOBS, TEST_TIMEOUT, BENCH_TIMEOUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "=== [+$(( $(date +%s) - T0 ))s] $*"; }

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
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -rf \
  2>&1 | tee "$OUT/cuda_tests.log" | tail -25
test_status=${PIPESTATUS[0]}

step "GPU benchmarks"
timeout "${BENCH_TIMEOUT:-240}" "$PY" -m pytest benchmarks -m cuda --benchmark-only -q -s \
  -p no:cacheprovider --benchmark-json="$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" \
  | grep -v "^ *$" | tail -40
bench_status=${PIPESTATUS[0]}

step "summary"
"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]
dev = json.load(open(os.path.join(out, "device.json")))
print(f"# GPU results: {dev['device']} (torch {dev['torch']}, CUDA {dev['cuda']}, {dev['date']})\n")
path = os.path.join(out, "bench_gpu.json")
if not os.path.exists(path):
    print("no benchmark JSON (benchmarks did not finish)"); sys.exit()
print("| benchmark | median ms | details |\n|---|---|---|")
for b in json.load(open(path))["benchmarks"]:
    info = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in b.get("extra_info", {}).items() if k != "device")
    print(f"| {b['name']} | {b['stats']['median'] * 1e3:.3f} | {info} |")
PY
step "done (tests exit $test_status, benchmarks exit $bench_status)"
[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]

import os, sys, time, torch
sys.path.insert(0, "benchmarks")
from bench_inference import _model, _monai_slide, _release_free_memory, HRF
from _harness import PeakMemory
from fastunet.inference import InferenceEngine, planner
torch.manual_seed(0)
model = _model("cpu", fast=True, config="synthetic")
x = torch.randn(1, 3, *HRF, generator=torch.Generator().manual_seed(1))
engines = {}
for name, cap in (("engine_1GiB", None), ("engine_128MiB", 128 << 20), ("engine_64MiB", 64 << 20)):
    e = InferenceEngine(model.encode_decode, "slide", 256, 170, channels_last=True, max_buffer_bytes=cap)
    e(x[:, :, :256, :512]); engines[name] = e
batch = planner.cpu_batch(next(iter(engines["engine_1GiB"]._probes.values())), planner.last_level_cache_bytes())
_monai_slide(model, x[:, :, :256, :512], 256, 170, batch)
runs = {k: (lambda e=e: e(x)) for k, e in engines.items()}
runs["monai"] = lambda: _monai_slide(model, x, 256, 170, batch)
ref = None
for rnd in range(2):
    for name, run in runs.items():
        _release_free_memory()
        with PeakMemory("cpu") as mem:
            t = time.perf_counter(); out = run(); s = time.perf_counter() - t
        if ref is None: ref = out
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        sched = getattr(engines.get(name), "last_schedule", None)
        print(f"round {rnd} {name}: {s:.2f} s, peak RSS growth {(mem.bytes or 0)/2**30:.3f} GiB, max rel diff {err:.1e}, band_rows {getattr(sched, 'band_rows', None)}", flush=True)
        del out

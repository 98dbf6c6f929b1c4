"""Large-image inference: the engine vs mmseg's eager slide loop, vs MONAI's
``sliding_window_inference`` over the same fused network, and the hardware roofline, measured in
the same run (ratios in extra_info; printed with -s).

    pytest benchmarks/bench_inference.py --benchmark-only -s            # CPU cases (minutes)
    pytest benchmarks/bench_inference.py --benchmark-only -s -m cuda    # GPU cases
    pip install -e '.[bench]'    # MONAI, for the peer cases (skipped without it)

Reference: ``fastunet.ops.tile_reference.slide_inference``, mmseg's loop (one 64x64 window per
forward, unfused modules, fp32, contiguous) on the same device. Peer: MONAI's
``sliding_window_inference`` (constant blending, the same windows: overlap 1 - stride/crop) over
the fused channels-last network that the engine runs, what a user could assemble from
``fastunet.fuse`` and MONAI. Ours: ``InferenceEngine`` with BN folded (``fastunet.fuse``),
channels-last, windows in batches and one fused aggregation. Roofline: the model's FLOPs
(6.32 GFLOP per 64x64 window, linear in pixels) over the measured matrix-multiply throughput.
Random weights and a random normalised image: speed does not depend on them.
"""
import os
import time

import pytest
import torch

import fastunet
from fastunet import _native
from fastunet.inference import InferenceEngine, cpu_has_native_bf16, planner
from fastunet.ops.tile_reference import slide_inference
from fastunet.training.step import set_fused
from _harness import PeakMemory, best_of, interleaved_best, summarize_snapshot  # noqa: E402


# GPU cases: marked `cuda` and skipped without a GPU and the CUDA kernels
CUDA = [pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.has_cuda_kernels()),
    reason="needs a CUDA GPU and fastunet's CUDA kernels")]

CONFIG = "fcn_unet_s5-d16_64x64_40k_drive"
GFLOP_PER_PIXEL = 6.32 / (64 * 64)
DRIVE, HRF = (584, 565), (2336, 3504)


def _model(device, fast, config=CONFIG):
    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config(config)).eval()
    if not fast:  # the eager reference: plain Conv2d -> BatchNorm2d -> ReLU, as mmseg runs it
        set_fused(model, False)
    else:
        try:
            model = fastunet.fuse(model)
        except (AttributeError, ImportError):
            pass  # a build without fastunet.fuse: unfused
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def _matmul_tflops(device, dtype):
    n = 2048 if torch.device(device).type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = best_of(lambda: a @ b, 3, device)
    return 2 * n ** 3 / t / 1e12


def _slide_flops(size):
    from fastunet.ops import window_count

    return 6.32e9 * window_count(size[0], 64, 42) * window_count(size[1], 64, 42)


def _report(benchmark, name, **info):
    benchmark.extra_info.update(info)
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in info.items()))


def _close(got, expected, rtol):
    scale = expected.abs().max().item()
    err = (got.float().cpu() - expected.float().cpu()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module")
def cpu_reference():
    """mmseg's loop on a DRIVE-sized image on the CPU: (seconds, logits, input)."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, *DRIVE)
    model = _model("cpu", fast=False)
    with torch.no_grad():
        model.encode_decode(x[:, :, :64, :64])  # oneDNN plans the window shape once
        start = time.perf_counter()
        logits = slide_inference(model.encode_decode, x, 64, 42)
        seconds = time.perf_counter() - start
    return seconds, logits, x


@pytest.mark.parametrize("mode", ["slide", "overlap-tile", "whole"])
def test_cpu_drive(benchmark, cpu_reference, mode):
    ref_s, ref_logits, x = cpu_reference
    model = _model("cpu", fast=True)
    engine = InferenceEngine(model.encode_decode, mode, 64, 42, channels_last=True)
    out = engine(x)  # warm-up: probe, oneDNN plans
    benchmark.pedantic(lambda: engine(x), rounds=2, warmup_rounds=0)
    ours = benchmark.stats.stats.min
    info = dict(reference_s=ref_s, ours_s=ours, speedup=ref_s / ours,
                reference_modules="unfused", threads=torch.get_num_threads(),
                window_batch=engine.last_schedule.window_batch)
    plan = engine.plan(*DRIVE)
    flops = 6.32e9 * plan.windows_per_image * plan.y.window * plan.x.window / 4096
    peak = _matmul_tflops("cpu", torch.float32)
    info.update(gflop=flops / 1e9, matmul_tflops=peak, roofline_fraction=flops / ours / 1e12 / peak,
                reference_roofline_fraction=_slide_flops(DRIVE) / ref_s / 1e12 / peak)
    if mode == "slide":  # exact mode: the same logits
        info["max_rel_error"] = _close(out, ref_logits, 1e-4)
    else:  # other modes change the numbers; report how much the labels move
        info["label_agreement"] = (out.argmax(1) == ref_logits.argmax(1)).float().mean().item()
    _report(benchmark, f"cpu drive {mode}", **info)


# ----------------------------------------------------------------- CPU window batches
SWEEP = {  # (model width, window) -> window batches to time: around the best, kept short
    (16, 64): (8, 16, 32, 64, 128), (64, 64): (8, 16, 32, 64, 182),
    (16, 128): (2, 4, 8, 16, 32), (64, 128): (2, 4, 8, 16, 32),
    (16, 256): (1, 2, 4, 8), (64, 256): (1, 2, 4, 8),
}
WIDTH_CONFIGS = {16: "synthetic", 64: CONFIG}


def _sweep_cases():
    cases = [pytest.param(w, s, b, "fp32", id=f"width{w}-window{s}-fp32")
             for (w, s), b in SWEEP.items()]
    cases += [pytest.param(w, 64, SWEEP[(w, 64)], "bf16", id=f"width{w}-window64-bf16")
              for w in (16, 64)]
    return cases


@pytest.mark.parametrize("width, window, batches, precision", _sweep_cases())
def test_cpu_window_batch_sweep(benchmark, width, window, batches, precision):
    """Seconds per window of the fused channels-last model at each window batch (interleaved
    rounds, best of each), against the batch the engine's planner picks for this model and
    window on this CPU: what CPU_FIXED_SHARE and the cache term are fitted to."""
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    model = _model("cpu", fast=True, config=WIDTH_CONFIGS[width])
    engine = InferenceEngine(model.encode_decode, "slide", window, window * 2 // 3,
                             channels_last=True, precision=precision)
    engine(torch.randn(1, 3, window, window))  # the probe: the engine's footprint of the model
    footprint = next(iter(engine._probes.values()))
    picked = planner.cpu_batch(footprint, planner.last_level_cache_bytes())
    batches = sorted(set(batches) | {min(picked, max(batches))})
    xs = {b: torch.randn(b, 3, window, window).contiguous(memory_format=torch.channels_last)
          for b in batches}
    runs = {b: (lambda b=b: engine._call(xs[b])) for b in batches}
    with torch.inference_mode():
        for run in runs.values():
            run()  # oneDNN plans and Winograd weight caches for each batch shape
        best = interleaved_best(runs, 2)
    benchmark.pedantic(runs[batches[-1]], rounds=1, warmup_rounds=0)
    per_window = {b: best[b] / b for b in batches}
    fastest = min(per_window, key=per_window.get)
    _report(benchmark, f"cpu window batch width {width} window {window} {precision}",
            load_average=os.getloadavg()[0], cache_MiB=planner.last_level_cache_bytes() / 2**20,
            largest_op_MiB=footprint.largest_op / 2**20,
            window_traffic_MiB=footprint.window_traffic / 2**20,
            fixed_traffic_MiB=footprint.fixed_traffic / 2**20, planner_batch=picked,
            best_batch=fastest,
            planner_vs_best=per_window[min(picked, max(batches))] / per_window[fastest],
            **{f"ms_per_window_b{b}": 1e3 * t for b, t in per_window.items()})


# ----------------------------------------------------------------- CPU peers
def _monai():
    return pytest.importorskip("monai.inferers", reason="MONAI is a benchmark extra: "
                               "pip install -e '.[bench]'")


def _monai_slide(model, x, crop, stride, batch):
    """MONAI's sliding_window_inference with mmseg's windows (overlap = 1 - stride / crop)."""
    inferers = _monai()
    with torch.inference_mode():
        return inferers.sliding_window_inference(x, (crop, crop), batch, model.encode_decode,
                                                 overlap=1 - stride / crop, mode="constant")


def test_cpu_drive_slide_vs_peers(benchmark, cpu_reference):
    """DRIVE exact slide on the full-width FCN, fp32: the engine against MONAI's loop over the
    same fused network (at its batch of 32 and at the engine's batch), interleaved, and against
    mmseg's loop (the cpu_reference fixture); also the engine in bf16 where the CPU has it and
    the engine's share of time outside the forwards (what overlapping the window extraction
    with the forwards could at most save)."""
    _monai()
    ref_s, ref_logits, x = cpu_reference
    model = _model("cpu", fast=True)
    engine = InferenceEngine(model.encode_decode, "slide", 64, 42, channels_last=True)
    ours = engine(x)
    batch = engine.last_schedule.window_batch
    theirs = _monai_slide(model, x, 64, 42, 32)
    runs = {"engine": lambda: engine(x), "monai32": lambda: _monai_slide(model, x, 64, 42, 32),
            "monai_same_batch": lambda: _monai_slide(model, x, 64, 42, batch)}
    if cpu_has_native_bf16():
        low = InferenceEngine(model.encode_decode, "slide", 64, 42, channels_last=True,
                              precision="bf16")
        low_logits = low(x)
        runs["engine_bf16"] = lambda: low(x)
    windows = engine.plan(*DRIVE).windows_per_image
    cut = torch.randn(windows, 3, 64, 64)
    runs["forwards_only"] = lambda: [engine._call(cut[k:k + batch])
                                     for k in range(0, windows, batch)]
    with torch.inference_mode():
        best = interleaved_best(runs, 3)
    benchmark.pedantic(lambda: engine(x), rounds=1, warmup_rounds=0)
    info = dict(load_average=os.getloadavg()[0], window_batch=batch, reference_s=ref_s,
                **{f"{k}_s": v for k, v in best.items()},
                speedup_vs_monai32=best["monai32"] / best["engine"],
                speedup_vs_monai_same_batch=best["monai_same_batch"] / best["engine"],
                speedup_vs_reference=ref_s / best["engine"],
                outside_forwards_share=1 - best["forwards_only"] / best["engine"],
                max_rel_error=_close(ours, ref_logits, 1e-4),
                monai_max_rel_difference=_close(theirs, ours, 1e-5))
    if "engine_bf16" in best:
        info.update(bf16_speedup_vs_reference=ref_s / best["engine_bf16"],
                    bf16_speedup_vs_fp32=best["engine"] / best["engine_bf16"],
                    bf16_label_agreement=(low_logits.argmax(1) == ours.argmax(1)).float()
                    .mean().item())
    _report(benchmark, "cpu drive slide vs peers", **info)


def _release_free_memory():
    """Hand freed heap pages back to the OS (glibc), so a peak-RSS measurement that follows
    counts every page its run touches."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def test_cpu_hrf_slide_vs_monai(benchmark):
    """HRF (2336x3504, crop 256, stride 170) exact slide, fp32, time and peak resident memory
    of the engine against MONAI's loop at the same window batch, one image each. The model is
    UNet-S5-D16 + FCN at a quarter of the width (the synthetic config's): the full width
    takes minutes per HRF image on 2 cores; the buffers compared do not depend on the width."""
    _monai()
    model = _model("cpu", fast=True, config="synthetic")
    x = torch.randn(1, 3, *HRF, generator=torch.Generator().manual_seed(1))
    engine = InferenceEngine(model.encode_decode, "slide", 256, 170, channels_last=True)
    engine(x[:, :, :256, :512])  # the probe and oneDNN plans outside the measurement
    batch = planner.cpu_batch(next(iter(engine._probes.values())),
                              planner.last_level_cache_bytes())
    _monai_slide(model, x[:, :, :256, :512], 256, 170, batch)
    results = {}
    for name, run in (("engine", lambda: engine(x)),
                      ("monai", lambda: _monai_slide(model, x, 256, 170, batch))):
        _release_free_memory()  # so that neither run reuses pages the other left resident
        with PeakMemory("cpu") as mem:
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
        results[name] = (seconds, mem.bytes, out)
        del out
    benchmark.pedantic(lambda: None, rounds=1, warmup_rounds=0)
    (ours_s, ours_mem, ours), (theirs_s, theirs_mem, theirs) = results["engine"], results["monai"]
    _report(benchmark, "cpu hrf slide vs monai", load_average=os.getloadavg()[0],
            window_batch=engine.last_schedule.window_batch, engine_s=ours_s, monai_s=theirs_s,
            speedup_vs_monai=theirs_s / ours_s,
            engine_peak_rss_growth_GiB=(ours_mem or 0) / 2**30,
            monai_peak_rss_growth_GiB=(theirs_mem or 0) / 2**30,
            monai_max_rel_difference=_close(theirs, ours, 1e-5))


@pytest.fixture()
def no_tf32():
    """True fp32 convolutions (cuDNN's default TF32 would make 1e-4 comparisons meaningless)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@CUDA[0]
@CUDA[1]
def test_cuda_drive_slide_fp32_vs_reference(benchmark, no_tf32):
    torch.manual_seed(1)
    x = torch.randn(1, 3, *DRIVE, device="cuda")
    ref_model = _model("cuda", fast=False)
    with torch.no_grad():
        slide_inference(ref_model.encode_decode, x, 64, 42)  # warm-up
        ref_s = best_of(lambda: slide_inference(ref_model.encode_decode, x, 64, 42), 3, "cuda")
        ref_logits = slide_inference(ref_model.encode_decode, x, 64, 42)
    model = _model("cuda", fast=True)
    results = {}
    for graphs in (False, True):
        engine = InferenceEngine(model.encode_decode, "slide", 64, 42, channels_last=True,
                                 cuda_graphs=graphs)
        out = engine(x)
        engine(x)
        results[graphs] = (best_of(lambda: engine(x), 10, "cuda"), out)
    benchmark.pedantic(lambda: (engine(x), torch.cuda.synchronize()), rounds=10, warmup_rounds=1)
    ours = min(results[False][0], results[True][0])
    _report(benchmark, "cuda drive slide fp32", device=torch.cuda.get_device_name(),
            reference_s=ref_s, reference_modules="unfused", eager_s=results[False][0],
            graphs_s=results[True][0],
            speedup=ref_s / ours, graphs_speedup=results[False][0] / results[True][0],
            max_rel_error=_close(results[False][1], ref_logits, 1e-4),
            tflops=_slide_flops(DRIVE) / ours / 1e12,
            matmul_fp32_tflops=_matmul_tflops("cuda", torch.float32))


@CUDA[0]
@CUDA[1]
@pytest.mark.parametrize("mode", ["slide", "overlap-tile", "whole"])
def test_cuda_drive_bf16_images_per_second(benchmark, mode):
    x = torch.randn(1, 3, *DRIVE, device="cuda")
    model = _model("cuda", fast=True)
    rates = {}
    for graphs in (False, True):
        engine = InferenceEngine(model.encode_decode, mode, 64, 42, precision="bf16",
                                 channels_last=True, cuda_graphs=graphs)
        engine(x)
        engine(x)
        rates[graphs] = 10 / best_of(lambda: [engine(x) for _ in range(10)], 1, "cuda")
    benchmark.pedantic(lambda: (engine(x), torch.cuda.synchronize()), rounds=10, warmup_rounds=1)
    plan = engine.plan(*DRIVE)
    flops = 6.32e9 * plan.windows_per_image * plan.y.window * plan.x.window / 4096
    best = max(rates.values())
    _report(benchmark, f"cuda drive bf16 {mode}", device=torch.cuda.get_device_name(),
            images_per_s=best, eager_images_per_s=rates[False], graphs_images_per_s=rates[True],
            tflops=flops * best / 1e12, matmul_bf16_tflops=_matmul_tflops("cuda", torch.bfloat16))


def _hrf_cuda_model():
    torch.manual_seed(0)
    model = fastunet.build_segmentor(
        fastunet.get_config("fcn_unet_s5-d16_256x256_40k_hrf")).eval()
    return fastunet.fuse(model).to("cuda", memory_format=torch.channels_last)


@CUDA[0]
@CUDA[1]
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_hrf_images_per_second_and_memory(benchmark, precision):
    x = torch.randn(1, 3, *HRF, device="cuda")
    model = _hrf_cuda_model()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # weights and the input image
    engine = InferenceEngine(model.encode_decode, "slide", 256, 170, precision=precision,
                             channels_last=True)
    engine(x)
    engine(x)  # the second image of this size captures the CUDA graph
    seconds = best_of(lambda: engine(x), 3, "cuda")
    peak = torch.cuda.max_memory_allocated() - base  # everything inference added, graph pool too
    benchmark.pedantic(lambda: (engine(x), torch.cuda.synchronize()), rounds=3, warmup_rounds=0)
    _report(benchmark, f"cuda hrf slide {precision}", device=torch.cuda.get_device_name(),
            images_per_s=1 / seconds, peak_memory_GiB=peak / 2**30,
            window_batch=engine.last_schedule.window_batch,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            tflops=6.32e9 * 16 * 294 / seconds / 1e12)


@CUDA[0]
@CUDA[1]
def test_cuda_hrf_bf16_window_batch_vs_memory(benchmark):
    """HRF slide bf16 at fixed window batches: images/s against peak memory, to choose the
    automatic batch that keeps HRF under 4 GB at the least cost in speed."""
    x = torch.randn(1, 3, *HRF, device="cuda")
    model = _hrf_cuda_model()
    sweep = {}
    for batch in (16, 32, 64, 128):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine = InferenceEngine(model.encode_decode, "slide", 256, 170, precision="bf16",
                                 channels_last=True, window_batch=batch)
        engine(x)
        engine(x)  # captures the CUDA graph
        seconds = best_of(lambda: engine(x), 3, "cuda")
        sweep[batch] = dict(images_per_s=1 / seconds,
                            peak_memory_GiB=(torch.cuda.max_memory_allocated() - base) / 2**30)
        del engine
    benchmark.pedantic(lambda: None, rounds=1, warmup_rounds=0)
    _report(benchmark, "cuda hrf slide bf16 window-batch sweep",
            device=torch.cuda.get_device_name(),
            **{f"batch{b}_{k}": v for b, r in sweep.items() for k, v in r.items()})


@CUDA[0]
@CUDA[1]
def test_cuda_hrf_bf16_memory_per_window(benchmark):
    """What HRF slide bf16 keeps per window: peak memory at window batches 8 and 16 (eager, no
    CUDA graph), so per window = the difference / 8; once as the model runs, once with its
    bilinear upsamplings in bf16 (CUDA autocast runs upsample_bilinear2d in fp32, so each
    decoder stage's upsampled map is held in fp32 beside its bf16 cast). A memory snapshot of the
    batch-16 run gives the largest groups of blocks live at the peak (written to
    $OUT/hrf_bf16_memory_snapshot.pickle when OUT is set, for torch.cuda.memory viewers)."""
    from fastunet.models import unet

    x = torch.randn(1, 3, *HRF, device="cuda")
    model = _hrf_cuda_model()
    run_upsample = unet.Upsample.forward

    def bf16_upsample(self, t):
        with torch.autocast("cuda", enabled=False):
            return run_upsample(self, t.to(torch.bfloat16))

    peaks = {}
    for variant in ("as_is", "upsample_bf16"):
        unet.Upsample.forward = run_upsample if variant == "as_is" else bf16_upsample
        try:
            for batch in (8, 16):
                engine = InferenceEngine(model.encode_decode, "slide", 256, 170, precision="bf16",
                                         channels_last=True, window_batch=batch,
                                         cuda_graphs=False)
                engine(x)  # probe and cuDNN autotuning outside the measurement
                with PeakMemory("cuda") as mem:
                    engine(x)
                peaks[(variant, batch)] = mem.bytes
        finally:
            unet.Upsample.forward = run_upsample
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    try:
        engine = InferenceEngine(model.encode_decode, "slide", 256, 170, precision="bf16",
                                 channels_last=True, window_batch=16, cuda_graphs=False)
        engine(x)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    if os.environ.get("OUT"):
        import pickle

        with open(os.path.join(os.environ["OUT"], "hrf_bf16_memory_snapshot.pickle"), "wb") as f:
            pickle.dump(snapshot, f)
    live = summarize_snapshot(snapshot, top=8)
    benchmark.pedantic(lambda: None, rounds=1, warmup_rounds=0)
    per_window = {v: (peaks[(v, 16)] - peaks[(v, 8)]) / 8 / 2**20 for v in ("as_is",
                                                                           "upsample_bf16")}
    _report(benchmark, "cuda hrf slide bf16 memory per window",
            device=torch.cuda.get_device_name(),
            per_window_MiB=per_window["as_is"], per_window_upsample_bf16_MiB=per_window[
                "upsample_bf16"], peak_batch16_MiB=peaks[("as_is", 16)] / 2**20,
            snapshot_peak_MiB=live["peak_live_bytes"] / 2**20,
            **{f"live_at_peak_{i}": f"{g['where']} {g['bytes'] / 2**20:.1f} MiB"
               for i, g in enumerate(live["largest_at_peak"])})

"""Large-image inference: the engine vs mmseg's eager slide loop, and the hardware roofline,
measured in the same run (ratios in extra_info; printed with -s).

    pytest benchmarks/bench_inference.py --benchmark-only -s            # CPU cases (minutes)
    pytest benchmarks/bench_inference.py --benchmark-only -s -m cuda    # GPU cases

Reference: ``slide_inference_reference`` (one 64x64 window per forward, unfused modules, fp32,
contiguous) on the same device. Ours: ``InferenceEngine`` with BN folded (``fastunet.fuse``),
channels-last, windows in batches and one fused aggregation. Roofline: the model's FLOPs (SPEC §3,
6.32 GFLOP per 64x64 window, linear in pixels) over the measured matrix-multiply throughput.
Random weights and a random normalised image: speed does not depend on them.
"""
import time

import pytest
import torch

import fastunet
from fastunet import _native
from fastunet.inference import InferenceEngine
from _harness import best_of  # noqa: E402  (benchmarks/ is on sys.path under pytest)


# GPU cases: marked `cuda` and skipped without a GPU and the CUDA kernels
CUDA = [pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.has_cuda_kernels()),
    reason="needs a CUDA GPU and fastunet's CUDA kernels")]

CONFIG = "fcn_unet_s5-d16_64x64_40k_drive"
GFLOP_PER_PIXEL = 6.32 / (64 * 64)
DRIVE, HRF = (584, 565), (2336, 3504)


def _model(device, fast):
    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config(CONFIG)).eval()
    if not fast:  # the eager reference: plain Conv2d -> BatchNorm2d -> ReLU, as mmseg runs it
        for m in model.modules():
            if isinstance(m, fastunet.nn.ConvBNReLU):
                m.fused = False
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
        logits = model.slide_inference_reference(x, 64, 42)
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
                window_batch=engine.last_schedule["window_batch"])
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
        ref_model.slide_inference_reference(x, 64, 42)  # warm-up
        ref_s = best_of(lambda: ref_model.slide_inference_reference(x, 64, 42), 3, "cuda")
        ref_logits = ref_model.slide_inference_reference(x, 64, 42)
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
            window_batch=engine.last_schedule["window_batch"],
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            tflops=6.32e9 * 16 * 294 / seconds / 1e12)


@CUDA[0]
@CUDA[1]
def test_cuda_hrf_bf16_window_batch_vs_memory(benchmark):
    """HRF slide bf16 at fixed window batches: images/s against peak memory, to choose the
    automatic batch that keeps HRF under 4 GB (issue 5) at the least cost in speed."""
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

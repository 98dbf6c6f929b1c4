"""The GPU run: every GPU figure fastunet publishes, in one process and one JSON file.

    python benchmarks/gpu_run.py --out DIR                # on a GPU machine (run_gpu.sh)
    python benchmarks/gpu_run.py --out DIR --dry-run      # every section, tiny sizes, on the CPU

``benchmarks/run_gpu.sh`` builds the extension for the present GPU and runs this. Sections, in
order, each under its own time limit (seconds; shrunk to what is left of --budget, so the whole
run ends in time; a section that cannot get MIN_SECTION_S is skipped):

  environment  device, driver, CUDA, cuDNN, torch, the build; matmul TFLOP/s and copy bandwidth
  blocks       one conv(-BN)-ReLU layer of every distinct UNet shape, in bf16 and fp16,
               channels-last: conv alone, conv + bias, today's default (conv_bias_relu),
               cuDNN's fused conv-bias-ReLU, the eager conv -> BN -> ReLU, the candidate
               epilogue (conv, then _bias_relu_) and the ConvBNReLU module; the stem's
               convolution also with its 3 input channels zero-padded to 8
  tiles        tile_aggregate (fresh / reused output, softmax, argmax) and tile_extract on the
               DRIVE and HRF grids, against a device copy of the windows (the bandwidth bound)
  training     FCN training step, AMP bf16, batch 4 and 16: eager and fused, each plain and
               captured in a CUDA graph: step time, kernels per step, and the forward+backward
               activation peak (optimizer excluded)
  inference    DRIVE and HRF, slide / overlap-tile / whole, bf16 and fp32 (TF32 off): images/s
               and peak memory; DRIVE slide fp32 also against mmseg's one-window loop
  memory       a CUDA memory snapshot of one HRF bf16 window batch, summarised: what is live at
               the peak, by the line that allocated it
  tests        pytest -m cuda (the CUDA tests), its summary and the failures

The JSON (DIR/gpu_run.json) is rewritten after every section, so a run cut off still holds
every finished section; a section that runs out of time keeps the cases it finished. Timing:
kernel-level cases are GPU time (CUDA events around a CUDA graph of `calls` calls, per call),
with the host time of issuing them eagerly beside it; whole images and training steps are CUDA
events around a loop of calls. On the CPU (--dry-run) everything is host wall time and the
CUDA-only parts are marked skipped, so the script is known to work before GPU time is spent.
benchmarks/report.py reads the JSON.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the fastunet of this tree
sys.path.insert(0, HERE)  # _harness
import fastunet  # noqa: E402
from fastunet import _native, settings  # noqa: E402
from fastunet.training.step import set_fused  # noqa: E402
import _harness  # noqa: E402

SCHEMA = "fastunet-gpu-run/1"
RESULT_FILE = "gpu_run.json"
MIN_SECTION_S = 10
DRIVE_CONFIG = "fcn_unet_s5-d16_64x64_40k_drive"
HRF_CONFIG = "fcn_unet_s5-d16_256x256_40k_hrf"

# Section time limits in seconds on the GPU (the build takes the rest of run_gpu.sh's 8 minutes;
# docs/performance.md has the budget).
LIMITS = {"environment": 15, "blocks": 60, "tiles": 15, "training": 60, "inference": 80,
          "memory": 15, "tests": 125}


class Sizes:
    """Problem sizes: the real ones on a GPU, tiny ones for --dry-run on the CPU."""

    def __init__(self, dry):
        self.dry = dry
        self.block_batch = 1 if dry else 32
        self.block_window = 32 if dry else 64
        self.block_dtypes = ("fp32",) if dry else ("bf16", "fp16")
        self.block_shapes = 3 if dry else None  # None: every distinct shape
        self.calls = 2 if dry else 20           # calls per timed graph / loop
        self.repeats = 1 if dry else 5
        # (dataset, config, crop, stride, image size)
        self.datasets = ([("drive", DRIVE_CONFIG, 64, 42, (80, 96)),
                          ("hrf", DRIVE_CONFIG, 64, 42, (96, 112))] if dry else
                         [("drive", DRIVE_CONFIG, 64, 42, (584, 565)),
                          ("hrf", HRF_CONFIG, 256, 170, (2336, 3504))])
        self.precisions = ("fp32",) if dry else ("bf16", "fp32")
        self.images = {"drive": 1 if dry else 10, "hrf": 1 if dry else 3}
        self.train_batches = (2,) if dry else (4, 16)
        self.train_size = 16 if dry else 64
        self.train_amp = not dry  # AMP bf16 on the GPU; the CPU's bf16 is slow to no purpose
        self.train_steps = 1 if dry else 20
        self.tile_cases = ([("drive", 80, 96, 32, 21), ("hrf", 96, 112, 48, 32)] if dry else
                           [("drive", 584, 565, 64, 42), ("hrf", 2336, 3504, 256, 170)])
        self.memory_batch = 16


# ------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capture(body, warm_up, prepare=None):
    """A CUDA graph of body(): warm_up() runs three times on a side stream first (as capture
    needs), then prepare() if given, then the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            warm_up()
    torch.cuda.current_stream().wait_stream(side)
    if prepare is not None:
        prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _events_ms(run, repeats, device):
    """Median of `repeats` timings of run() in ms: CUDA events on a GPU, wall time on the CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def time_call(fn, device, calls, repeats):
    """Per-call timings of fn in microseconds.

    gpu_us: a CUDA graph of `calls` calls, replayed and timed with CUDA events (the kernels
    alone; None when capture fails, with the reason in graph_error); loop_us: the same calls
    issued eagerly, timed with events (what an eager caller gets); host_us: the host time to
    issue one call eagerly. On the CPU gpu_us is None and loop_us is wall time."""
    out = {"gpu_us": None, "loop_us": None, "host_us": None}

    def loop():
        for _ in range(calls):
            fn()

    loop()
    _sync(device)
    if device.type == "cuda":
        try:
            graph = _capture(loop, fn)
            graph.replay()
            out["gpu_us"] = 1e3 * _events_ms(graph.replay, repeats, device) / calls
        except Exception as e:  # noqa: BLE001 - capture is best effort; the reason is kept
            out["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    out["loop_us"] = 1e3 * _events_ms(loop, repeats, device) / calls
    _sync(device)
    t0 = time.perf_counter()
    loop()
    out["host_us"] = 1e6 * (time.perf_counter() - t0) / calls
    _sync(device)
    return out


def count_kernels(fn, device, warm_up=True):
    """(GPU kernels, CPU-side ATen ops) that one call of fn runs, from torch.profiler (GPU
    kernels None on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    if warm_up:
        fn()
        _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset")))
    ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU
              and e.name.startswith("aten::"))
    return (kernels if device.type == "cuda" else None), ops


# ------------------------------------------------------------------------------ sections
class SectionTimeout(BaseException):
    """A section's time limit (not an Exception: the cases' own error handling lets it pass)."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raises SectionTimeout in the main thread after `seconds` (SIGALRM; Unix)."""
    def expire(signum, frame):
        raise SectionTimeout(f"time limit of {seconds} s reached")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def section_environment(ctx, result):
    device = ctx.device
    result.update(_harness.describe(device.type), dry_run=ctx.sizes.dry, argv=sys.argv[1:])
    result["native"] = dict(_native.BUILD_INFO) if _native.LOADED else None
    result["cuda_kernels"] = bool(_native.LOADED and _native.has_cuda_kernels())
    if device.type == "cuda":
        result["driver"] = _nvidia_smi("driver_version")
        result["gpu_clock_mhz"] = _nvidia_smi("clocks.max.sm")
    n = 512 if ctx.sizes.dry else 8192
    for precision in ("fp32", "bf16"):
        dtype = _harness.DTYPES[precision]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        with _harness._tf32(False):
            ms = _events_ms(lambda: a @ b, 1 if ctx.sizes.dry else 10, device)
        result[f"matmul_{precision}_tflops"] = 2 * n ** 3 / ms / 1e9
    src = torch.ones((1 << 20) if ctx.sizes.dry else (1 << 28), device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _events_ms(lambda: dst.copy_(src), 1 if ctx.sizes.dry else 10, device)
    result["copy_GBps"] = 2 * src.nbytes / ms / 1e6


def _nvidia_smi(field):
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def unet_block_shapes(window, batch):
    """Distinct (cin, cout, kernel, stride, padding, dilation, groups, H, W) of the DRIVE FCN
    model's ConvBNReLU blocks on batch x 3 x window x window inputs (traced on the meta device)."""
    with torch.device("meta"):
        model = fastunet.build_segmentor(fastunet.get_config(DRIVE_CONFIG)).eval()
    shapes = []

    def hook(module, args):
        c, x = module.conv, args[0]
        key = (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
               c.dilation[0], c.groups, x.shape[2], x.shape[3])
        if key not in shapes:
            shapes.append(key)

    blocks = [m for m in model.modules() if isinstance(m, fastunet.nn.ConvBNReLU)]
    handles = [m.register_forward_pre_hook(hook) for m in blocks]
    for m in blocks:
        m.fused = False
    with torch.no_grad():
        model.encode_decode(torch.empty(batch, 3, window, window, device="meta"))
    for h in handles:
        h.remove()
    return shapes


def _block_variants(x, shape, dtype, device):
    """{variant: callable} of one layer, and the eager output that the others are checked
    against (all channels-last)."""
    cin, cout, k, stride, pad, dil, groups = shape[:7]
    cl = torch.channels_last
    w = (torch.randn(cout, cin // groups, k, k, device=device) / (cin * k * k) ** 0.5).to(
        dtype).contiguous(memory_format=cl)
    b = (0.1 * torch.randn(cout, device=device)).to(dtype)
    mean, var = 0.1 * torch.randn(cout, device=device), 1 + torch.rand(cout, device=device)
    gamma, beta = 1 + 0.1 * torch.randn(cout, device=device), 0.1 * torch.randn(cout, device=device)
    bn = [t.to(dtype) for t in (mean, var, gamma, beta)]
    args = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    module = fastunet.nn.ConvBNReLU(cin, cout, k, stride, pad, dil, groups)
    module = module.to(device=device, dtype=dtype, memory_format=cl).eval()

    def epilogue():
        y = F.conv2d(x, w, None, *args)
        torch.ops.fastunet._bias_relu_(y, b)
        return y

    variants = {
        "conv": lambda: F.conv2d(x, w, None, *args),
        "conv_bias": lambda: F.conv2d(x, w, b, *args),
        "fastunet_op": lambda: torch.ops.fastunet.conv_bias_relu(x, w, b, *args, True),
        "eager": lambda: F.relu(F.batch_norm(F.conv2d(x, w, None, *args), bn[0], bn[1], bn[2],
                                             bn[3], False, 0.1, 1e-5)),
        "epilogue": epilogue,
        "module": lambda: module(x),
    }
    if device.type == "cuda":
        variants["cudnn_relu"] = lambda: torch.cudnn_convolution_relu(x, w, b, *args)
    if cin == 3 and groups == 1:  # the stem: 3 input channels zero-padded to 8 (same numbers)
        x8 = F.pad(x, (0, 0, 0, 0, 0, 5)).contiguous(memory_format=cl)
        w8 = F.pad(w, (0, 0, 0, 0, 0, 5)).contiguous(memory_format=cl)
        variants["conv_cin8"] = lambda: F.conv2d(x8, w8, None, *args)
    reference = F.relu(F.conv2d(x, w, b, *args))  # what the bias variants must equal
    return variants, reference


def section_blocks(ctx, result):
    s = ctx.sizes
    device = ctx.device
    shapes = unet_block_shapes(s.block_window, s.block_batch)
    if s.block_shapes:
        shapes = shapes[:s.block_shapes]
    counted = shapes[min(1, len(shapes) - 1)]  # kernels and ATen ops per call: one shape
    result.update(batch=s.block_batch, window=s.block_window, layout="channels_last",
                  shapes=[list(sh) for sh in shapes], cases=[], kernels_per_call={},
                  kernels_shape=list(counted))
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # fixed shapes, as the engine's windows
    try:
        for precision in s.block_dtypes:
            for shape in shapes:
                _time_block_variants(ctx, result, precision, shape, shape == counted)
    finally:
        torch.backends.cudnn.benchmark = saved


def _time_block_variants(ctx, result, precision, shape, count):
    """Times every variant of one layer; inputs and weights are made outside inference mode
    (the module's fold cache reads their version counters), the calls run inside it."""
    s, device = ctx.sizes, ctx.device
    dtype = _harness.DTYPES[precision]
    with torch.no_grad():
        x = torch.randn(s.block_batch, shape[0], shape[7], shape[8], device=device,
                        dtype=dtype).contiguous(memory_format=torch.channels_last)
        variants, reference = _block_variants(x, shape, dtype, device)
    scale = reference.float().abs().max().item() or 1.0
    with torch.inference_mode():
        for name, fn in variants.items():
            case = {"precision": precision, "shape": list(shape), "variant": name}
            try:
                if name in ("fastunet_op", "epilogue", "cudnn_relu"):
                    err = (fn().float() - reference.float()).abs().max().item()
                    case["max_rel_diff"] = err / scale
                case.update(time_call(fn, device, s.calls, s.repeats))
            except Exception as e:  # noqa: BLE001 - one variant may be unsupported
                case["error"] = f"{type(e).__name__}: {e}"[:300]
            result["cases"].append(case)
        if count and precision == s.block_dtypes[0]:
            for name, fn in variants.items():
                with contextlib.suppress(Exception):
                    result["kernels_per_call"][name] = count_kernels(fn, device)


def section_tiles(ctx, result):
    from fastunet import ops
    from fastunet.ops import tile_reference as ref

    s, device = ctx.sizes, ctx.device
    result["cases"] = []
    for name, H, W, win, stride in s.tile_cases:
        n = ref.window_count(H, win, stride) * ref.window_count(W, win, stride)
        tiles = torch.randn(n, 2, win, win, device=device)
        image = torch.randn(1, 2, H, W, device=device)
        out = torch.empty(1, 2, H, W, device=device)
        buf = torch.empty_like(tiles)
        expected = ref.tile_aggregate(tiles, 1, H, W, stride, stride)
        got = ops.tile_aggregate(tiles, 1, H, W, stride)
        case = {"grid": name, "height": H, "width": W, "window": win, "stride": stride,
                "windows": n, "tiles_bytes": tiles.nbytes, "out_bytes": out.nbytes,
                "max_abs_diff": (got - expected).abs().max().item()}
        calls = {
            "copy": lambda: buf.copy_(tiles),
            "aggregate": lambda: ops.tile_aggregate(tiles, 1, H, W, stride),
            "aggregate_out": lambda: ops.tile_aggregate(tiles, 1, H, W, stride, out=out),
            "softmax": lambda: ops.tile_aggregate(tiles, 1, H, W, stride, epilogue="softmax"),
            "argmax": lambda: ops.tile_aggregate(tiles, 1, H, W, stride, epilogue="argmax"),
            "extract": lambda: ops.tile_extract(image, win, stride),
        }
        with torch.inference_mode():
            for op_name, fn in calls.items():
                case[op_name] = time_call(fn, device, s.calls, s.repeats)
        copy = case["copy"]["gpu_us"] or case["copy"]["loop_us"]
        bandwidth = 2 * tiles.nbytes / copy  # bytes per microsecond
        case["bandwidth_GBps"] = bandwidth / 1e3
        case["bound_us"] = (tiles.nbytes + out.nbytes) / bandwidth
        result["cases"].append(case)


def _train_model(fused, device):
    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config(DRIVE_CONFIG)).to(device).train()
    set_fused(model, fused)
    return model.to(memory_format=torch.channels_last)


class TrainStep:
    """One AMP bf16 SGD step of the FCN model (the config's optimizer settings) on fixed data."""

    def __init__(self, fused, batch, size, device, amp=True):
        self.device, self.amp = device, amp
        self.model = _train_model(fused, device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                   weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(
            memory_format=torch.channels_last)
        self.label = torch.randint(0, 2, (batch, size, size), generator=g).to(device)
        self.cache = True  # autocast's weight-cast cache; off inside graph capture

    def forward_backward(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=self.cache):
            loss = sum(self.model.loss(self.x, self.label).values())
        loss.backward()

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward()
        self.opt.step()

    def activation_peak(self):
        """Peak bytes of one forward+backward above what is allocated before it (weights,
        gradients kept allocated, optimizer state): the optimizer step is not included."""
        self()
        self.opt.zero_grad(set_to_none=False)
        with _harness.PeakMemory(self.device) as mem:
            self.forward_backward()
        return mem.bytes


def section_training(ctx, result):
    s, device = ctx.sizes, ctx.device
    result.update(size=s.train_size, precision="bf16" if s.train_amp else "fp32",
                  layout="channels_last", cases=[])
    for batch in s.train_batches:
        for fused in (False, True):
            for captured in (False, True):
                case = {"batch": batch, "fused": fused, "captured": captured}
                result["cases"].append(case)
                if captured and device.type != "cuda":
                    case["skipped"] = "CUDA graphs need a GPU"
                    continue
                try:
                    step = TrainStep(fused, batch, s.train_size, device, s.train_amp)
                    _measure_train(case, step, captured, s.train_steps, device)
                except Exception as e:  # noqa: BLE001 - e.g. a step that cannot be captured
                    case["error"] = f"{type(e).__name__}: {e}"[:300]
                    case["traceback"] = traceback.format_exc(limit=4)[-1500:]
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _measure_train(case, step, captured, steps, device):
    if not captured:
        peak = step.activation_peak()
        case["activation_peak_MiB"] = None if peak is None else peak / 2**20
        run = step
    else:
        run = _capture_step(step).replay
    case["kernels"], case["ops"] = count_kernels(run, device, warm_up=False)  # warm already
    case["step_ms"] = _events_ms(lambda: [run() for _ in range(steps)], 3 if steps > 1 else 1,
                                 device) / steps


def _capture_step(step):
    """A CUDA graph of forward, backward and optimizer step (PyTorch's whole-network capture:
    warm-up steps on a side stream, then gradients set to None so that backward allocates
    them in the graph's pool and every replay overwrites them)."""
    step.cache = False  # autocast's cast cache cannot live across a capture

    def body():
        step.forward_backward()
        step.opt.step()

    return _capture(body, step, lambda: step.opt.zero_grad(set_to_none=True))


def _inference_model(config, device, fused):
    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config(config)).eval()
    if fused:
        model = fastunet.fuse(model).to(memory_format=torch.channels_last)
    else:
        set_fused(model, False)
    return model.to(device)


def section_inference(ctx, result):
    from fastunet.inference import InferenceEngine

    s, device = ctx.sizes, ctx.device
    result["cases"] = []
    for name, config, crop, stride, size in s.datasets:
        model = _inference_model(config, device, fused=True)
        x = torch.randn(1, 3, *size, device=device)
        # "default": what fuse() runs on this device (on CUDA: ATen's convolution of the folded
        # weights); "fastunet": fastunet's conv_bias_relu kernels forced on, slide only, so the
        # next default can follow the faster of the two
        runs = [(p, m, "default") for p in s.precisions
                for m in ("slide", "overlap-tile", "whole")]
        runs += [(p, "slide", "fastunet") for p in s.precisions]
        for precision, mode, kernels in runs:
            case = {"dataset": name, "config": config, "mode": mode, "precision": precision,
                    "kernels": kernels, "height": size[0], "width": size[1]}
            result["cases"].append(case)
            try:
                with _harness._tf32(False), settings.override(
                        fused=True if kernels == "fastunet" else settings.current().fused):
                    _measure_engine(case, InferenceEngine(
                        model.encode_decode, mode, crop, stride, precision=precision,
                        channels_last=True), x, config, s.images[name], device)
            except Exception as e:  # noqa: BLE001
                case["error"] = f"{type(e).__name__}: {e}"[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if name == "drive":
            result["reference"] = _measure_reference(config, crop, stride, x, device)
        del model


def _measure_engine(case, engine, x, config, images, device):
    """images/s over `images` calls after two (the second captures the engine's CUDA graphs);
    peak memory: everything the engine added above the weights and the input, warm-up and
    graph pools included."""
    with _harness.PeakMemory(device) as mem:
        engine(x)
        engine(x)
        ms = _events_ms(lambda: [engine(x) for _ in range(images)], 1, device)
    schedule = getattr(engine, "last_schedule", None)
    plan = engine.plan(*x.shape[2:])
    case.update(images_per_s=1e3 * images / ms,
                peak_memory_GiB=None if mem.bytes is None else mem.bytes / 2**30,
                window_batch=getattr(schedule, "window_batch", None),
                gflop=_harness.plan_flops(config, plan) / 1e9,
                windows_per_image=plan.windows_per_image)


def _measure_reference(config, crop, stride, x, device):
    """mmseg's slide loop (one window per forward, unfused modules, fp32, TF32 off)."""
    from fastunet.ops.tile_reference import slide_inference

    model = _inference_model(config, device, fused=False)
    with torch.no_grad(), _harness._tf32(False):
        slide_inference(model.encode_decode, x, crop, stride)
        ms = _events_ms(lambda: slide_inference(model.encode_decode, x, crop, stride), 1, device)
    return {"dataset": "drive", "mode": "slide", "precision": "fp32", "images_per_s": 1e3 / ms,
            "modules": "unfused", "windows": "one per forward"}


def section_memory(ctx, result):
    device, s = ctx.device, ctx.sizes
    if device.type != "cuda":
        result["skipped"] = "a CUDA memory snapshot needs a GPU"
        return
    hrf = ctx.results.get("inference", {}).get("result", {}).get("cases", [])
    batch = next((c.get("window_batch") for c in hrf if c.get("dataset") == "hrf"
                  and c.get("mode") == "slide" and c.get("precision") == "bf16"
                  and c.get("window_batch")), s.memory_batch)
    model = _inference_model(HRF_CONFIG, device, fused=True)
    x = torch.randn(batch, 3, 256, 256, device=device).contiguous(
        memory_format=torch.channels_last)
    run = lambda: model.encode_decode(x)  # noqa: E731
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        run()
        with _harness.PeakMemory(device) as mem:
            # Python stacks only: symbolising C++ frames could take longer than the section
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python",
                                                     max_entries=200000)
            try:
                out = run()
                torch.cuda.synchronize()
                snapshot = torch.cuda.memory._snapshot()
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
    peak = mem.bytes
    result.update(window_batch=batch, window=256, precision="bf16",
                  peak_bytes_above_weights=peak, peak_MiB_per_window=peak / batch / 2**20,
                  output_bytes=out.nbytes, summary=_harness.summarize_snapshot(snapshot))


def section_tests(ctx, result):
    args = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider",
            "-rf", "--no-header"]
    if ctx.sizes.dry:
        args.append("--collect-only")
    log = os.path.join(ctx.out, "cuda_tests.log")
    left = max(5, int(ctx.section_deadline - time.time()) - 5)
    try:
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=left)
        text, result["exit_code"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else \
            (e.stdout or "")
        result["exit_code"] = None
        result["timed_out_after_s"] = left
    with open(log, "w", encoding="utf-8") as f:
        f.write(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    result["summary"] = lines[-1] if lines else ""
    result["failures"] = [ln for ln in lines if ln.startswith("FAILED")][:40]
    result["log"] = os.path.basename(log)


SECTIONS = [("environment", section_environment), ("blocks", section_blocks),
            ("tiles", section_tiles), ("training", section_training),
            ("inference", section_inference), ("memory", section_memory),
            ("tests", section_tests)]


# --------------------------------------------------------------------------------- driver
class Context:
    def __init__(self, device, sizes, out, deadline):
        self.device, self.sizes, self.out, self.deadline = device, sizes, out, deadline
        self.results = {}
        self.section_deadline = deadline


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(out, device, dry, budget_s, only=None, limits=None):
    """Runs the sections into out/gpu_run.json; returns the JSON's dict."""
    os.makedirs(out, exist_ok=True)
    # a dry run's CPU work takes longer than the GPU's: its limits only catch a hung section
    limits = dict({k: v * (10 if dry else 1) for k, v in LIMITS.items()}, **(limits or {}))
    start = time.time()
    ctx = Context(torch.device(device), Sizes(dry), out, start + budget_s)
    data = {"schema": SCHEMA, "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "device_type": ctx.device.type, "dry_run": dry, "budget_s": budget_s,
            "limits_s": limits, "python": platform.python_version(), "sections": ctx.results}
    path = os.path.join(out, RESULT_FILE)
    for name, fn in SECTIONS:
        if only and name not in only:
            continue
        left = ctx.deadline - time.time()
        limit = int(min(limits[name], left))
        record = {"status": "skipped", "limit_s": limit, "result": {}}
        ctx.results[name] = record
        if limit < MIN_SECTION_S and not dry:
            record["reason"] = f"{int(left)} s left of the budget"
            write_json(path, data)
            continue
        ctx.section_deadline = time.time() + limit
        t0 = time.time()
        print(f"[gpu_run +{t0 - start:5.0f}s] {name} (limit {limit} s)", flush=True)
        try:
            with time_limit(limit):
                fn(ctx, record["result"])
            record["status"] = "ok"
        except SectionTimeout as e:
            record["status"], record["error"] = "timeout", str(e)
        except Exception as e:  # noqa: BLE001 - a broken section must not stop the run
            record["status"], record["error"] = "error", f"{type(e).__name__}: {e}"[:500]
            record["traceback"] = traceback.format_exc(limit=6)[-3000:]
        record["seconds"] = round(time.time() - t0, 1)
        print(f"[gpu_run +{time.time() - start:5.0f}s] {name}: {record['status']} "
              f"in {record['seconds']} s" + (f" ({record.get('error')})"
                                             if record["status"] != "ok" else ""), flush=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        data["seconds"] = round(time.time() - start, 1)
        write_json(path, data)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", required=True, help="folder for gpu_run.json and the test log")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU: checks that every section runs")
    parser.add_argument("--device", default=None,
                        help="cuda (default on a GPU machine) or cpu (default with --dry-run)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all sections together (default 380; 3600 with "
                             "--dry-run)")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_run: no CUDA device is visible (use --dry-run to check the script on the "
              "CPU)", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {n for n, _ in SECTIONS}
    if unknown:
        print(f"gpu_run: unknown sections {sorted(unknown)}; known: "
              f"{', '.join(n for n, _ in SECTIONS)}", file=sys.stderr)
        return 2
    budget = args.budget or (3600.0 if args.dry_run else 380.0)
    data = run(args.out, device, args.dry_run, budget, only)
    bad = [n for n, r in data["sections"].items() if r["status"] in ("error", "timeout")]
    print(f"gpu_run: wrote {os.path.join(args.out, RESULT_FILE)}"
          + (f"; sections with problems: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

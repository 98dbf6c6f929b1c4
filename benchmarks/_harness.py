"""Shared benchmark helpers: devices, timing, FLOP counting, machine peaks, peak memory and the
``extra_info`` conventions that ``benchmarks/report.py`` reads.

Conventions (keys a bench file puts in ``benchmark.extra_info``; ``record`` fills derived ones):

- ``device``: the device's name ("NVIDIA H100 80GB HBM3", "AMD EPYC (2 cores)"); ``threads``.
- ``reference`` (what the case is compared with) and ``speedup_vs_reference`` (reference seconds /
  our seconds: above 1 is faster), both measured in the same test.
- ``gflop``: floating-point operations of the timed work (``count_flops``: conv/matmul FLOPs as
  torch.utils.flop_counter counts them, 2 per multiply-add); ``tflops``: achieved rate;
  ``peak_tflops`` / ``peak_dtype``: the machine's matrix-multiply rate in that dtype, measured in
  the same session (``probe``); ``peak_fraction``: tflops / peak_tflops (the roofline view).
- ``derived``: True when a figure (images/s) is computed from a measured subset of windows and
  the exact window count instead of timed on whole images; ``derived_from`` says which subset.
- ``peak_memory_GiB``: CUDA: ``torch.cuda.max_memory_allocated`` over the measured work minus
  what was allocated before it; CPU: the process's peak resident set size over it
  (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``).

    python benchmarks/_harness.py describe [cpu|cuda]   # the machine description as JSON
    python benchmarks/_harness.py probe [cpu|cuda]      # matmul TFLOP/s and memory bandwidth
"""
import datetime
import functools
import json
import os
import platform
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # run as a script: import the fastunet of this tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastunet import _native  # noqa: E402
from fastunet.training.step import set_fused  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and _native.has_cuda_kernels()
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU and fastunet's CUDA kernels")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------- devices
def device_type(device):
    """'cpu' or 'cuda' for a device, its name, or a pytest id containing 'cuda'."""
    return "cuda" if "cuda" in str(device) else "cpu"


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    """Human name of the device a case ran on: the GPU's name, or the CPU model and core count."""
    if device_type(device) == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def describe(device):
    """A JSON-able description of the machine for a results folder."""
    info = {"device": device_name(device), "device_type": device_type(device),
            "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "native": dict(_native.BUILD_INFO) if _native.LOADED else None,
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.date.today().isoformat()}
    if device_type(device) == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(capability="%d.%d" % (props.major, props.minor),
                    sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


# ----------------------------------------------------------------------------------- timing
def sync(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device_type(device) == "cuda":
        torch.cuda.synchronize()


def best_of(fn, rounds, device="cpu"):
    """Fastest of `rounds` calls of fn, in seconds, with the device synchronised around each."""
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best(fns, rounds, device="cpu"):
    """Fastest time of each function over rounds that run them in turn, so that on a shared,
    noisy machine every variant sees the same conditions."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], best_of(fn, 1, device))
    return best


def synced(fn, device):
    """fn followed by a device synchronisation: what pytest-benchmark should time."""
    if device_type(device) != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


# ------------------------------------------------------------------------------------ FLOPs
def count_flops(fn, *args, **kwargs):
    """FLOPs of fn(*args) as torch.utils.flop_counter counts them (2 per multiply-add; convs and
    matmuls only). Runs fn: pass meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def window_flops(config, height, width):
    """FLOPs of the config's ``encode_decode`` (backbone + decode head, as at test time) on one
    height x width window, counted on the meta device with the plain (unfused) modules."""
    import fastunet

    with torch.device("meta"):
        model = fastunet.build_segmentor(fastunet.get_config(config)).eval()
    set_fused(model, False)  # the native ops have no FLOP formulas; the plain ones count alike
    return count_flops(model.encode_decode, torch.empty(1, 3, height, width, device="meta"))


@functools.lru_cache(maxsize=None)
def train_step_flops(config, batch, height, width):
    """FLOPs of one training step's forward and backward (decode and auxiliary heads, losses) on
    a batch of height x width crops, counted on the meta device with the plain modules."""
    import fastunet

    with torch.device("meta"):
        model = fastunet.build_segmentor(fastunet.get_config(config)).train()
    set_fused(model, False)
    x = torch.empty(batch, 3, height, width, device="meta")
    label = torch.zeros(batch, height, width, dtype=torch.long, device="meta")
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sum(model.loss(x, label).values()).backward()
    return counter.get_total_flops()


def plan_flops(config, plan):
    """FLOPs of one image under an inference-engine TilePlan (every window is a full forward)."""
    return plan.windows_per_image * window_flops(config, plan.y.window, plan.x.window)


# ------------------------------------------------------------------------------------ peaks
class _tf32:
    """cuBLAS/cuDNN TF32 switched on or off inside the block (restored after)."""

    def __init__(self, enabled):
        self.enabled = enabled

    def __enter__(self):
        self.old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old
        return False


def _rate(fn, flops, device, rounds=10):
    fn()
    return flops / best_of(fn, rounds, device) / 1e12


def _matmul_tflops(device, dtype, n):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _rate(lambda: a @ b, 2 * n ** 3, device)


def _conv_tflops(device, dtype, batch, channels=512, size=32):
    """A 3x3 convolution of the UNet's 512-channel stage (32x32 maps, channels-last)."""
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return _rate(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                     2 * batch * channels ** 2 * 9 * size * size, device)


def probe(device):
    """The machine's measured peaks on `device`: matmul and 3x3-conv TFLOP/s (fp32; tf32 and bf16
    too on CUDA; ``peak_<precision>_tflops`` is the higher of the two) and memory bandwidth in GB/s
    (a copy_ between two preallocated buffers, counting the read and the write)."""
    cuda = device_type(device) == "cuda"
    n, batch = (8192, 256) if cuda else (2048, 8)
    peaks = {}
    for precision in (("fp32", "tf32", "bf16") if cuda else ("fp32",)):
        dtype = DTYPES[precision]
        with _tf32(precision == "tf32"):
            peaks[f"matmul_{precision}_tflops"] = _matmul_tflops(device, dtype, n)
            peaks[f"conv_{precision}_tflops"] = _conv_tflops(device, dtype, batch)
        peaks[f"peak_{precision}_tflops"] = max(peaks[f"matmul_{precision}_tflops"],
                                                peaks[f"conv_{precision}_tflops"])
    elems = (1 << 28) if cuda else (1 << 26)  # 1 GiB / 256 MiB of float32
    src = torch.empty(elems, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    peaks["bandwidth_GBps"] = 2 * src.nbytes / best_of(lambda: dst.copy_(src), 5, device) / 1e9
    peaks["threads"] = torch.get_num_threads()
    return peaks


def peak_tflops(peaks, precision):
    """(the machine's peak TFLOP/s for a precision, the precision it was measured in), or
    (None, None) when the probe did not measure it; fp16 is compared with bf16 (the same
    tensor-core rate)."""
    precision = "bf16" if precision == "fp16" else precision
    peak = peaks.get(f"peak_{precision}_tflops")
    return (peak, precision) if peak else (None, None)


# ----------------------------------------------------------------------------------- memory
def _vm_kib(field):
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of the work inside ``with PeakMemory(device) as mem:``; ``mem.bytes`` after.

    CUDA: max_memory_allocated minus what was allocated on entry (the stats are reset on entry).
    CPU: the process's peak RSS minus its RSS on entry (VmHWM, reset on entry by writing 5 to
    /proc/self/clear_refs); None where /proc cannot be read or reset."""

    def __init__(self, device):
        self.device = device
        self.base = None   # in use on entry
        self.bytes = None  # the peak minus base
        self.total = None  # the peak itself (CUDA: allocated; CPU: the process's RSS)

    def __enter__(self):
        if device_type(self.device) == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = _vm_kib("VmRSS") * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if device_type(self.device) == "cuda":
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
        elif self.base is not None:
            try:
                self.total = _vm_kib("VmHWM") * 1024
            except OSError:
                self.total = None
        if self.total is not None:
            self.bytes = self.total - self.base
        return False


# ------------------------------------------------------------------------------- extra_info
def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def record(benchmark, device, *, seconds=None, flops=None, precision="fp32", peaks=None,
           reference_s=None, reference=None, memory=None, **info):
    """Put a case's results into benchmark.extra_info with the shared conventions and print them.

    seconds: the time of the work that `flops` counts; reference_s: the reference's time for the
    same work (-> speedup_vs_reference); peaks: ``probe(device)`` (-> peak_fraction);
    memory: bytes (-> peak_memory_GiB)."""
    out = {"device": device_name(device), "threads": torch.get_num_threads(),
           "precision": precision}
    if reference is not None:
        out["reference"] = reference
    if reference_s is not None and seconds:
        out["reference_s"] = reference_s
        out["speedup_vs_reference"] = reference_s / seconds
    if seconds is not None:
        out["seconds"] = seconds
    if flops is not None:
        out["gflop"] = flops / 1e9
        if seconds:
            out["tflops"] = flops / seconds / 1e12
            peak, dtype = peak_tflops(peaks or {}, precision)
            if peak:
                out.update(peak_tflops=peak, peak_dtype=dtype,
                           peak_fraction=out["tflops"] / peak)
    if memory is not None:
        out["peak_memory_GiB"] = memory / 2**30
    out.update(info)
    benchmark.extra_info.update(out)
    print(f"\n[{benchmark.name}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in out.items()),
          flush=True)
    return out


def main(argv):
    """`describe` or `probe` for a device, as JSON on stdout."""
    if len(argv) not in (1, 2) or argv[0] not in ("describe", "probe"):
        sys.exit("usage: python benchmarks/_harness.py describe|probe [cpu|cuda]")
    device = argv[1] if len(argv) == 2 else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type(device) == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible")
    result = describe(device) if argv[0] == "describe" else probe(device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summarize_snapshot(snapshot, top=12):
    """What is live at the peak of a torch.cuda.memory._snapshot(): the allocation trace is
    replayed to the moment of most live bytes, and the blocks live then are grouped by the
    first stack frame in fastunet (else the first frame), largest first."""
    traces = [e for dev in snapshot.get("device_traces", []) for e in dev]
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(traces):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > peak:
            peak, peak_at = total, i
    live = {}
    for e in traces[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    groups = {}
    for e in live.values():
        frames = e.get("frames") or []
        ours = [f for f in frames if "fastunet" in f.get("filename", "")]
        f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
        key = f"{os.path.relpath(f['filename'], _ROOT) if ours else f['filename']}:" \
              f"{f['line']} ({f['name']})"
        g = groups.setdefault(key, {"where": key, "bytes": 0, "blocks": 0})
        g["bytes"] += e["size"]
        g["blocks"] += 1
    largest = sorted(groups.values(), key=lambda g: -g["bytes"])[:top]
    return {"events": len(traces), "peak_live_bytes": peak, "live_blocks_at_peak": len(live),
            "largest_at_peak": largest}

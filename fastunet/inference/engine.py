"""Model-agnostic large-image inference: windows in batches, one fused aggregation, streaming.

    engine = InferenceEngine(window_fn, mode="slide", crop_size=64, stride=42)
    logits = engine(images)                    # normalised (N, 3, H, W) -> (N, C, H, W) float32
    labels = engine(images, output="labels")   # uint8 (N, H, W)

``window_fn`` maps a batch of normalised windows (B, 3, h, w) to logits (B, C, h, w); the
engine imports no model. Modes (``TilePlan`` gives the exact geometry of each):

- ``slide`` (default): SPEC §1 / mmseg exactly: the same window positions, the uniform average
  of the window logits. Windows are cut with ``tile_extract``, run ``window_batch`` at a time,
  and averaged by one ``tile_aggregate`` (softmax/argmax fused when asked for).
- ``overlap-tile``: the original U-Net strategy: the image is reflect-padded by ``margin`` and cut
  into large tiles (``tile_size``, a multiple of 16) whose outputs are cropped by ``margin`` on
  every side, so each output pixel is predicted with at least ``margin`` pixels of context.
- ``whole``: one forward of the image, reflect-padded (bottom/right) to a multiple of 16 when it
  is not one, cropped back. Reflection, not zeros: on the synthetic validation set a zero border
  cost 2.8 points of vessel Dice against ``slide`` (72.36 vs 75.14), a mirrored one none (75.17).

``slide`` on an image smaller than the crop whose size is not a multiple of 16 zero-pads it at
the bottom/right to the next multiple of 16 and crops the result back. mmseg raises an error in
exactly these cases (and in ``whole`` on sizes not a multiple of 16), so everywhere mmseg runs,
``slide`` and ``whole`` match it.

The first call for a window shape runs fn on one and two probe windows (classes, output shape
and, on CUDA, activation memory per window, for which it resets the device's peak-memory
statistics); later calls reuse that. Inference runs under ``torch.no_grad()``; call it with the
model in eval mode, as mmseg does (windows share batches here, so BN in training mode would not
behave as in one-window forwards).

When the working buffers of a whole image (its windows, their logits, the float aggregate) do not
fit in free memory, or on the CPU exceed ``max_buffer_bytes`` (default 1 GiB), window rows are
processed in bands: each band's input rows are normalised on their own (raw uint8 pixels with
``normalize=(mean, std)``: no float copy of the image), its window sums are added to the sums
carried from the band above, and the rows no later window touches are divided by their coverage
and written straight into the requested outputs (uint8 labels, float probabilities, on the CPU
when the device is short). Same result up to float rounding; memory is about the input + the
outputs + max(max_buffer_bytes, one window row's buffers) + one window batch's activations.
"""
import os
import warnings

import torch
import torch.nn.functional as F

from .. import ops, runtime
from .geometry import (AxisPlan, TilePlan, band_bytes, coverage, input_rows, overlap_axis,
                       pad, pair, slide_axis, whole_axis)
from .outputs import finish, normalizer

MODES = ("slide", "overlap-tile", "whole")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUTS = {"logits": "none", "probs": "softmax", "labels": "argmax"}
TTA_FLIPS = {"h": ((-1,),), "v": ((-2,),), "hv": ((-1,), (-2,), (-2, -1))}

# CPU: windows per forward so that a batch holds about this many pixels; measured on 2 cores
# with UNet-S5-D16 (benchmarks/bench_inference.py): larger batches stop paying before this.
CPU_BATCH_PIXELS = 1 << 16
MAX_WINDOW_BATCH = 1024
# Any device: at most this many pixels per forward, so that activations of up to 256 channels
# stay under 2**31 elements (PyTorch's channels-last upsampling, for one, refuses more; seen on
# an H100 with 294 HRF windows of 256x256 in one batch).
MAX_BATCH_PIXELS = 1 << 23
# CPU: the most bytes the working buffers of one pass (cut-out windows, their logits, the
# aggregate and a normalised copy of the input) may take; larger images stream in bands of
# window rows, so CPU memory stays at about input + outputs + this + one window batch's
# activations, whatever the image size (see InferenceEngine, max_buffer_bytes).
CPU_MAX_BUFFER_BYTES = 1 << 30
# CUDA: the most bytes one window batch's activations may take unless window_batch says
# otherwise. Larger batches stop paying long before: on an H100, HRF's 256x256 bf16 windows take
# about 78 MB each (8.09 GiB peak at 98 windows per batch), so 2 GiB keeps HRF inference under
# 4 GB (issue 5) with batches of about 27 windows (1.8 M pixels per forward); DRIVE's 182 windows
# of 64x64 still fit in one batch. benchmarks/bench_inference.py sweeps the batch to check it.
CUDA_MAX_ACTIVATION_BYTES = 2 << 30
# CUDA graphs kept at once (each holds the activation memory of its batch shape)
MAX_CUDA_GRAPHS = 4


def _available_bytes(device):
    """Memory that new allocations may take on this device now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _deterministic_bytes(device):
    """The memory budget of deterministic mode: the device's total memory less what is
    allocated (on the CPU: unbounded; CPU_MAX_BUFFER_BYTES or max_buffer_bytes caps it)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total - torch.cuda.memory_allocated(device)
    return float("inf")


class _GraphedCall:
    """A window call replayed from a CUDA graph for one fixed batch shape."""

    def __init__(self, call, example):
        self.static_in = example.clone()
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (cuDNN picks its algorithms)
                call(self.static_in)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = call(self.static_in)

    def __call__(self, x):
        b = x.shape[0]
        self.static_in[:b].copy_(x)  # rows beyond b keep stale windows; their outputs are unused
        self.graph.replay()
        return self.static_out[:b]


class InferenceEngine:
    """Runs a window function over whole images (see the module docstring for the modes).

    fn: normalised windows (B, 3, h, w) -> logits (B, C, h, w), on the images' device.
    crop_size, stride: slide window and step (int or (h, w)); required for mode="slide".
    tile_size, margin: overlap-tile input tile (a multiple of size_divisor) and context margin.
    size_divisor: what the model's input extents must be a multiple of (16 for UNet-S5-D16).
    window_batch: windows per forward; None sizes it from free memory (CUDA: bytes per window
        measured with two probe forwards, one batch's activations at most
        CUDA_MAX_ACTIVATION_BYTES = 2 GiB; CPU: about CPU_BATCH_PIXELS pixels per batch).
    precision: "fp32", "fp16" or "bf16" (autocast around fn); the aggregation runs in float32.
    channels_last: hand fn channels-last windows (convert the model too, for speed).
    gaussian: weight each window's pixels by ``ops.gaussian_weight`` (sigma = window/8) instead
        of the uniform average (slide / overlap-tile; changes results, off by default).
    tta: None, "h", "v" or "hv" (True = "hv"): also run flipped windows and average the
        un-flipped logits (same window grid, so the result is exactly flip-equivariant where the
        grid is symmetric).
    output_device: where results go; None: the images' device, or the CPU when the image's
        logits do not fit in the device's free memory (then window rows stream in bands).
    band_rows: window rows per band (None: all of them if memory allows). Mostly for testing.
    cuda_graphs: replay fn from a CUDA graph per window-batch shape (CUDA only; fn must be
        capturable: no host syncs; a failed capture warns and runs eagerly). None (default,
        "auto"): capture a shape when it comes back (a second image of the same size), so
        one-off sizes pay nothing; True: capture at once; False: never. On an H100 it gave 1.6x
        (DRIVE slide fp32) and 1.4-1.5x (overlap-tile / whole bf16); up to MAX_CUDA_GRAPHS are
        kept, each holding its batch's activation memory.
    state_version: optional callable returning a hashable summary of the weights fn uses
        (e.g. parameter versions); captured CUDA graphs replay the weights of their capture, so
        they are dropped whenever it changes (the segmentor passes one).
    compile: wrap fn in torch.compile(dynamic=False) (first call compiles; off by default).
    memory_fraction: share of the free memory the engine plans to use.
    max_buffer_bytes: cap on the working buffers of one pass (windows, window logits, the float
        aggregate, a normalised copy of the input); an image whose buffers exceed it streams in
        bands of window rows that each stay under it. None: CPU_MAX_BUFFER_BYTES (1 GiB) on the
        CPU, free memory only on CUDA. Peak memory is then about: the input + the outputs asked
        for (labels 1 byte per pixel, probabilities 4 per class) + max_buffer_bytes + the
        activations of one window batch.

    On the CPU, when only copies of an image's aggregate are returned (labels with probs, a
    prob_class, a padded canvas cropped back), the aggregate's buffer stays with the engine
    between calls and the next image of the same size reuses it; a result never aliases it.
    """

    def __init__(self, fn, mode="slide", crop_size=None, stride=None, *, tile_size=1024,
                 margin=32, size_divisor=16, window_batch=None, precision="fp32",
                 channels_last=False, gaussian=False, tta=None, output_device=None,
                 band_rows=None, cuda_graphs=None, compile=False, memory_fraction=0.7,
                 max_buffer_bytes=None, state_version=None):
        if not callable(fn):
            raise TypeError(f"fn must be a callable mapping windows to logits, got {type(fn)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.mode = mode
        self.size_divisor = int(size_divisor) if size_divisor else 1
        if mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("mode='slide' needs crop_size and stride (e.g. the config's "
                                 "test_cfg: 64 and 42 for DRIVE)")
            self.crop_size = pair(crop_size, "crop_size")
            self.stride = pair(stride, "stride")
            if any(c % self.size_divisor for c in self.crop_size):
                raise ValueError(f"crop_size {self.crop_size} must be a multiple of size_divisor "
                                 f"{self.size_divisor} (the model's input constraint)")
        if mode == "overlap-tile":
            if int(margin) < 0:
                raise ValueError(f"margin must be >= 0, got {margin}")
            if tile_size % self.size_divisor or tile_size <= 2 * margin:
                raise ValueError(f"tile_size {tile_size} must be a multiple of size_divisor "
                                 f"{self.size_divisor} and larger than 2 * margin ({2 * margin})")
        self.tile_size, self.margin = int(tile_size), int(margin)
        if window_batch is not None and int(window_batch) < 1:
            raise ValueError(f"window_batch must be >= 1 (or None for automatic), "
                             f"got {window_batch}")
        self.window_batch = None if window_batch is None else int(window_batch)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.gaussian = bool(gaussian)
        if tta is True:
            tta = "hv"
        if tta not in (None, False, "", *TTA_FLIPS):
            raise ValueError(f"tta must be None, 'h', 'v', 'hv' or True, got {tta!r}")
        self.tta = tta or None
        self.output_device = None if output_device is None else torch.device(output_device)
        if band_rows is not None and int(band_rows) < 1:
            raise ValueError(f"band_rows must be >= 1, got {band_rows}")
        self.band_rows = None if band_rows is None else int(band_rows)
        if cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be None (auto), True or False, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.memory_fraction = float(memory_fraction)
        if max_buffer_bytes is not None and int(max_buffer_bytes) < 1:
            raise ValueError(f"max_buffer_bytes must be positive (or None), got {max_buffer_bytes}")
        self.max_buffer_bytes = None if max_buffer_bytes is None else int(max_buffer_bytes)
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self._probes = {}   # (device, window, dtype) -> (classes, bytes per window, fixed bytes)
        self._graphs = {}   # (device, batch shape, dtype) -> _GraphedCall, LRU order
        self._shapes_seen = set()
        self.state_version = state_version
        self._graph_version = None  # state_version() when the kept graphs were captured
        self.last_schedule = None  # what the last call chose: window batch, bands, output device
        self._out_buffers = {}  # (shape, dtype, device) -> the CPU aggregate reused across calls

    # ------------------------------------------------------------------ geometry
    def plan(self, height, width):
        """The TilePlan of an image of this size."""
        d = self.size_divisor
        if self.mode == "slide":
            y = slide_axis(height, self.crop_size[0], self.stride[0], d)
            x = slide_axis(width, self.crop_size[1], self.stride[1], d)
            return TilePlan("slide", y, x, "constant")
        if self.mode == "whole":
            return TilePlan("whole", whole_axis(height, d), whole_axis(width, d), "reflect")
        y = overlap_axis(height, self.tile_size, self.margin, d)
        x = overlap_axis(width, self.tile_size, self.margin, d)
        return TilePlan("overlap-tile", y, x, "reflect")

    # ------------------------------------------------------------------ running fn
    def _call(self, windows):
        """fn on one batch of windows, with layout, precision and flip TTA applied."""
        if self.channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(windows.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None, cache_enabled=False):
            if self.tta is None:
                return self.fn(windows)
            flips = TTA_FLIPS[self.tta]
            batch = torch.cat([windows] + [windows.flip(dims) for dims in flips])
            outs = self.fn(batch).float().chunk(len(flips) + 1)
            total = outs[0].clone()
            for out, dims in zip(outs[1:], flips):
                total += out.flip(dims)
            return total / (len(flips) + 1)

    def _batch_call(self, windows):
        if self.cuda_graphs is False or not windows.is_cuda:
            return self._call(windows)
        if self.state_version is not None:
            version = self.state_version()
            if version != self._graph_version:  # weights changed since capture: recapture
                self._graphs.clear()
                self._graph_version = version
        key = (windows.device, tuple(windows.shape), windows.dtype)
        graphed = self._graphs.pop(key, None)
        if graphed is None:
            if self.cuda_graphs is None and key not in self._shapes_seen:
                # auto: a shape seen once may never come back; capture it when it repeats
                self._shapes_seen.add(key)
                return self._call(windows)
            try:
                graphed = _GraphedCall(self._call, windows)
            except Exception as exc:  # capture is best-effort: never worse than eager
                warnings.warn(f"fastunet: CUDA graph capture failed ({type(exc).__name__}: "
                              f"{exc}); running the window function eagerly", RuntimeWarning,
                              stacklevel=3)
                self.cuda_graphs = False
                return self._call(windows)
            while len(self._graphs) >= MAX_CUDA_GRAPHS:  # drop the least recently used
                self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = graphed  # (re)inserted last: most recently used
        return graphed(windows)

    def _probe(self, one, plan):
        """Classes, and on CUDA the activation memory of fn per window (two probe forwards).
        ``one``: a (1, C, window h, window w) normalised window."""
        th, tw = plan.y.window, plan.x.window
        x = one
        key = (x.device, th, tw, x.dtype, x.shape[1])
        if key in self._probes:
            return self._probes[key]
        cuda = x.is_cuda
        peaks = []
        for b in ((1, 2) if cuda else (1,)):
            if cuda:
                torch.cuda.synchronize(x.device)
                torch.cuda.reset_peak_memory_stats(x.device)
                base = torch.cuda.memory_allocated(x.device)
            out = self._call(one.expand(b, -1, -1, -1).contiguous())
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(x.device) - base)
            if not (isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[0] == b
                    and tuple(out.shape[2:]) == (th, tw)):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the window function must return logits of shape "
                                 f"({b}, C, {th}, {tw}) for {b} windows of {th}x{tw}; got {got} "
                                 f"(resize to the window inside it, as encode_decode does)")
            classes = out.shape[1]
            del out
        if cuda:
            per_window = max(peaks[1] - peaks[0], 1)
            fixed = max(peaks[0] - per_window, 0)
        else:  # not measurable on the CPU allocator; only the pixel budget is used there
            per_window, fixed = 0, 0
        self._probes[key] = (classes, per_window, fixed)
        return self._probes[key]

    # ------------------------------------------------------------------ memory planning
    def _schedule(self, x, plan, batch_images, classes, per_window, fixed, out_bytes=None,
                  input_copy=True):
        """(window batch, window rows per band, output device, planned buffer bytes) for this
        image batch.

        x: a normalised window (device, channels, dtype); out_bytes: the final outputs' bytes
        (default: float logits); input_copy: whether one pass makes a normalised/padded copy of
        the whole input."""
        device = x.device
        n = batch_images
        total_windows = n * plan.windows_per_image
        budget = self.memory_fraction * _available_bytes(device)
        if runtime.is_deterministic():
            # a plan that does not depend on what happens to be free: the same windows in the
            # same batches (cuDNN picks algorithms per batch shape) and the same bands
            budget = self.memory_fraction * _deterministic_bytes(device)
        cap = self.max_buffer_bytes
        if cap is None and device.type != "cuda":
            cap = CPU_MAX_BUFFER_BYTES
        per_row, overhang = band_bytes(plan, n, x.shape[1], classes)
        agg_bytes = n * classes * plan.y.canvas * plan.x.canvas * 4
        if out_bytes is None:
            out_bytes = agg_bytes
        all_rows = plan.y.count
        out_dev = self.output_device
        # one pass: the input copy, all windows and their logits, the float aggregate
        padded_w = plan.x.size + plan.x.pad_before + plan.x.pad_after
        padded_h = plan.y.size + plan.y.pad_before + plan.y.pad_after
        in_bytes = n * x.shape[1] * padded_h * padded_w * 4 * 2 if input_copy else 0
        window_bytes = total_windows * (x.shape[1] * plan.y.window * plan.x.window
                                        + classes * plan.y.tile * plan.x.tile) * 4
        buffers = in_bytes + window_bytes + agg_bytes
        # Activations get what the buffers leave, but at least half of the budget.
        act_budget = max(budget - buffers, budget / 2) if device.type == "cuda" else 0
        if self.window_batch is not None:
            batch = self.window_batch
        elif device.type == "cuda":
            act_budget = min(act_budget, fixed + CUDA_MAX_ACTIVATION_BYTES)
            batch = int((act_budget - fixed) // per_window) if act_budget > fixed else 1
        else:
            batch = CPU_BATCH_PIXELS // (plan.y.window * plan.x.window)
        batch = min(batch, MAX_BATCH_PIXELS // (plan.y.window * plan.x.window))
        batch = max(1, min(batch, total_windows, MAX_WINDOW_BATCH))
        batch = -(-total_windows // -(-total_windows // batch))  # balance: no tiny last batch
        if device.type == "cuda":
            budget -= fixed + batch * per_window
        limit = budget if cap is None else min(budget, cap)
        if self.band_rows is not None:
            rows = self.band_rows
        elif buffers + (out_bytes if device.type == "cuda" else 0) <= limit:
            rows = all_rows
        else:
            if out_dev is None:
                out_dev = (device if device.type != "cuda" or out_bytes <= budget / 2
                           else torch.device("cpu"))
            left = limit - overhang - (out_bytes if out_dev == device and device.type == "cuda"
                                       else 0)
            rows = max(1, int(left // per_row))
            rows = min(rows, all_rows - 1) if all_rows > 1 else rows
        rows = min(rows, all_rows)
        planned = buffers if rows >= all_rows else overhang + rows * per_row
        return batch, rows, out_dev or device, planned

    # ------------------------------------------------------------------ the pipeline
    def _window_logits(self, windows, plan, classes, batch):
        """fn over all windows in batches -> (T, C, tile_h, tile_w) float32 (margins cropped)."""
        total = windows.shape[0]
        m_y, m_x, th, tw = plan.y.margin, plan.x.margin, plan.y.tile, plan.x.tile
        logits = torch.empty((total, classes, th, tw), device=windows.device, dtype=torch.float32)
        for k in range(0, total, batch):
            chunk = windows[k:k + batch]
            # Every forward gets the same batch shape (the last one padded, wasting fewer
            # windows than there are batches): oneDNN and cuDNN then plan one shape, and a
            # CUDA graph can replay it.
            if chunk.shape[0] < batch:
                pad = chunk.new_zeros((batch - chunk.shape[0],) + tuple(chunk.shape[1:]))
                out = self._batch_call(torch.cat([chunk, pad]))[:chunk.shape[0]]
            else:
                out = self._batch_call(chunk)
            logits[k:k + chunk.shape[0]].copy_(out[:, :, m_y:m_y + th, m_x:m_x + tw])
        return logits

    def __call__(self, images, output="logits", *, normalize=None, prob_class=None):
        """Images (N, C, H, W) -> logits (N, C', H, W) float32, probs (softmax over C', float32)
        or labels (uint8 (N, H, W)), on ``output_device`` (default: the images' device).

        images: normalised float; or raw pixels (e.g. a uint8 view of an HxWx3 array) with
        ``normalize=(mean, std)``, normalised band by band, so no float copy of a large image is
        ever made. output: one kind, or a tuple of kinds (returns a tuple, from one run).
        prob_class: with "probs", return only that class's probability (N, H, W).
        """
        outputs = (output,) if isinstance(output, str) else tuple(output)
        if not outputs or any(not isinstance(o, str) or o not in OUTPUTS for o in outputs):
            raise ValueError(f"output must be one of {tuple(OUTPUTS)} or a tuple of them, got "
                             f"{output!r}")
        if not (isinstance(images, torch.Tensor) and images.dim() == 4
                and (images.is_floating_point() or normalize is not None)
                and images.dtype != torch.bool and not images.is_complex()):
            desc = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                    if isinstance(images, torch.Tensor) else type(images).__name__)
            raise ValueError(f"images must be a normalised float tensor (N, C, H, W) (or raw "
                             f"pixels with normalize=(mean, std)), got {desc}")
        n, c, height, width = images.shape
        if n == 0 or c == 0 or height == 0 or width == 0:
            raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
        prep = normalizer(normalize, c, images.device)
        plan = self.plan(height, width)
        with torch.no_grad():
            one = input_rows(images[:1], plan, 0, plan.y.window, prep)
            one = one[..., :plan.x.window].contiguous()
            classes, per_window, fixed = self._probe(one, plan)
            if prob_class is not None and not (isinstance(prob_class, int)
                                               and 0 <= prob_class < classes):
                raise ValueError(f"prob_class must be a class index in 0..{classes - 1}, got "
                                 f"{prob_class!r}")
            out_bytes = sum(n * height * width * (1 if kind == "labels" else 4 * (
                1 if kind == "probs" and prob_class is not None else classes))
                for kind in outputs)
            needs_copy = normalize is not None or any(
                (a.pad_before or a.pad_after) for a in (plan.y, plan.x))
            batch, rows, out_dev, planned = self._schedule(one, plan, n, classes, per_window,
                                                           fixed, out_bytes, needs_copy)
            del one
            self.last_schedule = {"window_batch": batch, "band_rows": rows,
                                  "window_rows": plan.y.count, "output_device": str(out_dev),
                                  "buffer_bytes": planned}
            weight = None
            if self.gaussian and plan.windows_per_image > 1:
                weight = ops.gaussian_weight((plan.y.tile, plan.x.tile), device=images.device)
            window = (plan.y.window, plan.x.window)
            stride = (plan.y.stride, plan.x.stride)
            if rows >= plan.y.count:
                x = pad(prep(images), plan)
                windows = ops.tile_extract(x, window, stride)
                del x
                logits = self._window_logits(windows, plan, classes, batch)
                del windows
                fused = len(outputs) == 1 and prob_class is None
                epilogue = OUTPUTS[outputs[0]] if fused else "none"
                # the aggregate goes into a reused buffer when only copies of it reach the caller
                consumed = ((plan.y.canvas, plan.x.canvas) != (height, width)
                            or torch.device(out_dev) != logits.device
                            or (not fused and "logits" not in outputs))
                key, out = self._take_buffer(logits, n, plan, epilogue) if consumed else (0, None)
                avg = ops.tile_aggregate(logits, n, plan.y.canvas, plan.x.canvas, stride,
                                         weight=weight, epilogue=epilogue, out=out)
                results = [avg] if fused else [finish(avg, kind, prob_class) for kind in outputs]
                del avg, logits
                results = [r.to(out_dev) for r in results]
                results = [r[..., :height, :width].contiguous()
                           if r.shape[-2:] != (height, width) else r for r in results]
                if out is not None:  # only copies of it are in results: the next call may reuse it
                    self._out_buffers[key] = out
            else:
                results = self._streamed(images, plan, classes, batch, rows, out_dev, weight,
                                         outputs, prep, prob_class)
        return results[0] if isinstance(output, str) else tuple(results)

    def _take_buffer(self, logits, n, plan, epilogue):
        """(key, CPU output for tile_aggregate): the one the last call of this size gave back
        (one image size after another: a folder, an evaluation set), else a new one. A fresh
        output costs its page faults on every call, as much as the aggregation itself for an HRF
        image. Taken out of the engine while in use (dict.pop is atomic), so concurrent calls
        never share one. (key, None) on CUDA, whose caching allocator already recycles memory."""
        if logits.device.type != "cpu":
            return None, None
        if epilogue == "argmax":
            shape, dtype = (n, plan.y.canvas, plan.x.canvas), torch.uint8
        else:
            shape, dtype = (n, logits.shape[1], plan.y.canvas, plan.x.canvas), logits.dtype
        key = (shape, dtype, logits.device)
        out = self._out_buffers.pop(key, None)
        if out is None:
            self._out_buffers.clear()  # another size's buffer: let it go first
            out = torch.empty(shape, dtype=dtype, device=logits.device)
        return key, out

    def _streamed(self, src, plan, classes, batch, rows, out_dev, weight, outputs, prep,
                  prob_class):
        """Bands of `rows` window rows, normalised from ``src`` band by band. A band's window
        sums are added to the sums carried over from the band above; rows no later window
        touches are then final: divided by their coverage, turned into the outputs and written
        out. So only one band of sums is ever held, whatever the image height."""
        n = src.shape[0]
        height, width = plan.y.size, plan.x.size
        device = src.device
        window = (plan.y.window, plan.x.window)
        stride = (plan.y.stride, plan.x.stride)
        results = []
        for kind in outputs:
            if kind == "labels":
                shape, dtype = (n, height, width), torch.uint8
            elif kind == "probs" and prob_class is not None:
                shape, dtype = (n, height, width), torch.float32
            else:
                shape, dtype = (n, classes, height, width), torch.float32
            results.append(torch.empty(shape, dtype=dtype, device=out_dev))
        if weight is None:  # coverage in closed form: window counts per row times per column
            cy = torch.zeros(plan.y.canvas, device=device)
            for i in range(plan.y.count):
                cy[plan.y.start(i):plan.y.start(i) + plan.y.tile] += 1
            cx = torch.zeros(plan.x.canvas, device=device)
            for j in range(plan.x.count):
                cx[plan.x.start(j):plan.x.start(j) + plan.x.tile] += 1
        carried = carried_w = None
        for i0 in range(0, plan.y.count, rows):
            i1 = min(i0 + rows, plan.y.count) - 1
            top, bottom = plan.y.start(i0), plan.y.start(i1)
            band_h = bottom - top + plan.y.tile
            x = input_rows(src, plan, top, bottom + plan.y.window, prep)
            windows = ops.tile_extract(x, window, stride)
            del x
            logits = self._window_logits(windows, plan, classes, batch)
            del windows
            part = ops.tile_aggregate(logits, n, band_h, plan.x.canvas, stride, weight=weight,
                                      normalize=False)
            del logits
            if weight is not None:  # the summed window weights, carried the same way
                count = (i1 - i0 + 1) * plan.x.count
                ones = torch.ones((count, 1, plan.y.tile, plan.x.tile), device=device)
                wpart = ops.tile_aggregate(ones, 1, band_h, plan.x.canvas, stride,
                                           weight=weight, normalize=False)[0, 0]
                del ones
            if carried is not None:  # sums for rows [top, top + k) from the band above
                k = carried.shape[2]
                part[:, :, :k] += carried
                if weight is not None:
                    wpart[:k] += carried_w
            last = i1 == plan.y.count - 1
            done = band_h if last else plan.y.start(i1 + 1) - top
            norm = (cy[top:top + done, None] * cx[None, :] if weight is None else wpart[:done])
            # in place; where nothing is covered the sum is 0 and stays 0
            avg = part[:, :, :done].div_(norm.clamp_min_(torch.finfo(norm.dtype).tiny))
            keep = min(done, height - top)
            if keep > 0:
                avg = avg[:, :, :keep, :width]
                for kind, res in zip(outputs, results):
                    res[..., top:top + keep, :].copy_(finish(avg, kind, prob_class))
            del avg, norm
            carried = None if last else part[:, :, done:].clone()
            if weight is not None:
                carried_w = None if last else wpart[done:].clone()
            del part
        return results


def infer(fn, images, mode="slide", crop_size=None, stride=None, output="logits", **options):
    """One-off ``InferenceEngine(fn, mode, crop_size, stride, **options)(images, output)``."""
    return InferenceEngine(fn, mode, crop_size, stride, **options)(images, output)


def reference_slide_inference(fn, images, crop_size, stride):
    """mmseg's ``slide_inference`` verbatim (SPEC §1): one window per forward, each padded to
    the full image and added. The faithful, slow baseline of the tests and benchmarks."""
    h_crop, w_crop = pair(crop_size, "crop_size")
    h_stride, w_stride = pair(stride, "stride")
    batch_size, _, h_img, w_img = images.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = None
    count_mat = images.new_zeros((batch_size, 1, h_img, w_img))
    with torch.no_grad():
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1 = h_idx * h_stride
                x1 = w_idx * w_stride
                y2 = min(y1 + h_crop, h_img)
                x2 = min(x1 + w_crop, w_img)
                y1 = max(y2 - h_crop, 0)
                x1 = max(x2 - w_crop, 0)
                crop_seg_logit = fn(images[:, :, y1:y2, x1:x2])
                if preds is None:
                    preds = images.new_zeros((batch_size, crop_seg_logit.shape[1], h_img, w_img))
                preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1),
                                                int(preds.shape[2] - y2)))
                count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


__all__ = ["MODES", "PRECISIONS", "OUTPUTS", "AxisPlan", "TilePlan", "InferenceEngine", "coverage",
           "infer", "reference_slide_inference"]

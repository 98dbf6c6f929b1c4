"""The engine's schedule for one call: windows per forward, window rows per pass, where outputs go.

``schedule`` is a pure function of the image's window geometry (a ``TilePlan``), what the window
function costs (a ``Footprint``, measured once per window shape by the engine's probe) and the
device's memory (a ``Budget``), so each decision can be checked without a model or a device.

Window batch:

- CUDA: as many windows as the free memory allows, one batch's activations capped at
  ``CUDA_MAX_ACTIVATION_BYTES`` (larger batches stop paying long before: see that constant).
- CPU: sized for the caches, not for the free memory. Two terms, the larger wins:
  the windows whose largest single op (inputs + output) fits in the last-level cache together
  (past that, every layer streams its activations through DRAM), and enough windows that the
  bytes every forward reads whatever its batch (the weights) stay under 1/``CPU_FIXED_SHARE``
  of the bytes the windows themselves move (the weights cost more than their bytes).
  benchmarks/bench_inference.py (``test_cpu_window_batch_sweep``) measures the best batch per
  window size and model width against what this rule picks.
- Any device: at most ``MAX_BATCH_PIXELS`` pixels and ``MAX_WINDOW_BATCH`` windows per forward,
  and the windows spread evenly over the forwards (no tiny last batch).

Bands: an image whose working buffers (input copy, windows, their logits, the float aggregate)
exceed the budget (or, on the CPU, ``max_buffer_bytes``) is processed in bands of window rows
(see ``InferenceEngine``); otherwise in one pass.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .geometry import band_bytes

MAX_WINDOW_BATCH = 1024
# Any device: at most this many pixels per forward, so that activations of up to 256 channels
# stay under 2**31 elements (PyTorch's channels-last upsampling, for one, refuses more; seen on
# an H100 with 294 HRF windows of 256x256 in one batch).
MAX_BATCH_PIXELS = 1 << 23
# CUDA: the most bytes one window batch's activations may take unless window_batch says
# otherwise. Larger batches stop paying long before: benchmarks/bench_inference.py sweeps the
# HRF batch against peak memory; 2 GiB keeps HRF slide inference under 4 GB.
CUDA_MAX_ACTIVATION_BYTES = 2 << 30
# CPU: the weight bytes every forward reads are kept under 1/CPU_FIXED_SHARE of the bytes its
# windows move. A forward costs more per weight byte than per activation byte (Winograd
# transforms the weights per forward, and the deepest, most weighted layers have the fewest
# pixels per window), so the share is small; the value fits the best batches measured for
# window sizes 64-256 and model widths 16 and 64 (benchmarks/bench_inference.py).
CPU_FIXED_SHARE = 32
# CPU: the last-level cache size assumed where the system does not say
DEFAULT_CACHE_BYTES = 16 << 20


@dataclass(frozen=True)
class Footprint:
    """What the window function costs per forward (the engine's probe measures it)."""

    classes: int             # logit channels
    window_bytes: int = 0    # CUDA: activation memory per window in a batch
    fixed_bytes: int = 0     # CUDA: activation memory of a forward whatever its batch
    window_traffic: int = 0  # CPU: bytes all ops read and write per window
    fixed_traffic: int = 0   # CPU: bytes a forward reads whatever its batch (weights)
    largest_op: int = 0      # CPU: per-window bytes (inputs + outputs) of the largest op


@dataclass(frozen=True)
class Budget:
    """The memory one call may plan with."""

    device: torch.device
    free_bytes: float               # working buffers + activations (+ outputs on CUDA)
    buffer_cap: Optional[int]       # cap on one pass's working buffers (None: free_bytes)
    cache_bytes: int = DEFAULT_CACHE_BYTES  # CPU: last-level cache


@dataclass(frozen=True)
class Schedule:
    """How one call runs: ``window_batch`` windows per forward, ``band_rows`` of the image's
    ``window_rows`` window rows per pass (all of them: one pass), outputs on
    ``output_device``; ``buffer_bytes``: the working buffers one pass is planned to hold."""

    window_batch: int
    band_rows: int
    window_rows: int
    output_device: torch.device
    buffer_bytes: int
    pad_last_batch: bool  # every forward gets the same batch shape (CUDA graphs, cuDNN plans)

    @property
    def streamed(self):
        return self.band_rows < self.window_rows


def schedule(tiles, images, channels, footprint, budget, *, out_bytes=None, input_copy=True,
             window_batch=None, band_rows=None, output_device=None):
    """The Schedule of ``images`` images of ``channels`` channels cut as ``tiles`` says.

    out_bytes: bytes of the outputs asked for (default: float logits); input_copy: whether a
    pass makes a normalised or padded copy of the input; window_batch, band_rows,
    output_device: the caller's choices (None: planned)."""
    cuda = budget.device.type == "cuda"
    total = images * tiles.windows_per_image
    classes = footprint.classes
    agg_bytes = images * classes * tiles.y.canvas * tiles.x.canvas * 4
    out_bytes = agg_bytes if out_bytes is None else out_bytes
    padded_h = tiles.y.size + tiles.y.pad_before + tiles.y.pad_after
    padded_w = tiles.x.size + tiles.x.pad_before + tiles.x.pad_after
    in_bytes = images * channels * padded_h * padded_w * 4 * 2 if input_copy else 0
    window_bytes = total * (channels * tiles.y.window * tiles.x.window
                            + classes * tiles.y.tile * tiles.x.tile) * 4
    buffers = in_bytes + window_bytes + agg_bytes  # one pass: input copy, windows, aggregate
    free = budget.free_bytes
    if window_batch is None:
        window_batch = (_cuda_batch(footprint, free, buffers) if cuda
                        else cpu_batch(footprint, budget.cache_bytes))
    batch = _balanced(window_batch, total, tiles.y.window * tiles.x.window)
    if cuda:
        free -= footprint.fixed_bytes + batch * footprint.window_bytes
    limit = free if budget.buffer_cap is None else min(free, budget.buffer_cap)
    rows, out_dev, planned = _bands(tiles, images, channels, classes, buffers, out_bytes, limit,
                                    free, cuda, budget.device, band_rows, output_device)
    return Schedule(batch, rows, tiles.y.count, out_dev, planned, pad_last_batch=cuda)


def _cuda_batch(footprint, free, buffers):
    """Windows whose activations fit what the buffers leave (at least half of the budget),
    capped at CUDA_MAX_ACTIVATION_BYTES."""
    fixed, per_window = footprint.fixed_bytes, max(footprint.window_bytes, 1)
    act_budget = min(max(free - buffers, free / 2), fixed + CUDA_MAX_ACTIVATION_BYTES)
    return int((act_budget - fixed) // per_window) if act_budget > fixed else 1


def cpu_batch(footprint, cache_bytes):
    """CPU windows per forward: the larger of the windows whose largest op fits in the cache
    together and the windows that make the weights a 1/CPU_FIXED_SHARE share of the traffic
    (unmeasured footprints: as many as the caps allow)."""
    in_cache = cache_bytes // max(footprint.largest_op, 1)
    amortised = math.ceil(CPU_FIXED_SHARE * footprint.fixed_traffic
                          / max(footprint.window_traffic, 1))
    return max(1, in_cache, amortised)


def _balanced(batch, total, window_pixels):
    """The batch within the per-forward caps, evened out over the forwards it takes."""
    batch = min(batch, MAX_BATCH_PIXELS // window_pixels)
    batch = max(1, min(batch, total, MAX_WINDOW_BATCH))
    return -(-total // -(-total // batch))


def _bands(tiles, images, channels, classes, buffers, out_bytes, limit, free, cuda, device,
           band_rows, output_device):
    """(window rows per pass, output device, planned buffer bytes): one pass when its buffers
    (and on CUDA its outputs) fit the limit, else as many rows per band as fit."""
    all_rows = tiles.y.count
    per_row, overhang = band_bytes(tiles, images, channels, classes)
    out_dev = output_device
    if band_rows is not None:
        rows = band_rows
    elif buffers + (out_bytes if cuda else 0) <= limit:
        rows = all_rows
    else:
        if out_dev is None:  # outputs that would crowd the GPU go to the CPU
            out_dev = device if not cuda or out_bytes <= free / 2 else torch.device("cpu")
        left = limit - overhang - (out_bytes if cuda and out_dev == device else 0)
        rows = max(1, int(left // per_row))
        rows = min(rows, all_rows - 1) if all_rows > 1 else rows
    rows = min(rows, all_rows)
    planned = buffers if rows >= all_rows else overhang + rows * per_row
    return rows, torch.device(out_dev or device), planned


def last_level_cache_bytes():
    """The CPU's last-level cache in bytes (Linux sysfs, else sysconf, else
    DEFAULT_CACHE_BYTES): the highest cache level of CPU 0."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = (0, 0)
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, entry, "size")) as f:
                size = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
            best = max(best, (level, int(size.rstrip("KMGkmg")) * scale))
    except (OSError, ValueError):
        pass
    if best[1] > 0:
        return best[1]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size > 0:
            return size
    return DEFAULT_CACHE_BYTES


def _bytes(t):
    return t.numel() * t.element_size()


class TrafficCounter(TorchDispatchMode):
    """Counts, per op, the bytes of its tensor inputs and of the outputs it creates (outputs
    that alias an input, such as views or a no-op ``.to``, are neither: they move nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = []  # bytes per op, in call order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                inputs[_storage(t)] = _bytes(t)
        created = sum(_bytes(t) for t in tree_flatten(out)[0]
                      if isinstance(t, torch.Tensor) and _storage(t) not in inputs)
        if created:
            self.ops.append(sum(inputs.values()) + created)
        return out


def _storage(t):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # opaque tensors (oneDNN's packed weights)
        return id(t)


def cpu_traffic(ops_one, ops_two):
    """(window_traffic, fixed_traffic, largest_op) from the per-op bytes of a one-window and
    a two-window forward: what grows with the batch is per window, the rest is fixed. Where the
    two forwards ran different ops (a batch-dependent choice inside fn), from their totals,
    with the two-window forward's largest op halved. (0, 0, 0) when nothing was counted."""
    if not ops_one or not ops_two:
        return 0, 0, 0
    if len(ops_one) != len(ops_two):
        per_window = max(sum(ops_two) - sum(ops_one), 0)
        return per_window, max(sum(ops_one) - per_window, 0), max(ops_two) // 2
    per_window = [max(b - a, 0) for a, b in zip(ops_one, ops_two)]
    fixed = sum(max(a - p, 0) for a, p in zip(ops_one, per_window))
    return sum(per_window), fixed, max(per_window)

"""End-to-end inference for each published config: the engine's modes vs mmseg's eager loop.

    pytest benchmarks/bench_configs.py --benchmark-only -s            # CPU cases (~3 min, 2 cores)
    pytest benchmarks/bench_configs.py --benchmark-only -s -m cuda    # GPU cases (~1-2 min, H100)

The 12 published configs (FCN / PSPNet / DeepLabV3 heads x DRIVE 584x565 crop 64 stride 42,
STARE 605x700 crop 128 stride 85, CHASE_DB1 960x999 crop 128 stride 85, HRF 2336x3504 crop 256
stride 170), random weights and a random normalised image (speed does not depend on them):

- reference: ``fastunet.ops.tile_reference.slide_inference``, mmseg's loop (one window per forward, each added to
  the full-size logits), on the plain modules (``fused=False``, what FASTUNET_FUSED=0 runs),
  contiguous, fp32, TF32 off;
- ours: ``InferenceEngine`` (as ``model.inference`` uses it) on the fused (``fastunet.fuse``)
  channels-last model, in modes ``slide`` (exact: logits checked against the reference),
  ``overlap-tile`` and ``whole`` (how often the labels agree with the reference is recorded).

GPU: whole images; slide in fp32 (TF32 off, as the reference) and bf16, overlap-tile and whole in
bf16; CUDA graphs as the engine's default (captured when an image size repeats).

CPU (2 cores: a full HRF slide image is ~30 TFLOP, minutes): slide only, fp32. Our images/s are
timed on whole images for DRIVE and derived elsewhere from one window batch of the engine (the
batch size it uses on the whole image) cut from the top-left corner: images/s = measured
windows/s / the image's exact window count. The reference's per-window time is measured on a few
windows (4 of 64x64, else 1; best of 2) and scaled the same way. Derived figures carry
``derived=True`` (``reference_derived=True`` for the reference).
The fast modes on a CPU are in bench_inference.py (DRIVE, FCN, whole images).
"""
import copy
import gc
import math
import time

import pytest
import torch

import _harness
import fastunet
from fastunet.inference import InferenceEngine, planner
from fastunet.ops.tile_reference import slide_inference
from fastunet.training.step import set_fused

DATASETS = {  # name -> (image H, W, crop, stride), mmseg's published test settings
    "drive": (584, 565, 64, 42),
    "stare": (605, 700, 128, 85),
    "chase_db1": (960, 999, 128, 85),
    "hrf": (2336, 3504, 256, 170),
}
TAGS = {"drive": "64x64_40k_drive", "stare": "128x128_40k_stare",
        "chase_db1": "128x128_40k_chase_db1", "hrf": "256x256_40k_hrf"}
HEADS = ("fcn", "pspnet", "deeplabv3")
CPU_FULL_IMAGES = ("drive",)  # datasets whose whole images the CPU suite can afford
REFERENCE = "mmseg slide loop, unfused fp32 eager, one window per forward"


def config_name(head, dataset):
    return f"{head}_unet_s5-d16_{TAGS[dataset]}"


def _cases():
    cases = []
    for dataset in DATASETS:
        for head in HEADS:
            cfg = (head, dataset)
            cases.append(pytest.param("cpu", *cfg, "slide", "fp32",
                                      id=f"cpu-{dataset}-{head}-slide-fp32"))
    for dataset in DATASETS:  # config-major, so each config's models and reference are reused
        for head in HEADS:
            for mode, precision in (("slide", "fp32"), ("slide", "bf16"),
                                    ("overlap-tile", "bf16"), ("whole", "bf16")):
                cases.append(pytest.param("cuda", head, dataset, mode, precision,
                                          id=f"cuda-{dataset}-{head}-{mode}-{precision}",
                                          marks=_harness.CUDA_MARKS))
    return cases


_CACHE = {}  # the last (device, config)'s models and reference, so a config is built once


def _setup(device, head, dataset):
    """(reference model, fused model, image) for a config on a device."""
    key = (device, head, dataset)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = fastunet.build_segmentor(fastunet.get_config(config_name(head, dataset))).eval()
        reference = copy.deepcopy(model)
        set_fused(reference, False)
        fast = fastunet.fuse(model).to(memory_format=torch.channels_last)
        height, width = DATASETS[dataset][:2]
        image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        _CACHE.update(key=key, reference=reference.to(device), fast=fast.to(device),
                      image=image.to(device))
    return _CACHE["reference"], _CACHE["fast"], _CACHE["image"]


def _subset(image, crop, stride, rows, cols):
    """The top-left part of an image holding rows x cols slide windows."""
    return image[:, :, :crop + (rows - 1) * stride, :crop + (cols - 1) * stride]


def _reference(device, model, image, crop, stride, windows_per_image):
    """The reference's seconds per image, its logits, the part of the image they cover, how it
    was measured, and its GPU memory: whole images on a GPU (best of 2; HRF once), the first
    windows of the top row on the CPU (best of 2). Measured once per config (cached)."""
    if "ref" in _CACHE:
        return _CACHE["ref"]
    cuda = device == "cuda"
    cols = windows_per_image if cuda else (4 if crop == 64 else 1)
    part = image if cuda else _subset(image, crop, stride, 1, cols)
    best = float("inf")
    with torch.no_grad(), _harness._tf32(False):
        model.encode_decode(image[:, :, :crop, :crop])  # warm-up: plans for the window shape
        with _harness.PeakMemory(device) as mem:
            for _ in range(1 if cuda and crop == 256 else 2):
                _harness.sync(device)
                start = time.perf_counter()
                logits = slide_inference(model.encode_decode, part, crop, stride)
                _harness.sync(device)
                best = min(best, time.perf_counter() - start)
    _CACHE["ref"] = dict(seconds=best if cuda else best / cols * windows_per_image,
                         logits=logits, part=part, memory=mem.bytes if cuda else None,
                         derived_from=None if cuda else
                         f"{cols} window(s) of {crop}x{crop}, best of 2")
    return _CACHE["ref"]


@pytest.mark.parametrize("device, head, dataset, mode, precision", _cases())
def test_inference(benchmark, machine_peaks, device, head, dataset, mode, precision):
    height, width, crop, stride = DATASETS[dataset]
    config = config_name(head, dataset)
    if device == "cuda":  # engines of earlier cases hold CUDA graph pools until collected
        gc.collect()
        torch.cuda.empty_cache()
    ref_model, model, image = _setup(device, head, dataset)
    options = dict(channels_last=True, precision=precision,
                   size_divisor=getattr(model.backbone, "downsample_rate", 16))
    engine = InferenceEngine(model.encode_decode, mode, *((crop, stride) if mode == "slide"
                                                          else ()), **options)
    plan = engine.plan(height, width)
    ref_plan = InferenceEngine(model.encode_decode, "slide", crop, stride).plan(height, width)
    ref = _reference(device, ref_model, image, crop, stride, ref_plan.windows_per_image)
    info = dict(config=config, dataset=dataset, head=head, mode=mode, image=f"{height}x{width}",
                crop=crop, stride=stride, windows_per_image=plan.windows_per_image,
                window=f"{plan.y.window}x{plan.x.window}",
                reference_gflop=_harness.plan_flops(config, ref_plan) / 1e9,
                reference_images_per_s=1 / ref["seconds"])
    if ref["derived_from"]:
        info.update(reference_derived=True, reference_derived_from=ref["derived_from"])
    if ref["memory"] is not None:
        info["reference_peak_memory_GiB"] = ref["memory"] / 2**30

    with torch.no_grad(), _harness._tf32(False):
        if device == "cuda" or dataset in CPU_FULL_IMAGES:
            # CPU: one window batch warms up the same shapes (a whole DRIVE image is ~20 s)
            warmups = [image, image] if device == "cuda" else [_batch_part(engine, image, plan)[0]]
            seconds, memory = _time_images(benchmark, engine, image, device,
                                           _rounds(device, dataset), warmups)
            derived = False
        else:
            seconds, memory = _time_windows(benchmark, engine, image, plan, info)
            derived = True
        info["window_batch"] = engine.last_schedule.window_batch
        out = engine(ref["part"])  # the image (part) the reference ran on
        expected = ref["logits"]
        if mode == "slide" and precision == "fp32":  # exact: the reference's logits
            scale = expected.abs().max().item()
            info["max_rel_error"] = (out - expected).abs().max().item() / scale
        else:  # other modes and precisions change the numbers: how often the labels agree
            info["label_agreement"] = (out.argmax(1) == expected.argmax(1)).float().mean().item()
    info.update(images_per_s=1 / seconds, derived=derived, **memory)
    _harness.record(benchmark, device, seconds=seconds, precision=precision,
                    flops=_harness.plan_flops(config, plan), peaks=machine_peaks(device),
                    reference_s=ref["seconds"], reference=REFERENCE, **info)
    # after recording, so that a failure still leaves the timings in the JSON
    assert info.get("max_rel_error", 0) <= 1e-4, f"slide fp32 differs from the reference: {info}"


def _rounds(device, dataset):
    """Timed whole images: one on the CPU (DRIVE: ~20 s), a few on a GPU (HRF fewer)."""
    if device != "cuda":
        return 1
    return 2 if dataset == "hrf" else 5


def _time_images(benchmark, engine, image, device, rounds, warmups):
    """(seconds per image, memory figures) on whole images: the warm-up images (the engine's
    probe; on a GPU a second image captures the CUDA graph), then the best of `rounds`.
    GPU memory: what inference allocates beyond what was in use before it (CUDA graph pools
    too), over warm-ups and timed images (peak) and over the timed images (steady); CPU: the
    process's peak RSS."""
    with _harness.PeakMemory(device) as first:
        for x in warmups:
            engine(x)
    with _harness.PeakMemory(device) as timed:
        benchmark.pedantic(_harness.synced(lambda: engine(image), device), rounds=rounds,
                           warmup_rounds=0)
    return benchmark.stats.stats.min, _memory(device, first, timed)


def _memory(device, *spans):
    """extra_info memory keys from PeakMemory spans (the first one's base is the baseline)."""
    if any(m.total is None for m in spans):
        return {}
    if device == "cuda":
        return dict(peak_memory_GiB=(max(m.total for m in spans) - spans[0].base) / 2**30,
                    steady_peak_memory_GiB=(spans[-1].total - spans[0].base) / 2**30)
    return dict(peak_rss_GiB=max(m.total for m in spans) / 2**30)


def _batch_part(engine, image, plan):
    """(top-left part of the image, its windows, description): as many slide windows as the
    engine batches at once on the CPU for the whole image (its planner's batch)."""
    crop, stride = plan.y.window, plan.y.stride
    engine(image[:, :, :crop, :crop])  # the probe: what a window of this model costs
    footprint = next(iter(engine._probes.values()))
    batch = planner.cpu_batch(footprint, planner.last_level_cache_bytes())
    batch = max(1, min(batch, plan.windows_per_image))
    cols = min(batch, plan.x.count)
    rows = min(math.ceil(batch / cols), plan.y.count)
    part = _subset(image, crop, stride, rows, cols)
    windows = engine.plan(*part.shape[-2:]).windows_per_image
    return part, windows, f"{windows} windows ({rows}x{cols}, one batch)"


def _time_windows(benchmark, engine, image, plan, info):
    """(seconds per image derived from one window batch, peak bytes over it)."""
    part, windows, what = _batch_part(engine, image, plan)
    engine(part)  # warm-up: the probe, oneDNN plans for the batch shape
    with _harness.PeakMemory("cpu") as mem:
        benchmark.pedantic(lambda: engine(part), rounds=2, warmup_rounds=0)
    seconds = benchmark.stats.stats.min
    info.update(derived_from=f"{what}, best of 2",
                measured_windows_per_s=windows / seconds)
    return seconds / windows * plan.windows_per_image, _memory("cpu", mem)

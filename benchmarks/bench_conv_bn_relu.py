"""Fused vs unfused Conv-BN-ReLU on the CPU: speed, ratios measured in one run (extra_info).

    pytest benchmarks/bench_conv_bn_relu.py --benchmark-only

The network is UNet-S5-D16 + FCN head (fcn_unet_s5-d16_64x64_40k_drive, 64x64 windows): fused
(``fastunet.fuse``) vs the unfused eager model vs the model's convolutions alone (each conv
timed on inputs of its shape: the floor). Shared conventions (benchmarks/_harness.py):
speedup_vs_reference = unfused time / fused time; gflop, tflops and peak_fraction against the
session's measured matmul/conv peak. The GPU counterparts (every layer shape and block variant
in GPU time, the training step) are sections of benchmarks/gpu_run.py.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _harness
from _harness import interleaved_best
import fastunet
from fastunet.training.step import set_fused

REFERENCE = "unfused modules (conv -> BN -> ReLU, FASTUNET_FUSED=0)"


def build_model():
    """(model, name): UNet-S5-D16 + FCN head of the DRIVE config (64x64 windows)."""
    name = "fcn_unet_s5-d16_64x64_40k_drive"
    return fastunet.build_segmentor(fastunet.get_config(name)), name


def conv_only(model, x):
    """A function running each Conv2d of model's forward alone on an input of its shape."""
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append((m, a[0].shape, a[0].dtype)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format
    calls = [(m, torch.randn(s, dtype=dt, device=x.device).contiguous(memory_format=fmt))
             for m, s, dt in shapes]

    def run():
        with torch.no_grad():
            for m, inp in calls:
                F.conv2d(inp, m.weight.to(inp.dtype), None, m.stride, m.padding, m.dilation,
                         m.groups)

    return run


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_inference_unet(benchmark, machine_peaks, layout):
    torch.manual_seed(0)
    model, name = build_model()
    model.eval()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=fmt)
    unfused = set_fused(copy.deepcopy(model), False).eval()
    fused = fastunet.fuse(model)
    with torch.no_grad():
        expected, got = unfused.encode_decode(x), fused.encode_decode(x)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()

    def run():
        with torch.no_grad():
            fused.encode_decode(x)

    def run_unfused():
        with torch.no_grad():
            unfused.encode_decode(x)

    fns = {"fused": run, "unfused": run_unfused, "conv_only": conv_only(unfused, x)}
    for fn in fns.values():
        fn()  # warm-up: oneDNN primitives, fold caches
    best = interleaved_best(fns, 6)
    t_fused, t_unfused, t_conv = best["fused"], best["unfused"], best["conv_only"]
    benchmark.pedantic(run, rounds=2)
    benchmark.extra_info.update(
        model=name, batch=x.shape[0], layout=layout, threads=torch.get_num_threads(),
        fused_s=t_fused, unfused_s=t_unfused, conv_only_s=t_conv,
        fused_vs_unfused=t_fused / t_unfused, fused_vs_conv_only=t_fused / t_conv,
        max_rel_diff=rel)
    _harness.record(benchmark, "cpu", seconds=t_fused, reference_s=t_unfused, reference=REFERENCE,
                    flops=x.shape[0] * _harness.window_flops(name, 64, 64),
                    peaks=machine_peaks("cpu"))

"""Fused vs unfused Conv-BN-ReLU: speed and memory, ratios measured in one run (extra_info).

    pytest benchmarks/bench_conv_bn_relu.py --benchmark-only            # CPU cases here
    pytest benchmarks/bench_conv_bn_relu.py --benchmark-only -m cuda    # the GPU cases

The network is UNet-S5-D16 + FCN head (fcn_unet_s5-d16_64x64_40k_drive, 64x64 windows).
- CPU inference: fused (``fastunet.fuse``) vs the unfused eager model vs the model's
  convolutions alone (each conv timed on inputs of its shape: the floor).
- CUDA training step, AMP bf16, batch 4 and 16: peak activation memory (max_memory_allocated
  over the step minus what is allocated before it: weights, grads, optimizer state) and step
  time, fused vs unfused.
- CUDA inference, fp16/bf16: a fused block vs cuDNN's convolution alone.
Shared conventions (benchmarks/_harness.py): speedup_vs_reference = unfused time / fused time;
gflop, tflops and peak_fraction against the session's measured matmul/conv peak.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _harness
from _harness import best_of, interleaved_best
import fastunet
from fastunet.nn import ConvBNReLU

REFERENCE = "unfused modules (conv -> BN -> ReLU, FASTUNET_FUSED=0)"

HAS_CUDA = torch.cuda.is_available() and fastunet._native.has_cuda_kernels()


def build_model():
    """(model, name): UNet-S5-D16 + FCN head of the DRIVE config (64x64 windows)."""
    name = "fcn_unet_s5-d16_64x64_40k_drive"
    return fastunet.build_segmentor(fastunet.get_config(name)), name


def set_fused(model, fused):
    for m in model.modules():
        if isinstance(m, ConvBNReLU):
            m.fused = fused
    return model


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


# ----------------------------------------------------------------------------------------------
# CUDA


def train_step_stats(model, batch, steps=5):
    """(peak activation bytes, best step seconds) of an AMP bf16 SGD step on 64x64 windows."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, device="cuda")
    label = torch.randint(0, 2, (batch, 64, 64), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=False)  # grads stay allocated: they are not activations
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model.loss(x, label).values())
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return peak, best_of(step, steps, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and fastunet's CUDA kernels")
@pytest.mark.parametrize("batch", [4, 16])
def test_cuda_train_step_amp_bf16(benchmark, machine_peaks, batch):
    torch.manual_seed(0)
    model, name = build_model()
    fused = set_fused(model.cuda(), True).train()  # fastunet's kernels (CUDA default: plain)
    unfused = set_fused(copy.deepcopy(model), False).train()
    mem_u, t_u = train_step_stats(unfused, batch)
    mem_f, t_f = train_step_stats(fused, batch)
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(
        model=name, device=torch.cuda.get_device_name(), batch=batch,
        peak_activation_mib_fused=mem_f / 2**20, peak_activation_mib_unfused=mem_u / 2**20,
        peak_activation_ratio=mem_f / mem_u, step_s_fused=t_f, step_s_unfused=t_u,
        step_time_ratio=t_f / t_u)
    _harness.record(benchmark, "cuda", seconds=t_f, reference_s=t_u, reference=REFERENCE,
                    flops=_harness.train_step_flops(name, batch, 64, 64), precision="bf16",
                    peaks=machine_peaks("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and fastunet's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_inference_block_vs_cudnn_conv(benchmark, machine_peaks, dtype, layout):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    block = ConvBNReLU(64, 64, 3, padding=1, fused=True).cuda().to(dtype).eval()
    plain = set_fused(copy.deepcopy(block), False)
    x = torch.randn(16, 64, 64, 64, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    w = block.conv.weight.detach().contiguous(memory_format=fmt)

    def fused_run():
        with torch.no_grad():
            block(x)

    def conv_run():
        with torch.no_grad():
            F.conv2d(x, w, None, 1, 1)

    def unfused_run():
        with torch.no_grad():
            plain(x)

    fns = {"fused": fused_run, "unfused": unfused_run, "conv_only": conv_run}
    for fn in fns.values():
        fn()
    best = interleaved_best(fns, 20, "cuda")
    t_f, t_u, t_conv = best["fused"], best["unfused"], best["conv_only"]
    benchmark.pedantic(fused_run, rounds=20, warmup_rounds=2)
    with torch.no_grad():
        err = (block(x).float() - plain(x).float()).abs().max().item()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype=str(dtype), layout=layout, fused_s=t_f,
        unfused_s=t_u, conv_only_s=t_conv, fused_vs_conv_only=t_f / t_conv,
        fused_vs_unfused=t_f / t_u, max_abs_diff=err)
    _harness.record(benchmark, "cuda", seconds=t_f, reference_s=t_u, reference=REFERENCE,
                    flops=2 * x.shape[0] * 64 * 64 * 9 * x.shape[2] * x.shape[3],
                    precision="fp16" if dtype == torch.float16 else "bf16",
                    peaks=machine_peaks("cuda"))

"""CPU Winograd F(4x4,3x3) vs oneDNN's direct convolution, per UNet-S5-D16 layer shape, measured
interleaved in one run (ratios in extra_info; printed with -s).

    pytest benchmarks/bench_winograd.py --benchmark-only -s

Each case is one 3x3 conv + bias + ReLU of the model (channels_last, float32): at a slide batch
(8 windows of 64x64) and at an overlap-tile/whole-image size (1 x 592x592, the DRIVE image
padded for the default 1024 tile). oneDNN runs with a pre-packed weight (as fastunet.fuse's
modules do); Winograd with its cached weight transform. ``speedup`` = oneDNN / Winograd (> 1:
Winograd faster); ``dispatched``: the algorithm fastunet/conv_plan.py picks for the shape.
F(2x2,3x3) is shown for reference.
"""
import pytest
import torch

from _harness import interleaved_best
from fastunet import _native, conv_plan, settings

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")

# (batch, in channels, out channels, size): every 3x3 stride-1 conv shape of the model
LAYERS = [(64, 64, 64), (128, 64, 64), (64, 128, 32), (128, 128, 32), (256, 128, 32),
          (128, 256, 16), (256, 256, 16), (512, 256, 16), (256, 512, 8), (512, 512, 8),
          (1024, 512, 8), (512, 1024, 4), (1024, 1024, 4)]
SLIDE = [(8, ci, co, s) for ci, co, s in LAYERS]
WHOLE = [(1, ci, co, s * 592 // 64) for ci, co, s in LAYERS]


def _ids(case):
    n, ci, co, s = case
    return f"n{n}-{ci}to{co}-{s}x{s}"


@pytest.mark.parametrize("case", SLIDE + WHOLE, ids=_ids)
def test_cpu_winograd_vs_onednn(benchmark, case):
    n, ci, co, s = case
    torch.manual_seed(0)
    x = torch.randn(n, ci, s, s).contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, ci, 3, 3) * (2 / (9 * ci)) ** 0.5
    b = torch.randn(co)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1,
                                                       list(x.shape))
    conv = torch.ops.fastunet.conv_bias_relu  # the native op: oneDNN (the plan is in Python)
    onednn = lambda: conv(x, packed, b, [1, 1], [1, 1], [1, 1], 1, True)  # noqa: E731
    f4 = lambda: torch.ops.fastunet._winograd_conv3x3(x, w, b, True, 4)  # noqa: E731
    f2 = lambda: torch.ops.fastunet._winograd_conv3x3(x, w, b, True, 2)  # noqa: E731
    for fn in (onednn, f4, f2):
        fn()  # oneDNN plans, weight transforms cached
    rounds = 6 if n * s * s <= 8 * 64 * 64 else 3
    t = interleaved_best({"onednn": onednn, "f4": f4, "f2": f2}, rounds)
    dispatched = conv_plan.inference_plan(x, packed, [1, 1], [1, 1], [1, 1], 1).forward
    benchmark.pedantic(f4, rounds=1, warmup_rounds=0)
    gflop = 2 * n * s * s * ci * co * 9 / 1e9
    info = dict(onednn_ms=t["onednn"] * 1e3, winograd_f4_ms=t["f4"] * 1e3,
                speedup=t["onednn"] / t["f4"], speedup_f2=t["onednn"] / t["f2"],
                dispatched=dispatched, onednn_gflops=gflop / t["onednn"],
                threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    print(f"\n[winograd {_ids(case)}] " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


@pytest.mark.parametrize("mode", ["slide", "overlap-tile", "whole"])
def test_cpu_drive_engine_winograd_ab(benchmark, mode):
    """bench_inference.py's CPU DRIVE case (fused fcn UNet, channels_last, fp32) with Winograd on
    and off (FASTUNET_WINOGRAD, switched by settings.override), interleaved: ``speedup`` =
    off / on; times the run with it on."""
    import fastunet
    from fastunet.inference import InferenceEngine

    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config("fcn_unet_s5-d16_64x64_40k_drive"))
    model = fastunet.fuse(model.eval()).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 584, 565)
    engine = InferenceEngine(model.encode_decode, mode, 64, 42, channels_last=True)

    def run(flag):
        with settings.override(winograd=flag):
            return engine(x)

    on, off = run(True), run(False)  # warm-up: probes, oneDNN plans, weight transforms
    t = interleaved_best({"on": lambda: run(True), "off": lambda: run(False)}, 2)
    benchmark.pedantic(lambda: engine(x), rounds=1, warmup_rounds=0)
    scale = off.abs().max().item()
    info = dict(winograd_s=t["on"], onednn_s=t["off"], speedup=t["off"] / t["on"],
                max_rel_diff=(on - off).abs().max().item() / scale)
    benchmark.extra_info.update(info)
    print(f"\n[winograd engine {mode}] " + ", ".join(f"{k}={v:.4g}" for k, v in info.items()))


# (in channels, out channels, size) of every 3x3 conv of the fcn model's training step whose
# input gradient is needed (all but the 3-channel stem), at batch 4 x 64x64
TRAIN_LAYERS = [(64, 64, 64), (128, 64, 64), (64, 128, 32), (128, 128, 32), (256, 128, 32),
                (128, 256, 16), (256, 256, 16), (512, 256, 16), (256, 512, 8), (512, 512, 8),
                (1024, 512, 8), (512, 1024, 4), (1024, 1024, 4)]


@pytest.mark.parametrize("case", [(4, ci, co, s) for ci, co, s in TRAIN_LAYERS], ids=_ids)
def test_cpu_winograd_train_vs_onednn(benchmark, case):
    """Training's convolutions of one layer (fused Conv-BN-ReLU, channels_last, float32): forward,
    input gradient and weight gradient by Winograd F(4x4,3x3), the weight transformed on every
    call (as each step must), vs oneDNN, and the whole backward (oneDNN's input + weight gradient
    in one call vs the two Winograd ones). ``*_speedup`` = oneDNN / Winograd; ``transform_ms``:
    one weight transform and one pass over it (a call on a 1-pixel image); ``dispatched_*``: what
    the fused op picks (fastunet/conv_plan.py)."""
    n, ci, co, s = case
    torch.manual_seed(0)
    x = torch.randn(n, ci, s, s).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(co, ci, 3, 3) * (2 / (9 * ci)) ** 0.5).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(n, co, s, s).contiguous(memory_format=torch.channels_last)
    op = torch.ops.fastunet._winograd_conv3x3_train
    wgrad = torch.ops.fastunet._winograd_conv3x3_grad_weight
    bwd = torch.ops.aten.convolution_backward
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    fns = {
        "fwd_onednn": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1),
        "fwd_wino": lambda: op(x, w, False),
        "dgrad_onednn": lambda: bwd(g, x, w, None, *args, [True, False, False]),
        "dgrad_wino": lambda: op(g, w, True),
        "wgrad_onednn": lambda: bwd(g, x, w, None, *args, [False, True, False]),
        "wgrad_wino": lambda: wgrad(x, g, w),
        "bwd_onednn": lambda: bwd(g, x, w, None, *args, [True, True, False]),
        "bwd_wino": lambda: (op(g, w, True), wgrad(x, g, w)),
        "transform": lambda: op(x[:1, :, :1, :1], w, False),
    }
    for fn in fns.values():
        fn()
    rounds = 8 if s <= 16 else 5
    t = interleaved_best(fns, rounds)
    benchmark.pedantic(fns["fwd_wino"], rounds=1, warmup_rounds=0)
    plan = conv_plan.training_plan(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    fwd, dgrad, wgrad_d = plan.forward, plan.grad_input, plan.grad_weight
    info = dict(fwd_onednn_ms=t["fwd_onednn"] * 1e3, fwd_wino_ms=t["fwd_wino"] * 1e3,
                fwd_speedup=t["fwd_onednn"] / t["fwd_wino"],
                dgrad_onednn_ms=t["dgrad_onednn"] * 1e3, dgrad_wino_ms=t["dgrad_wino"] * 1e3,
                dgrad_speedup=t["dgrad_onednn"] / t["dgrad_wino"],
                wgrad_onednn_ms=t["wgrad_onednn"] * 1e3, wgrad_wino_ms=t["wgrad_wino"] * 1e3,
                wgrad_speedup=t["wgrad_onednn"] / t["wgrad_wino"],
                bwd_onednn_ms=t["bwd_onednn"] * 1e3, bwd_wino_ms=t["bwd_wino"] * 1e3,
                bwd_speedup=t["bwd_onednn"] / t["bwd_wino"], transform_ms=t["transform"] * 1e3,
                dispatched_fwd=fwd, dispatched_dgrad=dgrad, dispatched_wgrad=wgrad_d,
                threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    print(f"\n[winograd train {_ids(case)}] " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))

"""fastunet/conv_plan.py: the one decision of which convolution runs.

- the plan of every pinned case equals tests/data/conv_plan_pin.json (the shapes and the
  algorithms the measured rules give), so a refactor cannot move a layer to another algorithm;
- the native op runs what the plan says (observed with the profiler and bitwise results);
- the switches (FASTUNET_WINOGRAD, the ISA cap) and ``train_fused_default``.
"""
import json
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastunet import _native, conv_plan, ops, settings

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")
FAST = _native.LOADED and bool(_native._C.winograd_fast_kernel())
CL = torch.channels_last
PIN = json.load(open(os.path.join(os.path.dirname(__file__), "data", "conv_plan_pin.json")))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def _tensors(shape, kw, k=3, make=torch.randn):
    n, cin, cout, h, w = shape[:5]
    dt = DTYPES[kw.get("dtype", "fp32")]
    g = kw.get("g", 1)
    x = make(n, cin, h, w).to(dt)
    if kw.get("layout") != "nchw":
        x = x.contiguous(memory_format=CL)
    weight = (make(cout, cin // g, kw.get("k", k), kw.get("k", k)) * 0.1).to(dt)
    bias = make(cout).to(dt) if kw.get("bias", True) else None
    geom = ([kw.get("s", 1)] * 2, [kw.get("p", 1)] * 2, [kw.get("d", 1)] * 2, g)
    return x, weight, bias, geom


def _without_winograd(algorithm):
    """What a CPU without the AVX-512 kernel runs instead."""
    return {"winograd_f4": "onednn", "winograd_f2": "onednn"}.get(algorithm, algorithm)


def _expected_inference(algorithm):
    return algorithm if FAST else _without_winograd(algorithm)


@pytest.mark.parametrize("case", PIN["inference"], ids=lambda c: f"{c[0]}{c[1]}")
def test_inference_plan_is_pinned_and_the_op_runs_it(case):
    shape, kw, algorithm = case
    x, w, b, geom = _tensors(shape, kw)
    plan = conv_plan.inference_plan(x, w, *geom)
    assert plan.forward == _expected_inference(algorithm), plan
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = ops.conv_bias_relu(x, w, b, *geom)
    names = {e.name for e in prof.events()}
    ran = ("onednn" if "mkldnn::_convolution_pointwise" in names
           else "aten" if "aten::convolution" in names
           else f"winograd_f{plan.winograd_tile}" if "fastunet::_winograd_conv3x3" in names
           else None)
    assert ran == plan.forward, sorted(names)
    if plan.winograd_tile:
        assert torch.equal(y, torch.ops.fastunet._winograd_conv3x3(x, w, b, True,
                                                                    plan.winograd_tile))


def _training_plan(shape, kw):
    n, cin, cout, h, w, k = shape
    with FakeTensorMode():  # shapes only: the widest layers would need gigabytes
        x, weight, bias, geom = _tensors((n, cin, cout, h, w), dict(kw, bias=kw.get("bias", False),
                                                                   p=kw.get("p", k // 2)),
                                         k=k, make=torch.empty)
        return conv_plan.training_plan(x, weight, bias, *geom)


def test_training_plans_are_pinned():
    wrong = []
    for shape, kw, algorithms in PIN["training"]:
        expected = [a if FAST else a.replace("winograd_f4", "aten") for a in algorithms]
        plan = _training_plan(shape, kw)
        if [plan.forward, plan.grad_input, plan.grad_weight] != expected:
            wrong.append((shape, kw, expected, plan))
    assert not wrong, wrong[:5]
    assert len(PIN["training"]) > 1000


@pytest.mark.skipif(not FAST, reason="Winograd is dispatched only with AVX-512")
@pytest.mark.parametrize("shape, forward_op, backward_ops", [
    ((4, 32, 32, 16, 16), "fastunet::_winograd_conv3x3_train",
     {"fastunet::_winograd_conv3x3_train", "fastunet::_winograd_conv3x3_grad_weight"}),
    ((2, 32, 32, 4, 4), "aten::mm", {"aten::mm"}),
    ((2, 3, 32, 16, 16), "aten::convolution", {"aten::convolution_backward"}),
])
def test_the_training_op_runs_its_plan(shape, forward_op, backward_ops):
    n, cin, cout, h, w = shape
    x = torch.randn(n, cin, h, w).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(cout, cin, 3, 3, requires_grad=True)
    bw, bb = torch.ones(cout, requires_grad=True), torch.zeros(cout, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = ops.conv_bn_relu_train(x, weight, None, bw, bb, None, None, padding=1)
    assert forward_op in {e.name for e in prof.events()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.sum().backward()
    assert backward_ops <= {e.name for e in prof.events()}


@pytest.mark.skipif(not FAST, reason="Winograd is dispatched only with AVX-512")
def test_switch_and_isa_cap_turn_winograd_off():
    x, w, b, geom = _tensors((2, 32, 32, 32, 32), {})
    assert conv_plan.inference_plan(x, w, *geom).forward == "winograd_f4"
    with settings.override(winograd=False):
        plan = conv_plan.inference_plan(x, w, *geom)
        assert plan.forward == "onednn" and "FASTUNET_WINOGRAD" in plan.why
    with settings.override(cpu_isa="avx2"):
        assert not _native._C.winograd_fast_kernel()  # the cap reaches the native library
        assert conv_plan.inference_plan(x, w, *geom).forward == "onednn"
    assert _native._C.winograd_fast_kernel()
    assert conv_plan.inference_plan(x, w, *geom).forward == "winograd_f4"


def test_non_cpu_devices_run_the_library_convolution():
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, 64, 64, 64, device="meta").contiguous(memory_format=CL)
        w = torch.empty(64, 64, 3, 3, device="meta")
        plan = conv_plan.training_plan(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    assert (plan.forward, plan.grad_input, plan.grad_weight) == ("aten",) * 3


class _Model(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.base_channels = width


def test_train_fused_default():
    assert conv_plan.train_fused_default(_Model(64), "cpu") is True
    assert conv_plan.train_fused_default(_Model(16), "cpu") is False
    assert conv_plan.train_fused_default(_Model(64), torch.device("cuda")) is False
    assert conv_plan.train_fused_default(_Model(16), "cuda:1") is False


def test_describe_lists_every_unet_layer():
    lines = conv_plan.describe()
    assert len(lines) >= 2 + len(conv_plan._UNET_LAYERS)
    assert any("1024->1024 @4x4" in line and "gemm / gemm / gemm" in line for line in lines)

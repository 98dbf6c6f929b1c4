"""The host path of a fused block: how many ops it dispatches (counted with a TorchDispatchMode
on CPU tensors) in inference and in a training step, forward and backward, against the eager
block it replaces (conv, BN, ReLU modules). A fused block must dispatch no more; the counts are
pinned so that an extra cast, copy or zeros shows up here.

The GEMM convolutions of the small, wide CPU layers (fastunet/conv_plan.py) are composed of
ATen ops in Python and dispatch more: they are counted separately below.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastunet import _native, conv_plan
from fastunet.nn import ConvBNReLU

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")
CL = torch.channels_last
WINOGRAD = _native.LOADED and bool(_native._C.winograd_fast_kernel())


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


def _block(fused, shape, train):
    torch.manual_seed(0)
    n, cin, h, w = shape
    block = ConvBNReLU(cin, 32, 3, padding=1, fused=fused).to(memory_format=CL).train(train)
    x = torch.randn(shape).contiguous(memory_format=CL)
    return block, x


def _count_inference(fused, shape, context):
    block, x = _block(fused, shape, False)
    with context():
        block(x)  # the fold, once
        with CountOps() as counted:
            block(x)
    return counted


def _count_training(fused, shape):
    block, x = _block(fused, shape, True)
    x.requires_grad_()
    block(x).sum().backward()  # warm
    block.zero_grad(set_to_none=True)  # no accumulation into existing grads: a fresh step
    x.grad = None
    with CountOps() as forward:
        y = block(x)
    grad = torch.ones_like(y)
    with CountOps() as backward:
        y.backward(grad)
    return forward, backward


SHAPES = {  # a layer per convolution algorithm of the fused training op
    "aten": (2, 3, 16, 16),
    "winograd": (4, 32, 16, 16),
}


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_dispatches_one_op(context):
    eager = _count_inference(False, (2, 32, 16, 16), context)
    fused = _count_inference(None, (2, 32, 16, 16), context)
    assert dict(fused.ops) in ({"conv_bias_relu": 1}, {"_winograd_conv3x3": 1}), fused.ops
    assert fused.total <= eager.total == 3 + (context is torch.no_grad), eager.ops


@pytest.mark.parametrize("layer", SHAPES)
def test_training_step_dispatches_no_more_than_eager(layer):
    shape = SHAPES[layer]
    if layer == "winograd" and not WINOGRAD:
        pytest.skip("Winograd is dispatched only with AVX-512")
    e_fwd, e_bwd = _count_training(False, shape)
    f_fwd, f_bwd = _count_training(None, shape)
    assert f_fwd.total <= e_fwd.total, (f_fwd.ops, e_fwd.ops)
    assert f_bwd.total <= e_bwd.total, (f_bwd.ops, e_bwd.ops)
    # the pinned counts: statistics, normalise+ReLU, running statistics, the batch counter
    # and the convolution; backward: two BN reductions and the convolution's gradients
    conv = {"aten": {"convolution": 1}, "winograd": {"_winograd_conv3x3_train": 1}}[layer]
    assert dict(f_fwd.ops) == {"add_": 1, "bn_stats": 1, "bn_relu": 1,
                               "bn_update_running_stats": 1, **conv}
    grads = {"aten": {"convolution_backward": 1},
             "winograd": {"_winograd_conv3x3_train": 1, "_winograd_conv3x3_grad_weight": 1}}
    expected = {"bn_relu_backward_reduce": 1, "bn_relu_backward_elemt": 1, **grads[layer]}
    assert {k: v for k, v in f_bwd.ops.items() if k != "detach"} == expected
    assert "zeros" not in f_bwd.ops  # no zero gradients for the statistics outputs


def test_gemm_layers_are_counted():
    """The GEMM path (deep layers at 4x4) composes im2col and matrix products from ATen ops:
    more ops than the eager block, which is why only the layers where it measured faster take it
    (its host cost included). Pinned, so that it does not grow unnoticed."""
    shape = (2, 32, 4, 4)
    block, x = _block(None, shape, True)
    plan = conv_plan.training_plan(x, block.conv.weight, None, [1, 1], [1, 1], [1, 1], 1)
    assert plan.forward == "gemm"
    f_fwd, f_bwd = _count_training(None, shape)
    assert f_fwd.total <= 14 and f_bwd.total <= 101, (f_fwd.ops, f_bwd.ops)


def test_eval_with_autograd_recording_runs_the_modules():
    """BN frozen in eval while autograd records (norm_eval fine-tuning): re-folding on every call
    would cost more ops than the modules, so the block runs them (the very same numbers)."""
    block, x = _block(None, (2, 32, 8, 8), False)
    x.requires_grad_()
    with CountOps() as counted:
        y = block(x)
    assert "conv_bias_relu" not in counted.ops and counted.ops["convolution"] == 1
    ref = block.activate(block.bn(block.conv(x)))
    assert torch.equal(y, ref)

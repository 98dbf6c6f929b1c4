"""The GEMM (im2col) convolutions the fused CPU training op uses for small, wide layers: equal to
PyTorch's convolution and its gradients, chosen only where they apply, and the fused training
block on such a layer equal to the unfused modules."""
import pytest
import torch
import torch.nn.functional as F

from fastunet import _native, conv_plan
from fastunet.nn import ConvBNReLU
from fastunet.ops import cpu_gemm_conv as gemm

from fused_helpers import unfused

cl = torch.channels_last


def _conv(n, cin, cout, hw, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, hw, hw, generator=g).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).contiguous(
        memory_format=cl)
    gy = torch.randn(n, cout, hw, hw, generator=g).contiguous(memory_format=cl)
    return x, w, gy


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", [(2, 24, 16, 4), (4, 8, 12, 5), (1, 3, 7, 1)],
                         ids=["2x24->16@4", "4x8->12@5", "1x3->7@1"])
def test_gemm_conv_and_gradients_equal_pytorch(shape, k):
    n, cin, cout, hw = shape
    x, w, gy = _conv(n, cin, cout, hw, k)
    p = k // 2
    expected = F.conv2d(x, w, None, 1, p)
    got = gemm.conv2d(x, w)
    assert got.is_contiguous(memory_format=cl)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [p, p], [1, 1], False,
                                                    [0, 0], 1, [True, True, False])
    torch.testing.assert_close(gemm.grad_input(gy, w, x.shape), gx, rtol=1e-5, atol=1e-5)
    gw_gemm = gemm.grad_weight(gy, x, k)
    assert gw_gemm.shape == w.shape and gw_gemm.is_contiguous(memory_format=cl)
    torch.testing.assert_close(gw_gemm, gw, rtol=1e-5, atol=1e-4)


def _gemm(x, w, bias=None, geom=([1, 1], [1, 1], [1, 1], 1)):
    """(forward and input gradient, weight gradient) as GEMMs in the training plan?"""
    plan = conv_plan.training_plan(x, w, bias, *geom)
    assert plan.forward == plan.grad_input
    return plan.forward == "gemm", plan.grad_weight == "gemm"


def test_gemm_only_where_it_applies():
    x, w, _ = _conv(4, 64, 64, 4, 3)
    assert _gemm(x, w) == (True, True)  # 64 output rows
    assert _gemm(x.contiguous(), w) == (False, False)  # NCHW
    assert _gemm(x.double(), w.double()) == (False, False)
    assert _gemm(x, w, torch.zeros(64)) == (False, False)  # conv bias
    assert _gemm(x, w, None, ([2, 2], [1, 1], [1, 1], 1)) == (False, False)
    assert _gemm(x, w, None, ([1, 1], [2, 2], [2, 2], 1)) == (False, False)  # dilated
    assert _gemm(x, w, None, ([1, 1], [0, 0], [1, 1], 1)) == (False, False)  # "valid"
    big, wide, _ = _conv(4, 8, 8, 16, 3)  # 1024 rows: oneDNN
    assert _gemm(big, wide) == (False, False)
    # 256 rows: only the weight gradient, and only for a wide weight
    mid = torch.empty(4, 1024, 8, 8).contiguous(memory_format=cl)
    wide = torch.empty(512, 1024, 3, 3).contiguous(memory_format=cl)
    assert _gemm(mid, wide) == (False, True)
    assert _gemm(mid, wide[:64]) == (False, False)


@pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")
def test_fused_block_on_a_small_wide_layer_equals_the_modules():
    torch.manual_seed(0)
    block = ConvBNReLU(32, 48, 3, padding=1).train().to(memory_format=cl)
    plain = unfused(block)
    x = torch.randn(4, 32, 4, 4).contiguous(memory_format=cl)
    assert _gemm(x, block.conv.weight) == (True, True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = block(xa), plain(xb)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for pa, pb in zip(block.parameters(), plain.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.bn.running_mean, plain.bn.running_mean)
    torch.testing.assert_close(block.bn.running_var, plain.bn.running_var)

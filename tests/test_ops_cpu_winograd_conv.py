"""Winograd F(4x4,3x3) in fused CPU training (fastunet/ops/cpu_winograd_conv.py and the native
``_winograd_conv3x3_train`` / ``_winograd_conv3x3_grad_weight``): the forward conv, the input
gradient (the conv of the output gradient by the transposed, 180°-rotated weight) and the
weight gradient against float64 PyTorch, where the fused training op dispatches them (the plan of
fastunet/conv_plan.py), that FASTUNET_WINOGRAD=0 restores the oneDNN path exactly, and that the
results are deterministic (exact resume depends on it).

Bound: 5e-5 of the largest magnitude, as tests/test_ops_winograd.py states for F(4x4,3x3).
"""
import pytest
import torch
import torch.nn.functional as F

from fastunet import _native, conv_plan, settings
from fastunet.nn import ConvBNReLU
from fastunet.ops import conv_bn_relu_train

from fused_helpers import unfused

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")
# the fused op dispatches Winograd only with its AVX-512 kernel (tests/test_cpu_isa.py runs the
# op itself under the other ISAs)
dispatching = pytest.mark.skipif(not (_native.LOADED and _native._C.winograd_fast_kernel()),
                                 reason="Winograd is dispatched only with AVX-512")

CL = torch.channels_last
BOUND = 5e-5
GEOM = ([1, 1], [1, 1], [1, 1], 1)


def _op(*args):
    return torch.ops.fastunet._winograd_conv3x3_train(*args)


def _grad_weight(x, gy, w):
    return torch.ops.fastunet._winograd_conv3x3_grad_weight(x, gy, w)


def _rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _inputs(n, cin, cout, h, w, weight_cl=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=CL)
    wt = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
    gy = torch.randn(n, cout, h, w, generator=g).contiguous(memory_format=CL)
    return x, wt.contiguous(memory_format=CL) if weight_cl else wt, gy


SHAPES = [  # (N, Cin, Cout, H, W): batch 1, odd/non-square sizes, channels not multiples of 16
    (1, 3, 5, 1, 1), (1, 17, 130, 2, 3), (2, 33, 47, 7, 9), (1, 130, 17, 5, 4),
    (3, 16, 64, 6, 13), (1, 64, 33, 12, 12)]


@pytest.mark.parametrize("weight_cl", [True, False], ids=["cl_weight", "dense_weight"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_input_gradient_match_float64(shape, weight_cl):
    x, w, gy = _inputs(*shape, weight_cl=weight_cl)
    xd = x.double().requires_grad_()
    ref = F.conv2d(xd, w.double(), padding=1)
    ref.backward(gy.double())
    y = _op(x, w, False)
    gx = _op(gy, w, True)
    assert y.shape == ref.shape and gx.shape == x.shape
    assert y.is_contiguous(memory_format=CL) and gx.is_contiguous(memory_format=CL)
    assert _rel_err(y, ref) < BOUND
    assert _rel_err(gx, xd.grad) < BOUND
    wd = w.double().requires_grad_()
    F.conv2d(x.double(), wd, padding=1).backward(gy.double())
    gw = _grad_weight(x, gy, w)
    assert gw.shape == w.shape and gw.stride() == w.stride()  # the weight's layout
    assert _rel_err(gw, wd.grad) < BOUND
    # NCHW inputs give the same result
    assert torch.equal(_grad_weight(x.contiguous(), gy.contiguous(), w), gw)


def test_nchw_inputs_give_the_same_result():
    x, w, gy = _inputs(2, 40, 24, 11, 10)
    for input_grad, inp in ((False, x), (True, gy)):
        assert torch.equal(_op(inp.contiguous(), w, input_grad), _op(inp, w, input_grad))


@dispatching
def test_block_sizes_give_the_same_result():
    """The AVX-512 products sum each output in one order whatever the block (the BLAS fallback
    of the other ISAs need not), so results do not depend on the work split or thread count."""
    x, w, gy = _inputs(2, 40, 24, 11, 10)
    for input_grad, inp in ((False, x), (True, gy)):
        base = _op(inp, w, input_grad)
        for block in (1, 3, 64):
            assert torch.equal(_op(inp, w, input_grad, block), base)


def test_weight_changes_between_calls_are_seen():
    """Training updates the weight in place every step: nothing may be cached across calls."""
    x, w, _ = _inputs(1, 32, 32, 8, 8)
    before = _op(x, w, False)
    with torch.no_grad():
        w.mul_(-2)
    after = _op(x, w, False)
    assert _rel_err(after, F.conv2d(x.double(), w.double(), padding=1)) < BOUND
    assert _rel_err(after, -2 * before.double()) < BOUND


@pytest.mark.parametrize("bad", [
    lambda x, w: _op(x.double(), w, False),
    lambda x, w: _op(x, w[:, :5], False),                 # Cin mismatch
    lambda x, w: _op(x, w, True),                         # input_grad: channels must be Cout
    lambda x, w: _op(x, w[..., :2], False),               # not 3x3
    lambda x, w: _op(x, w, False, -1),
    lambda x, w: _op(x[0], w, False),
], ids=["double", "cin", "input-grad-channels", "kernel", "block", "3d"])
def test_bad_arguments_raise(bad):
    x, w, _ = _inputs(1, 8, 12, 4, 4)
    with pytest.raises(RuntimeError, match="_winograd_conv3x3_train"):
        bad(x, w)


@pytest.mark.parametrize("bad", [
    lambda x, w, gy: _grad_weight(x.double(), gy, w),
    lambda x, w, gy: _grad_weight(x, gy[:, :, :3], w),       # sizes differ
    lambda x, w, gy: _grad_weight(x, gy, w[:5]),             # Cout mismatch
    lambda x, w, gy: _grad_weight(x, gy, w[..., :2]),        # not 3x3
], ids=["double", "size", "cout", "kernel"])
def test_grad_weight_bad_arguments_raise(bad):
    x, w, gy = _inputs(1, 8, 12, 4, 4)
    with pytest.raises(RuntimeError, match="_winograd_conv3x3_grad_weight"):
        bad(x, w, gy)


def test_opcheck():
    x, w, gy = _inputs(1, 8, 12, 5, 6)
    torch.library.opcheck(torch.ops.fastunet._winograd_conv3x3_grad_weight.default, (x, gy, w))
    torch.library.opcheck(torch.ops.fastunet._winograd_conv3x3_train.default, (x, w, False, 0))
    torch.library.opcheck(torch.ops.fastunet._winograd_conv3x3_train.default, (gy, w, True, 0))


def _winograd(x, w, bias=None, geom=GEOM):
    plan = conv_plan.training_plan(x, w, bias, *geom)
    return (plan.forward, plan.grad_input, plan.grad_weight) == ("winograd_f4",) * 3


@dispatching
def test_winograd_only_where_it_applies():
    x, w, _ = _inputs(4, 64, 64, 16, 16)  # 64 tiles of 4x4
    assert _winograd(x, w)
    assert not _winograd(x[:, :, :8, :8], w)  # 16 tiles
    assert not _winograd(x.contiguous(), w)  # NCHW
    assert not _winograd(x.double(), w.double())
    assert not _winograd(x, w, torch.zeros(64))  # conv bias
    assert not _winograd(x, w, None, ([2, 2], [1, 1], [1, 1], 1))
    assert not _winograd(x, w, None, ([1, 1], [2, 2], [2, 2], 1))
    assert not _winograd(x[:, :16], w[:, :16])  # 16 in
    assert not _winograd(x, w[:16])  # 16 out
    one = torch.empty(4, 64, 32, 32).contiguous(memory_format=CL)
    assert not _winograd(one, w[..., :1, :1], None, ([1, 1], [0, 0], [1, 1], 1))  # 1x1
    with settings.override(winograd=False):
        assert not _winograd(x, w)


def _block_run(block, x, gy):
    xa = x.clone().requires_grad_()
    y = block(xa)
    y.backward(gy)
    return y.detach(), xa.grad, [p.grad.clone() for p in block.parameters()]


def _fresh_block(seed=0):
    torch.manual_seed(seed)
    return ConvBNReLU(40, 36, 3, padding=1).train().to(memory_format=CL)


# 1 x 29x31: 8 x 8 = 64 tiles of 4x4, the smallest count dispatched; odd sizes, odd channels
SHAPE = (1, 40, 29, 31)


@dispatching
def test_fused_block_equals_the_modules_through_winograd():
    block = _fresh_block()
    plain = unfused(block)
    exact = unfused(block).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*SHAPE, generator=g).contiguous(memory_format=CL)
    assert _winograd(x, block.conv.weight)
    gy = torch.randn(SHAPE[0], 36, *SHAPE[2:], generator=g).contiguous(memory_format=CL)
    ya, gxa, gpa = _block_run(block, x, gy)
    yb, gxb, gpb = _block_run(plain, x, gy)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gxa, gxb, rtol=1e-4, atol=1e-4)
    # weight gradients sum ~900 products per value: relative to their largest magnitude, against
    # float64 (the float32 modules are at ~1e-6 there)
    _, _, gpd = _block_run(exact, x.double(), gy.double())
    for pa, pb, pd in zip(gpa, gpb, gpd):
        assert _rel_err(pb, pd) < 1e-5
        assert _rel_err(pa, pd) < BOUND
    torch.testing.assert_close(block.bn.running_mean, plain.bn.running_mean)
    torch.testing.assert_close(block.bn.running_var, plain.bn.running_var)


@dispatching
def test_switch_off_restores_the_onednn_path_exactly(monkeypatch):
    """FASTUNET_WINOGRAD=0: the fused op's results are bit-equal to its path with a plan that
    never picks Winograd; with it on they differ (so the comparison can fail)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*SHAPE, generator=g).contiguous(memory_format=CL)
    gy = torch.randn(SHAPE[0], 36, *SHAPE[2:], generator=g).contiguous(memory_format=CL)

    def run(winograd, never=False):
        with monkeypatch.context() as m, settings.override(winograd=winograd):
            if never:
                library = conv_plan.ConvPlan("aten", "aten", "aten", "test")
                m.setattr(conv_plan, "training_plan", lambda *a: library)
            return _block_run(_fresh_block(), x, gy)

    off, never, on = run(False), run(True, never=True), run(True)
    for a, b, c in zip(off[:2], never[:2], on[:2]):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    for a, b in zip(off[2], never[2]):
        assert torch.equal(a, b)


@dispatching
def test_deterministic_run_to_run():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 17, 19, generator=g).contiguous(memory_format=CL)  # 2 x 5 x 5 tiles
    gy = torch.randn(2, 36, 17, 19, generator=g).contiguous(memory_format=CL)
    w = torch.randn(36, 40, 3, 3, generator=g).contiguous(memory_format=CL)
    def run():
        return _op(x, w, False), _op(gy, w, True), _grad_weight(x, gy, w)

    first = run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # another split of the work: results must not depend on it
    try:
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@dispatching
def test_conv_bn_relu_train_functional_input_gradient_through_winograd():
    """The functional op (as the fused model calls it) with the input gradient by Winograd,
    against float64 autograd of conv2d -> batch_norm -> relu."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*SHAPE, generator=g).contiguous(memory_format=CL)
    w = (torch.randn(36, 40, 3, 3, generator=g) / 19).contiguous(memory_format=CL)
    bw, bb = torch.rand(36, generator=g) + 0.5, torch.randn(36, generator=g)
    gy = torch.randn(SHAPE[0], 36, *SHAPE[2:], generator=g).contiguous(memory_format=CL)
    leaves = [t.clone().requires_grad_() for t in (x, w, bw, bb)]
    y = conv_bn_relu_train(leaves[0], leaves[1], None, leaves[2], leaves[3], None, None,
                           padding=1)
    y.backward(gy)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, bw, bb)]
    c = F.conv2d(ref_leaves[0], ref_leaves[1], padding=1)
    ref = F.batch_norm(c, None, None, ref_leaves[2], ref_leaves[3], training=True).relu()
    ref.backward(gy.double())
    assert _rel_err(y, ref) < 1e-4
    for got, want in zip(leaves, ref_leaves):
        assert _rel_err(got.grad, want.grad) < 1e-4


@dispatching
def test_training_steps_repeat_bit_for_bit():
    """Exact resume needs a step to be a function of its inputs: three SGD steps of a block whose
    forward and input gradient run by Winograd, twice from the same start, end equal."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*SHAPE, generator=g).contiguous(memory_format=CL)

    def train():
        block = torch.nn.Sequential(_fresh_block(), ConvBNReLU(36, 36, 3, padding=1)).train()
        block.to(memory_format=CL)
        opt = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            block(x.clone().requires_grad_()).square().mean().backward()
            opt.step()
        return [t.detach().clone() for t in [*block.parameters(), *block.buffers()]]

    for a, b in zip(train(), train()):
        assert torch.equal(a, b)

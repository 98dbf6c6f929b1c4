"""Hypothesis fuzzing of both custom op families against their pure-PyTorch references (random
shapes, grids, strides, dtypes, memory formats), and of malformed arguments: they must raise a
RuntimeError/ValueError with a message, never crash the process (checked in a child process).

FASTUNET_FUZZ_EXAMPLES=N runs N examples per property (default: a CI-sized 25).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICES
from fastunet import _native, ops
from fastunet.ops import conv_bn_relu_reference as cref
from fastunet.ops import tile_reference as tref

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="fuzzes the native ops")

EXAMPLES = int(os.environ.get("FASTUNET_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "permuted", "sliced"]


def in_layout(t, kind):
    """The same values in another memory layout (NCHW, NHWC, permuted, strided slice)."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "permuted":  # neither NCHW nor NHWC strides
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":  # every other column of a wider tensor: non-unit inner stride
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}[dtype]


def close_to_reference(ours, theirs, exact, dtype):
    """fp32/fp64: close to the reference; fp16/bf16: error vs the fp64 result at most twice the
    same-precision reference's (+ eps), the rule of the existing low-precision tests."""
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours, theirs, rtol=tolerance(dtype), atol=tolerance(dtype))
        return
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    err_ours = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    err_ref = (theirs.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err_ours <= 2 * err_ref + torch.finfo(dtype).eps * scale, (err_ours, err_ref)


# ------------------------------------------------------------------------------ tile ops

@st.composite
def tile_grids(draw):
    """(N, C, H, W, th, tw, sh, sw): windows that fit, strides below, at and above the window."""
    H, W = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    th, tw = draw(st.integers(1, H)), draw(st.integers(1, W))
    sh, sw = draw(st.integers(1, th + 8)), draw(st.integers(1, tw + 8))
    return draw(st.integers(0, 3)), draw(st.integers(1, 4)), H, W, th, tw, sh, sw


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(grid=tile_grids(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       weighted=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_tile_extract_matches_reference(device, grid, dtype, layout, weighted, normalize, seed):
    n, c, H, W, th, tw, sh, sw = grid
    g = torch.Generator().manual_seed(seed)
    exact_img = torch.randn(n, c, H, W, generator=g, dtype=torch.float64)
    weight = torch.rand(th, tw, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    img = in_layout(exact_img.to(dtype).to(device), layout)
    w = None if weight is None else weight.to(device)
    ours = ops.tile_extract(img, (th, tw), (sh, sw), weight=w, normalize=normalize)
    theirs = tref.tile_extract(img, th, tw, sh, sw, w, normalize)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    exact = tref.tile_extract(exact_img, th, tw, sh, sw, weight, normalize)
    close_to_reference(ours.cpu(), theirs.cpu(), exact, dtype)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(grid=tile_grids(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       weighted=st.booleans(), normalize=st.booleans(),
       epilogue=st.sampled_from(["none", "softmax", "argmax"]), seed=st.integers(0, 2**16))
def test_tile_aggregate_matches_reference(device, grid, dtype, layout, weighted, normalize,
                                          epilogue, seed):
    n, c, H, W, th, tw, sh, sw = grid
    count = n * tref.window_count(H, th, sh) * tref.window_count(W, tw, sw)
    g = torch.Generator().manual_seed(seed)
    exact_tiles = torch.randn(count, c, th, tw, generator=g, dtype=torch.float64) * 3
    weight = torch.rand(th, tw, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    tiles = in_layout(exact_tiles.to(dtype).to(device), layout)
    w = None if weight is None else weight.to(device)
    ours = ops.tile_aggregate(tiles, n, H, W, (sh, sw), weight=w, normalize=normalize,
                              epilogue=epilogue).cpu()
    theirs = tref.tile_aggregate(tiles, n, H, W, sh, sw, w, normalize, epilogue).cpu()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if epilogue == "argmax":
        # labels of the fp64 average; only near-ties may differ
        avg = tref.tile_aggregate(exact_tiles, n, H, W, sh, sw, weight, True)
        top2 = avg.topk(min(2, c), dim=1).values if c > 1 else None
        sure = (top2[:, 0] - top2[:, 1] > 4 * tolerance(dtype) * (1 + avg.abs().amax(1))
                ) if c > 1 else torch.ones(n, H, W, dtype=torch.bool)
        assert torch.equal(ours[sure], avg.argmax(1).to(torch.uint8)[sure])
        return
    exact = tref.tile_aggregate(exact_tiles, n, H, W, sh, sw, weight, normalize, epilogue)
    close_to_reference(ours, theirs, exact, dtype)


# ------------------------------------------------------------------------------ conv-BN-ReLU

@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3, 5]))
    dil, pad, stride = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 3))
    extent = dil * (k - 1) + 1
    H = draw(st.integers(max(1, extent - 2 * pad), 14))
    W = draw(st.integers(max(1, extent - 2 * pad), 14))
    return draw(st.integers(0, 2)), cin, cout, groups, k, H, W, stride, pad, dil


@FUZZ
@given(case=conv_cases(), dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(LAYOUTS), bias=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv_bias_relu_matches_reference(case, dtype, layout, bias, relu, seed):
    n, cin, cout, groups, k, H, W, stride, pad, dil = case
    g = torch.Generator().manual_seed(seed)
    x = in_layout(torch.randn(n, cin, H, W, generator=g, dtype=dtype), layout)
    w = torch.randn(cout, cin // groups, k, k, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    args = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    ours = ops.conv_bias_relu(x, w, b, *args, relu=relu)
    theirs = cref.conv_bias_relu(x, w, b, *args, relu)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if ours.numel():  # same memory format rule as the reference (channels_last kept)
        assert ours.is_contiguous(memory_format=cref.layout(x))


@st.composite
def bn_cases(draw):
    return (draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
            draw(st.integers(1, 9)))


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(shape=bn_cases(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       affine=st.booleans(), relu=st.booleans(), offset=st.sampled_from([0.0, 3.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_bn_ops_match_reference(device, shape, dtype, layout, affine, relu, offset, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x = in_layout(x64.to(dtype).to(device), layout)
    dy = in_layout(dy64.to(dtype).to(device), layout)
    sdt = cref.stats_dtype(x)
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(sdt).to(device) \
        if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(sdt).to(device) if affine else None
    eps = 1e-5
    mean, var = ops.bn_stats(x)
    rmean, rvar = cref.bn_stats(x)
    rel = 1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    torch.testing.assert_close(mean.cpu(), rmean.cpu(), rtol=rel, atol=rel * (1 + offset))
    torch.testing.assert_close(var.cpu(), rvar.cpu(), rtol=1e-3, atol=rel * (1 + offset ** 2))
    # the remaining ops with the same (reference) statistics on both sides
    y = ops.bn_relu(x, rmean, rvar, weight, bias, eps, relu)
    ry = cref.bn_relu(x, rmean, rvar, weight, bias, eps, relu)
    assert y.dtype == dtype and y.shape == x.shape
    close = dict(rtol=tolerance(dtype) * 10, atol=tolerance(dtype) * 10)
    torch.testing.assert_close(y.cpu(), ry.cpu(), **close)
    sums = ops.bn_relu_backward_reduce(dy, x, rmean, rvar, weight, bias, eps, relu)
    rsums = cref.bn_relu_backward_reduce(dy, x, rmean, rvar, weight, bias, eps, relu)
    scale = n * h * w
    for a, b in zip(sums, rsums):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-3, atol=close["atol"] * scale)
    dx = ops.bn_relu_backward_elemt(dy, x, rmean, rvar, weight, bias, *rsums, scale, eps, relu)
    rdx = cref.bn_relu_backward_elemt(dy, x, rmean, rvar, weight, bias, *rsums, scale, eps, relu)
    torch.testing.assert_close(dx.cpu(), rdx.cpu(), **close)
    if scale > 1:
        r = [torch.randn(c, generator=g, dtype=torch.float64).to(sdt).to(device) for _ in "mv"]
        r[1] = r[1].abs()
        expected = [t.clone() for t in r]
        ops.bn_update_running_stats(r[0], r[1], rmean, rvar, 0.1, scale)
        cref.bn_update_running_stats(expected[0], expected[1], rmean, rvar, 0.1, scale)
        torch.testing.assert_close(r, expected)


# ------------------------------------------------------------------------------ malformed input

def _malformed_calls():
    """(name, thunk) of malformed calls: each must raise RuntimeError/ValueError, not crash."""
    F = torch.ops.fastunet
    x = torch.randn(1, 2, 8, 8)
    w3 = torch.randn(4, 2, 3, 3)
    z3, o3 = torch.zeros(2), torch.ones(2)
    big = 2 ** 40
    return [
        ("extract negative window", lambda: F.tile_extract(x, -1, 4, 2, 2)),
        ("extract zero stride", lambda: F.tile_extract(x, 4, 4, 0, 2)),
        ("extract negative stride", lambda: F.tile_extract(x, 4, 4, 2, -3)),
        ("extract window > image", lambda: F.tile_extract(x, 9, 4, 2, 2)),
        ("extract empty image", lambda: F.tile_extract(torch.randn(1, 1, 0, 8), 4, 4, 2, 2)),
        ("extract 3-D", lambda: F.tile_extract(x[0], 4, 4, 2, 2)),
        ("extract 5-D", lambda: F.tile_extract(x[None], 4, 4, 2, 2)),
        ("extract int", lambda: F.tile_extract(x.long(), 4, 4, 2, 2)),
        ("extract complex", lambda: F.tile_extract(x.to(torch.complex64), 4, 4, 2, 2)),
        ("extract sparse", lambda: F.tile_extract(x.to_sparse(), 4, 4, 2, 2)),
        ("extract weight int", lambda: F.tile_extract(x, 4, 4, 2, 2,
                                                      torch.ones(4, 4, dtype=torch.long))),
        ("extract weight shape", lambda: F.tile_extract(x, 4, 4, 2, 2, torch.ones(1, 4, 4))),
        ("aggregate negative batch", lambda: F.tile_aggregate(torch.randn(4, 1, 4, 4), -1, 8, 8,
                                                              4, 4)),
        ("aggregate zero height", lambda: F.tile_aggregate(torch.randn(4, 1, 4, 4), 1, 0, 8,
                                                           4, 4)),
        ("aggregate huge image", lambda: F.tile_aggregate(torch.randn(1, 1, 4, 4), 1, big, big,
                                                          big, big)),
        ("aggregate batch overflow", lambda: F.tile_aggregate(torch.randn(1, 1, 4, 4), 2 ** 62,
                                                              4, 4, 1, 1)),
        ("aggregate wrong count", lambda: F.tile_aggregate(torch.randn(3, 1, 4, 4), 1, 8, 8,
                                                           4, 4)),
        ("aggregate empty window", lambda: F.tile_aggregate(torch.randn(4, 1, 0, 4), 1, 8, 8,
                                                            4, 4)),
        ("argmax 0 classes", lambda: F.tile_aggregate_argmax(torch.randn(4, 0, 4, 4), 1, 8, 8,
                                                             4, 4)),
        ("argmax 300 classes", lambda: F.tile_aggregate_argmax(torch.randn(4, 300, 4, 4), 1, 8,
                                                               8, 4, 4)),
        ("conv negative stride", lambda: F.conv_bias_relu(x, w3, None, [-1, 1], [0, 0], [1, 1],
                                                          1)),
        ("conv zero dilation", lambda: F.conv_bias_relu(x, w3, None, [1, 1], [0, 0], [0, 1], 1)),
        ("conv negative padding", lambda: F.conv_bias_relu(x, w3, None, [1, 1], [-1, 0], [1, 1],
                                                           1)),
        ("conv huge padding", lambda: F.conv_bias_relu(x, w3, None, [1, 1], [big, big], [1, 1],
                                                       1)),
        ("conv huge dilation", lambda: F.conv_bias_relu(x, w3, None, [1, 1], [1, 1], [big, 1],
                                                        1)),
        ("conv input too small", lambda: F.conv_bias_relu(x[..., :2, :2], w3, None, [1, 1],
                                                          [0, 0], [1, 1], 1)),
        ("conv zero groups", lambda: F.conv_bias_relu(x, w3, None, [1, 1], [0, 0], [1, 1], 0)),
        ("conv channel mismatch", lambda: F.conv_bias_relu(x, torch.randn(4, 3, 3, 3), None,
                                                           [1, 1], [1, 1], [1, 1], 1)),
        ("conv weight dtype", lambda: F.conv_bias_relu(x, w3.double(), None, [1, 1], [1, 1],
                                                       [1, 1], 1)),
        ("conv bias dtype", lambda: F.conv_bias_relu(x, w3, torch.zeros(4, dtype=torch.float64),
                                                     [1, 1], [1, 1], [1, 1], 1)),
        ("conv bias shape", lambda: F.conv_bias_relu(x, w3, torch.zeros(5), [1, 1], [1, 1],
                                                     [1, 1], 1)),
        ("conv 1 stride value", lambda: F.conv_bias_relu(x, w3, None, [1], [1, 1], [1, 1], 1)),
        ("conv backward grad shape", lambda: F.conv_bias_relu_backward(
            torch.randn(1, 4, 5, 5), torch.randn(1, 4, 6, 6), x, w3, [1, 1], [0, 0], [1, 1], 1,
            True, [True, True, True])),
        ("stats 3-D", lambda: F.bn_stats(x[0])),
        ("stats bool", lambda: F.bn_stats(x > 0)),
        ("bn_relu mean length", lambda: F.bn_relu(x, torch.zeros(3), o3, None, None, 1e-5,
                                                  True)),
        ("bn_relu weight length", lambda: F.bn_relu(x, z3, o3, torch.ones(5), None, 1e-5,
                                                    True)),
        ("bn_relu negative eps", lambda: F.bn_relu(x, z3, o3, None, None, -1.0, True)),
        ("bn_relu nan eps", lambda: F.bn_relu(x, z3, o3, None, None, float("nan"), True)),
        ("bn_relu int mean", lambda: F.bn_relu(x, z3.long(), o3, None, None, 1e-5, True)),
        ("reduce shape mismatch", lambda: F.bn_relu_backward_reduce(
            torch.randn(1, 2, 8, 7), x, z3, o3, None, None, 1e-5, True)),
        ("elemt zero count", lambda: F.bn_relu_backward_elemt(x, x, z3, o3, None, None, z3, z3,
                                                              0, 1e-5, True)),
        ("elemt sums length", lambda: F.bn_relu_backward_elemt(x, x, z3, o3, None, None,
                                                               torch.zeros(3), z3, 64, 1e-5,
                                                               True)),
        ("running count 1", lambda: F.bn_update_running_stats(z3.clone(), o3.clone(), z3, o3,
                                                              0.1, 1)),
        ("running lengths", lambda: F.bn_update_running_stats(z3.clone(), torch.ones(3), z3, o3,
                                                              0.1, 10)),
        ("running expanded", lambda: F.bn_update_running_stats(torch.zeros(1).expand(2),
                                                               o3.clone(), z3, o3, 0.1, 10)),
        ("running int", lambda: F.bn_update_running_stats(z3.long(), o3.long(), z3, o3, 0.1,
                                                          10)),
    ]


def _accept_odd_but_valid():
    """Legal but unusual calls (empty, expanded, odd strides): they must simply work."""
    F = torch.ops.fastunet
    x = torch.randn(2, 6, 20, 30)[:, ::2, ::3, ::2]
    return [
        ("extract empty batch", lambda: F.tile_extract(torch.randn(0, 1, 8, 8), 4, 4, 2, 2)),
        ("extract no channels", lambda: F.tile_extract(torch.randn(1, 0, 8, 8), 4, 4, 2, 2)),
        ("extract expanded", lambda: F.tile_extract(torch.randn(1, 1, 1, 1).expand(2, 3, 9, 9),
                                                    4, 4, 2, 2)),
        ("extract huge stride", lambda: F.tile_extract(torch.randn(1, 1, 8, 8), 4, 4, 2 ** 62,
                                                       2 ** 62)),
        ("extract nan/inf", lambda: F.tile_extract(torch.tensor(
            [[[[float("nan"), float("inf")] * 4] * 8]]), 4, 4, 2, 2)),
        ("aggregate empty", lambda: F.tile_aggregate(torch.randn(0, 1, 4, 4), 0, 8, 8, 4, 4)),
        ("aggregate expanded", lambda: F.tile_aggregate(
            torch.randn(1, 1, 1, 1).expand(4, 2, 4, 4), 1, 8, 8, 4, 4)),
        ("argmax empty", lambda: F.tile_aggregate_argmax(torch.randn(0, 2, 4, 4), 0, 8, 8, 4, 4)),
        ("conv strided input", lambda: F.conv_bias_relu(x, torch.randn(4, 3, 3, 3), None,
                                                        [1, 1], [1, 1], [1, 1], 1)),
        ("conv empty batch", lambda: F.conv_bias_relu(torch.randn(0, 3, 8, 8),
                                                      torch.randn(4, 3, 3, 3), None, [1, 1],
                                                      [1, 1], [1, 1], 1)),
        ("stats empty", lambda: F.bn_stats(torch.randn(0, 3, 4, 4))),
        ("stats huge values", lambda: F.bn_stats(torch.full((2, 3, 4, 4), 1e38))),
        ("stats expanded", lambda: F.bn_stats(torch.randn(1, 3, 1, 1).expand(2, 3, 4, 4))),
        ("bn_relu empty", lambda: F.bn_relu(torch.randn(0, 3, 4, 4), torch.zeros(3),
                                            torch.ones(3), None, None, 1e-5, True)),
    ]


@st.composite
def malformed_tile_args(draw):
    """Integer arguments of the tile ops anywhere from very negative to very large."""
    ints = st.one_of(st.integers(-3, 12), st.sampled_from([-2 ** 62, 2 ** 31, 2 ** 40, 2 ** 62]))
    shape = [draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 9)),
             draw(st.integers(0, 9))]
    return shape, [draw(ints) for _ in range(5)], draw(st.booleans())


def _child(examples):
    """Runs in a fresh process (see test_malformed_arguments_never_crash): a crash shows up as
    a signal exit code; anything but success or RuntimeError/ValueError is a failure."""
    for name, call in _malformed_calls():
        print(name, flush=True)
        try:
            call()
        except (RuntimeError, ValueError) as exc:
            assert str(exc).strip(), f"{name}: empty message"
        else:
            raise AssertionError(f"{name}: accepted")
    for name, call in _accept_odd_but_valid():
        print(name, flush=True)
        call()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(args=malformed_tile_args())
    def fuzz(args):
        shape, (a, b, c, d, e), weighted = args
        t = torch.randn(shape)
        weight = torch.rand(max(shape[2], 1), max(shape[3], 1)) if weighted else None
        print("fuzz", shape, a, b, c, d, e, weighted, flush=True)
        for call in (lambda: torch.ops.fastunet.tile_extract(t, a, b, c, d, weight),
                     lambda: torch.ops.fastunet.tile_aggregate(t, a, b, c, d, e, weight),
                     lambda: torch.ops.fastunet.tile_aggregate_argmax(t, a, b, c, d, e, weight)):
            try:
                call()
            except (RuntimeError, ValueError) as exc:
                assert str(exc).strip()

    fuzz()
    print("done", flush=True)


def test_malformed_arguments_never_crash():
    # a child process, so that a segfault fails this test instead of killing pytest
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(max(EXAMPLES * 8, 100))],
                          capture_output=True, text=True, timeout=600, cwd=root, env=env)
    last = proc.stdout.strip().splitlines()[-1:] or ["(nothing)"]
    assert proc.returncode == 0, (f"exit {proc.returncode} after {last[0]!r}:\n"
                                  f"{proc.stderr[-3000:]}")
    assert last == ["done"]


@pytest.mark.parametrize("name, call", _malformed_calls(), ids=[n for n, _ in _malformed_calls()])
def test_malformed_arguments_raise_with_a_message(name, call):
    with pytest.raises((RuntimeError, ValueError)) as info:
        call()
    assert len(str(info.value).strip()) > 10


@pytest.mark.cuda
def test_mismatched_devices_raise():
    x = torch.randn(1, 2, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="is on"):
        ops.tile_extract(x, 4, 2, weight=torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="is on"):
        ops.tile_aggregate(torch.randn(9, 2, 4, 4, device="cuda"), 1, 8, 8, 2,
                           weight=torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="is on"):
        ops.bn_relu(x, torch.zeros(2), torch.ones(2, device="cuda"), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="is on|device"):
        ops.conv_bias_relu(x, torch.randn(4, 2, 3, 3), None, 1, 1)


if __name__ == "__main__":
    _child(int(sys.argv[1]))

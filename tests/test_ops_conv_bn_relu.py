"""Conv-BN-ReLU ops against the unfused PyTorch modules and the reference, over dtypes, layouts,
awkward sizes, the model's conv geometries; gradcheck, opcheck, running statistics, errors."""
import pytest
import torch
import torch.nn.functional as F

from fastunet import _native, ops
from fastunet.ops import conv_bn_relu_reference as ref

needs_native = pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")


# fp32 comparisons on CUDA without TF32 (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("exact_fp32_on_cuda")

# (N, C, H, W): odd sizes, batch 1, 1x1 spatial with a batch, a UNet-like 64-channel map
SHAPES = [(2, 5, 7, 9), (1, 3, 13, 11), (4, 6, 1, 1), (2, 64, 16, 16)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = ["contiguous", "channels_last", "permuted"]
# conv geometries the model uses: (in, out, kernel, stride, padding, dilation)
CONVS = [(6, 8, 3, 1, 1, 1), (6, 8, 1, 1, 0, 1), (6, 4, 3, 1, 12, 12), (6, 4, 3, 1, 24, 24),
         (6, 4, 3, 1, 36, 36), (6, 8, 3, 2, 1, 1)]
CONV_IDS = ["k{2}s{3}p{4}d{5}".format(*c) for c in CONVS]


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "permuted":  # neither NCHW nor NHWC strides
        return t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    return t


def torch_bn_relu(x, weight, bias, eps=1e-5, relu=True):
    """The unfused modules' function: F.batch_norm with batch statistics, then ReLU."""
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mem", LAYOUTS)
def test_bn_stats(device, shape, mem):
    torch.manual_seed(0)
    x = layout(torch.randn(*shape, dtype=torch.float64, device=device) * 3 + 2, mem)
    mean, var = ops.bn_stats(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    m32, v32 = ops.bn_stats(x.float())
    assert m32.dtype == v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), var, rtol=1e-5, atol=1e-6)


def test_bn_stats_large_offset_is_stable(device):
    # mean 1e4, std 1: a naive float32 sum-of-squares would lose the variance entirely
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, device=device) + 1e4
    _, var = ops.bn_stats(x.float())
    torch.testing.assert_close(var.double(), x.float().double().var((0, 2, 3), unbiased=False),
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mem", LAYOUTS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_batch_norm_relu_forward_backward(device, shape, mem, relu, affine):
    torch.manual_seed(1)
    x = layout(torch.randn(*shape, dtype=torch.float64, device=device), mem).requires_grad_()
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64, device=device).add(0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64, device=device).requires_grad_() if affine else None
    y = ops.batch_norm_relu(x, w, b, relu=relu)
    assert y.is_contiguous(memory_format=ref.layout(x))
    leaves = [t for t in (x, w, b) if t is not None]
    clones = [t.detach().clone().requires_grad_() for t in leaves]
    xr, wr, br = (clones + [None, None])[:3] if affine else (clones[0], None, None)
    expected = torch_bn_relu(xr, wr, br, relu=relu)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(expected, clones, g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape, mem", [((8, 4, 64, 64), "contiguous"),
                                        ((8, 40, 32, 32), "channels_last"),
                                        ((3, 2, 257, 131), "contiguous")],
                         ids=["nchw-many-splits", "nhwc-many-splits", "nchw-split-mid-plane"])
def test_large_reductions_split_across_blocks(device, shape, mem):
    """Enough values per channel that the CUDA reductions use many blocks per channel."""
    torch.manual_seed(12)
    x = layout(torch.randn(*shape, dtype=torch.float64, device=device) * 2 + 3, mem)
    x.requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, device=device, requires_grad=True)
    y = ops.batch_norm_relu(x, w, b)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    expected = torch_bn_relu(xr, wr, br)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g),
                         torch.autograd.grad(expected, (xr, wr, br), g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
def test_backward_pieces_match_reference(device, mem):
    torch.manual_seed(2)
    x = layout(torch.randn(3, 6, 9, 7, dtype=torch.float64, device=device), mem)
    g = torch.randn(3, 6, 9, 7, dtype=torch.float64, device=device)  # NCHW grad for any x
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(6, dtype=torch.float64, device=device)
    mean, var = ops.bn_stats(x)
    sums = ops.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)
    want = ref.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)
    for got, exp in zip(sums, want):
        torch.testing.assert_close(got, exp)
    gx = ops.bn_relu_backward_elemt(g, x, mean, var, w, b, *sums, 3 * 9 * 7, 1e-5)
    torch.testing.assert_close(gx, ref.bn_relu_backward_elemt(g, x, mean, var, w, b, *want,
                                                              3 * 9 * 7, 1e-5))
    assert gx.is_contiguous(memory_format=ref.layout(x))


def _unaligned(t):
    """t's values, laid out as t, in storage starting one element into an allocation: the data
    pointer is not 16-byte aligned, so the CUDA kernels must take their one-value path."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = torch.as_strided(base, t.shape, t.stride(), storage_offset=1)
    return out.copy_(t)


def _bn_problem(shape, mem, device, seed, dtype=torch.float32):
    """(x, grad, weight, bias) of a BN(+ReLU) problem: x and grad in the layout `mem`."""
    torch.manual_seed(seed)
    x = layout((torch.randn(*shape, device=device) * 2 + 1).to(dtype), mem)
    g = layout(torch.randn(*shape, device=device).to(dtype), mem)
    return x, g, torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)


# (N, C, H, W): 16-byte vectors in both layouts (C and HW multiples of 8); in NHWC only
# (C = 24, HW = 25); in neither (odd C and HW)
PATH_SHAPES = [(4, 16, 8, 8), (2, 24, 5, 5), (3, 5, 3, 7)]


@pytest.mark.parametrize("shape", PATH_SHAPES, ids=["vectors", "nhwc-vectors", "scalar"])
@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_vector_and_scalar_paths_match_reference(device, shape, mem, dtype, aligned):
    """Every BN piece on each access path of the CUDA kernels (vector widths, layouts, a data
    pointer off the 16-byte grid) against the reference on the same input."""
    x, g, w, b = _bn_problem(shape, mem, device, 21, dtype)
    if not aligned:
        x, g = _unaligned(x), _unaligned(g)
    close = ({} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5))
    out_close = close if dtype != torch.bfloat16 else dict(rtol=1.6e-2, atol=2e-2)
    mean, var = ops.bn_stats(x)
    for got, want in zip((mean, var), ref.bn_stats(x)):
        torch.testing.assert_close(got, want, **close)
    y = ops.bn_relu(x, mean, var, w, b, 1e-5)
    torch.testing.assert_close(y, ref.bn_relu(x, mean, var, w, b, 1e-5), **out_close)
    sums = ops.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)
    want = ref.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)
    scale = max(1.0, max(t.abs().max().item() for t in want))
    for got, exp in zip(sums, want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * scale)
    count = shape[0] * shape[2] * shape[3]
    gx = ops.bn_relu_backward_elemt(g, x, mean, var, w, b, *want, count, 1e-5)
    torch.testing.assert_close(gx, ref.bn_relu_backward_elemt(g, x, mean, var, w, b, *want,
                                                              count, 1e-5), **out_close)


@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
def test_many_channels_keep_their_coefficients(device, mem):
    # more channels than the CUDA elementwise kernels keep in shared memory (a global table)
    x, g, w, b = _bn_problem((2, 3000, 2, 3), mem, device, 22)
    mean, var = ops.bn_stats(x)
    torch.testing.assert_close(ops.bn_relu(x, mean, var, w, b, 1e-5),
                               ref.bn_relu(x, mean, var, w, b, 1e-5))
    sums = ref.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)
    torch.testing.assert_close(ops.bn_relu_backward_elemt(g, x, mean, var, w, b, *sums, 12, 1e-5),
                               ref.bn_relu_backward_elemt(g, x, mean, var, w, b, *sums, 12, 1e-5))


@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
def test_reductions_repeat_bit_for_bit(device, mem):
    # many blocks per channel on a GPU: the last block merges the partials in a fixed order
    x, g, w, b = _bn_problem((16, 64, 32, 32), mem, device, 23)
    runs = []
    for _ in range(3):
        mean, var = ops.bn_stats(x)
        runs.append((mean, var, *ops.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)))
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


@needs_native
@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [16, 5])
def test_bias_relu_in_place(device, mem, dtype, channels):
    torch.manual_seed(24)
    y = layout(torch.randn(2, channels, 5, 8, device=device).to(dtype), mem)
    bias = torch.randn(channels, device=device).to(dtype)
    # what conv(bias) then relu_ computes: the sum rounded to dtype, then the ReLU
    expected = torch.relu((y.float() + bias.float().view(1, -1, 1, 1)).to(dtype))
    ptr, strides = y.data_ptr(), y.stride()
    torch.ops.fastunet._bias_relu_(y, bias)
    assert y.data_ptr() == ptr and y.stride() == strides
    assert torch.equal(y, expected)


@needs_native
def test_bias_relu_checks_and_opcheck(device):
    y = torch.randn(2, 4, 5, 6, device=device)
    b = torch.randn(4, device=device)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        torch.ops.fastunet._bias_relu_(y.transpose(2, 3), b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.fastunet._bias_relu_(y, torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastunet._bias_relu_(y, b.double())
    for inp in (y, y.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.fastunet._bias_relu_.default, (inp.clone(), b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_pytorch(device, dtype):
    """flash-attention's rule: error vs fp64 at most 2x PyTorch's same-precision error (+eps)."""
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("half precision training is a CUDA feature")
    torch.manual_seed(3)
    x64 = torch.randn(4, 32, 24, 24, dtype=torch.float64, device=device) * 2 + 0.5
    w64 = torch.rand(32, dtype=torch.float64, device=device) + 0.5
    b64 = torch.randn(32, dtype=torch.float64, device=device) * 0.1
    g64 = torch.randn_like(x64)

    def run(fn, x, w, b):
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
        b = b.detach().requires_grad_()
        y = fn(x, w, b)
        return [y.double()] + [t.double() for t in torch.autograd.grad(y, (x, w, b), g64.to(y.dtype))]

    exact = run(torch_bn_relu, x64, w64, b64)
    low = x64.to(dtype)  # AMP: half activations, float32 BN parameters
    ours = run(lambda *a: ops.batch_norm_relu(*a), low, w64.float(), b64.float())
    theirs = run(torch_bn_relu, low, w64.float(), b64.float())
    for name, e, o, t in zip(["y", "dx", "dweight", "dbias"], exact, ours, theirs):
        scale = e.abs().max().item()
        err_ours = (o - e).abs().max().item()
        err_theirs = (t - e).abs().max().item()
        assert err_ours <= 2 * err_theirs + torch.finfo(dtype).eps * scale, (name, err_ours,
                                                                             err_theirs)


def test_gradcheck_batch_norm_relu(device):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.batch_norm_relu(*a), (x, w, b))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ops.batch_norm_relu(*a, relu=False), (cl, w, b))


def test_gradcheck_conv_bn_relu_train(device):
    torch.manual_seed(5)
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    cw = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    cb = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda *a: ops.conv_bn_relu_train(*a, None, None, 1, 1, 1, 1)
    # gradcheck also runs backward twice and demands identical results; cuDNN may pick a
    # non-deterministic weight-gradient algorithm (seen on an H100: "Backward is not reentrant"
    # with correct gradients), so pin deterministic algorithms as torch's own tests do.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        assert torch.autograd.gradcheck(fn, (x, cw, cb, w, b))


@pytest.mark.parametrize("geom", CONVS, ids=CONV_IDS)
@pytest.mark.parametrize("mem", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bias_relu(device, geom, mem, dtype):
    cin, cout, k, s, p, d = geom
    torch.manual_seed(6)
    x = layout(torch.randn(2, cin, 37, 41, dtype=dtype, device=device), mem)
    w = torch.randn(cout, cin, k, k, dtype=dtype, device=device)
    b = torch.randn(cout, dtype=dtype, device=device)
    y = ops.conv_bias_relu(x, w, b, s, p, d)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, torch.relu(F.conv2d(x, w, b, s, p, d)), **tol)
    assert y.is_contiguous(memory_format=ref.layout(x))
    plain = ops.conv_bias_relu(x, w, None, s, p, d, relu=False)
    torch.testing.assert_close(plain, F.conv2d(x, w, None, s, p, d), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
@pytest.mark.cuda
def test_conv_bias_relu_half_within_twice_cudnn(dtype, mem):
    torch.manual_seed(7)
    x64 = torch.randn(4, 32, 33, 31, dtype=torch.float64, device="cuda")
    w64 = torch.randn(48, 32, 3, 3, dtype=torch.float64, device="cuda") * 0.1
    b64 = torch.randn(48, dtype=torch.float64, device="cuda")
    exact = torch.relu(F.conv2d(x64, w64, b64, 1, 1))
    x = layout(x64.to(dtype), mem)
    ours = ops.conv_bias_relu(x, w64.to(dtype), b64.to(dtype), 1, 1, 1).double()
    theirs = torch.relu(F.conv2d(x, w64.to(dtype), b64.to(dtype), 1, 1)).double()
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + torch.finfo(dtype).eps


def test_conv_bias_relu_gradcheck(device):
    torch.manual_seed(8)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.conv_bias_relu(*a, 1, 2, 2), (x, w, b))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_conv_bias_relu_with_onednn_packed_weight():
    from fastunet.nn.conv_bn_relu import pack_for_onednn

    torch.manual_seed(9)
    conv = torch.nn.Conv2d(16, 8, 3, padding=2, dilation=2)
    w, b = conv.weight.detach(), conv.bias.detach()
    for shape, mem in [((2, 16, 20, 24), "contiguous"), ((1, 16, 9, 7), "channels_last")]:
        x = layout(torch.randn(*shape), mem)
        packed = pack_for_onednn(w, conv, layout(torch.randn(4, 16, 64, 64), "channels_last"))
        if packed is None or not _native.LOADED:
            pytest.skip("no oneDNN weight packing here")
        y = ops.conv_bias_relu(x, packed, b, 1, 2, 2)
        assert y.is_contiguous(memory_format=ref.layout(x))
        torch.testing.assert_close(y, torch.relu(conv(x)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_update_running_stats_matches_batchnorm(device, momentum):
    torch.manual_seed(10)
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).to(device)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        x = torch.randn(3, 5, 4, 6, device=device) * 2 + 1
        bn(x)
        mean, var = ops.bn_stats(x)
        ops.bn_update_running_stats(rm, rv, mean, var, momentum, 3 * 4 * 6)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)


def _opcheck_samples(device):
    torch.manual_seed(11)
    x = torch.randn(2, 4, 5, 6, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(4, device=device) + 0.5
    b = torch.randn(4, device=device)
    mean, var = ops.bn_stats(x)
    g = torch.randn_like(x)
    sdy, sdyx = ops.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5)
    cw = torch.randn(3, 4, 3, 3, device=device)
    cb = torch.randn(3, device=device)
    out = ops.conv_bias_relu(x, cw, cb, 1, 1, 1)
    s = []
    for inp in (x, cl):
        s.append(("bn_stats", (inp,)))
        s.append(("bn_relu", (inp, mean, var, w, b, 1e-5, True)))
        s.append(("bn_relu", (inp, mean, var, None, None, 1e-5, False)))
        s.append(("bn_relu_backward_reduce", (g, inp, mean, var, w, b, 1e-5, True)))
        s.append(("bn_relu_backward_elemt", (g, inp, mean, var, w, b, sdy, sdyx, 60, 1e-5, True)))
        s.append(("conv_bias_relu", (inp.clone().requires_grad_(), cw.clone().requires_grad_(),
                                     cb.clone().requires_grad_(), [1, 1], [1, 1], [1, 1], 1, True)))
        s.append(("conv_bias_relu", (inp, cw, None, [2, 1], [0, 2], [1, 2], 1, False)))
    s.append(("conv_bias_relu_backward", (torch.randn_like(out), out, x, cw, [1, 1], [1, 1],
                                          [1, 1], 1, True, [True, True, True])))
    s.append(("conv_bias_relu_backward", (torch.randn_like(out), out, x, cw, [1, 1], [1, 1],
                                          [1, 1], 1, True, [False, True, False])))
    s.append(("bn_update_running_stats", (torch.zeros(4, device=device),
                                          torch.ones(4, device=device), mean, var, 0.1, 60)))
    return s


@needs_native
def test_opcheck(device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.fastunet, name).default, args)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.bn_stats(torch.randn(2, 3, 4)), "4-D"),
    (lambda: ops.bn_stats(torch.ones(2, 3, 4, 4, dtype=torch.int64)), "floating"),
    (lambda: ops.bn_relu(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(3), None, None,
                         1e-5), "shape"),
    (lambda: ops.bn_relu(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), None, None,
                         0.0), "eps"),
    (lambda: ops.conv_bias_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3)), "channels"),
    (lambda: ops.bn_update_running_stats(torch.zeros(3), torch.ones(3), torch.zeros(3),
                                         torch.ones(3), 0.1, 1), "more than 1"),
])
def test_bad_arguments_raise(call, message):
    if not _native.LOADED:
        pytest.skip("argument checks of the native kernels")
    with pytest.raises(RuntimeError, match=message):
        call()

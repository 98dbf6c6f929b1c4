"""The CPU Winograd convolution behind fastunet.ops.conv_bias_relu (csrc/cpu/winograd_kernel.cpp;
which layers take it: fastunet/conv_plan.py).

Error bounds, relative to the largest output magnitude, against a float64 F.conv2d:
- F(2x2,3x3): 1e-5. Its transforms use only +-1 and 0.5, so the error is that of the fp32
  products (measured <= 3e-7 here).
- F(4x4,3x3): 5e-5. Its transforms have coefficients up to 8 (A^T), 5 (B^T) and 1/24 (G), which
  amplify the fp32 rounding of the transformed values by about two orders of magnitude
  (measured <= 7e-6 here); a direct fp32 conv is at ~1e-6. End to end the fused model still
  matches the unfused one to 1e-4 (tests/test_nn_fused_segmentor.py, bench_inference.py).
"""

import pytest
import torch
import torch.nn.functional as F

from fastunet import _native, ops, settings

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")

BOUND = {2: 1e-5, 4: 5e-5}


# conv_bias_relu takes Winograd only where the AVX-512 matrix kernel runs (tests/test_cpu_isa.py
# checks the other ISAs fall back to oneDNN)
DISPATCHES = pytest.mark.skipif(not (_native.LOADED and _native._C.winograd_fast_kernel()),
                                reason="Winograd is dispatched only with AVX-512")
CL = torch.channels_last


def _op(*args, **kwargs):
    return torch.ops.fastunet._winograd_conv3x3(*args, **kwargs)


def _conv(x, w, b, relu=True):
    return ops.conv_bias_relu(x, w, b, 1, 1, 1, 1, relu)


def _reference(x, w, b, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    return y.relu() if relu else y


def _rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _inputs(n, cin, cout, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=CL)
    wt = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
    b = torch.randn(cout, generator=g)
    return x, wt, b


SHAPES = [  # (N, Cin, Cout, H, W): 1x1 and 2x2 images, odd/even/non-square, odd channel counts
    (1, 3, 5, 1, 1), (1, 17, 130, 2, 2), (2, 64, 64, 7, 9), (1, 130, 17, 5, 4),
    (3, 16, 64, 6, 13), (1, 64, 130, 12, 12)]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_conv2d(shape, tile, relu, with_bias):
    x, w, b = _inputs(*shape)
    b = b if with_bias else None
    y = _op(x, w, b, relu, tile)
    assert y.shape == (shape[0], shape[2], shape[3], shape[4])
    assert y.is_contiguous(memory_format=CL)
    assert _rel_err(y, _reference(x, w, b, relu)) <= BOUND[tile]


@DISPATCHES  # the AVX-512 matrix kernel's sums do not depend on the block; at::bmm_out's may
@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_block_size_does_not_change_the_result(block):
    x, w, b = _inputs(2, 32, 48, 9, 11)
    auto = _op(x, w, b, True, 4)
    assert torch.equal(_op(x, w, b, True, 4, block), auto)


def test_nchw_input_and_packed_weight():
    x, w, b = _inputs(1, 32, 64, 10, 10)
    expected = _op(x, w, b, True, 4)
    assert torch.equal(_op(x.contiguous(), w, b, True, 4), expected)
    if torch.backends.mkldnn.is_available():
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1],
                                                           1, list(x.shape))
        assert torch.equal(_op(x, packed, b, True, 4), expected)


def test_nonfinite_inputs_propagate():
    """A NaN reaches every output a direct conv would spoil; Winograd also spoils the rest of the
    output tiles whose input tiles hold it (a property of the method: every transformed value
    mixes the whole tile), and nothing beyond them."""
    x, w, b = _inputs(1, 32, 32, 12, 12)
    x[0, 3, 5, 5] = float("nan")  # inside the input tiles of output tiles rows/cols 0-3, 4-7
    y = _op(x, w, b, False, 4)
    ref = F.conv2d(x, w, b, padding=1)
    assert (y.isnan() | ~ref.isnan()).all()
    assert not y[:, :, 8:, :].isnan().any() and not y[:, :, :, 8:].isnan().any()


# ------------------------------------------------------------------------ dispatch in the op
DISPATCHED = (2, 32, 48, 32, 32)  # 2 * 8 * 8 = 128 tiles of 4x4: Winograd per the rule


@DISPATCHES
def test_conv_bias_relu_dispatches_and_the_switch_turns_it_off():
    x, w, b = _inputs(*DISPATCHED)
    ref = _reference(x, w, b, True)
    on = _conv(x, w, b)
    assert torch.equal(on, _op(x, w, b, True, 4))
    with settings.override(winograd=False):
        off = _conv(x, w, b)
    assert not torch.equal(off, on)  # oneDNN's rounding differs from Winograd's
    assert _rel_err(off, ref) <= 1e-5 and _rel_err(on, ref) <= BOUND[4]
    # the native op itself never decides: it is the oneDNN path
    raw = torch.ops.fastunet.conv_bias_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1, True)
    assert torch.equal(raw, off)


@DISPATCHES
def test_gradients_through_winograd_are_atens():
    """Autograd through a Winograd layer (a conv trained under an eval-mode BN): ATen's
    convolution backward on the ReLU-masked gradient, as for the oneDNN path."""
    x, w, b = _inputs(*DISPATCHED)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    _conv(*leaves).square().sum().backward()
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    _reference(*ref, True).square().sum().backward()
    for got, want in zip(leaves, ref):
        assert _rel_err(got.grad, want.grad) <= BOUND[4]


@DISPATCHES
@pytest.mark.parametrize("n, hw, tile", [(2, 32, 4), (2, 16, 4), (2, 8, 2), (8, 4, 2), (4, 16, 4),
                                         (1, 8, 0), (2, 4, 0)])
def test_small_maps_take_f2_then_onednn(n, hw, tile):
    """F(4x4) from 32 of its tiles, else F(2x2) from 32 of its tiles, else oneDNN (the rule of
    fastunet/conv_plan.py, measured against packed-weight oneDNN)."""
    x, w, b = _inputs(n, 64, 64, hw, hw)
    got = _conv(x, w, b)
    if tile:
        assert torch.equal(got, _op(x, w, b, True, tile))
    else:
        with settings.override(winograd=False):
            assert torch.equal(got, _conv(x, w, b))


@pytest.mark.parametrize("case", ["nchw", "3-channel", "few-tiles", "stride2", "1x1"])
def test_conv_bias_relu_keeps_onednn_where_winograd_is_not_faster(case):
    n, cin, cout, h, w_ = DISPATCHED
    stride, pad, k = 1, 1, 3
    if case == "3-channel":
        cin = 3
    elif case == "few-tiles":  # 2 x 2 x 2 = 8 tiles of 2x2: too few for either variant
        h = w_ = 4
    elif case == "stride2":
        stride = 2
    elif case == "1x1":
        k, pad = 1, 0
    x, _, b = _inputs(n, cin, cout, h, w_)
    if case == "nchw":
        x = x.contiguous()
    w = torch.randn(cout, cin, k, k) * 0.1
    args = ([stride] * 2, [pad] * 2, [1, 1], 1, True)
    on = ops.conv_bias_relu(x, w, b, *args)
    with settings.override(winograd=False):
        assert torch.equal(ops.conv_bias_relu(x, w, b, *args), on)


# ----------------------------------------------------------------- the weight-transform cache
def test_in_place_weight_change_is_seen():
    x, w, b = _inputs(*DISPATCHED)
    _conv(x, w, b)  # caches the transform of w
    with torch.no_grad():
        w.mul_(-0.5)  # bumps w's version counter
    assert _rel_err(_conv(x, w, b), _reference(x, w, b, True)) <= BOUND[4]


def test_new_weight_tensors_are_seen():
    x, w, b = _inputs(*DISPATCHED)
    for seed in range(3):  # fresh tensors, possibly at a freed one's address
        w = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 0.05
        assert _rel_err(_conv(x, w, b), _reference(x, w, b, True)) <= BOUND[4]


def test_inference_tensors_are_not_cached():
    x, w, b = _inputs(*DISPATCHED)
    with torch.inference_mode():
        wi = w.clone()  # an inference tensor: no version counter
        _conv(x, wi, b)
        wi.mul_(-0.5)
        assert _rel_err(_conv(x, wi, b), _reference(x, wi, b, True)) <= BOUND[4]


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", ["tile", "kernel", "channels", "dtype", "bias"])
def test_bad_arguments_raise(bad):
    x, w, b = _inputs(1, 8, 8, 4, 4)
    tile = 3 if bad == "tile" else 4
    if bad == "kernel":
        w = torch.randn(8, 8, 1, 1)
    elif bad == "channels":
        w = torch.randn(8, 4, 3, 3)
    elif bad == "dtype":
        x = x.double()
    elif bad == "bias":
        b = torch.randn(5)
    with pytest.raises(RuntimeError, match="winograd_conv3x3"):
        _op(x, w, b, True, tile)


def test_opcheck():
    x, w, b = _inputs(1, 16, 24, 6, 7)
    torch.library.opcheck(torch.ops.fastunet._winograd_conv3x3.default, (x, w, b, True, 4, 0))

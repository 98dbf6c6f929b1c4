"""tile_extract / tile_aggregate against mmseg's slide loop, over awkward grids, dtypes, layouts."""
import math

import pytest
import torch

from fastunet import _native, ops
from fastunet.ops import tile_reference as ref

# (H, W, tile_h, tile_w, stride_h, stride_w)
GRIDS = [
    (97, 131, 64, 64, 42, 42),    # odd sizes, DRIVE crop/stride
    (64, 64, 64, 64, 42, 42),     # image equals the window: one window
    (50, 70, 50, 64, 42, 42),     # window clipped to an image smaller than the crop
    (100, 90, 30, 20, 40, 25),    # stride larger than the window: uncovered gaps
    (127, 127, 64, 64, 63, 63),   # 1-pixel overlaps
    (37, 53, 16, 24, 5, 7),       # H != W, many windows per pixel
    (5, 7, 1, 1, 1, 1),           # 1x1 windows
]
IDS = ["x".join(map(str, g)) for g in GRIDS]


def spec_loop(image_fn, batch, channels, H, W, hc, wc, hs, ws, dtype=torch.float64):
    """mmseg's slide_inference loop: crop, run, add, count, divide. Written out from mmseg's
    code, independently of tile_reference on purpose: it is the oracle the reference is
    checked against.

    image_fn(y1, x1, y2, x2) -> window."""
    h_grids = max(H - hc + hs - 1, 0) // hs + 1
    w_grids = max(W - wc + ws - 1, 0) // ws + 1
    logits = torch.zeros(batch, channels, H, W, dtype=dtype)
    count = torch.zeros(H, W, dtype=dtype)
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * hs, j * ws
            y2, x2 = min(y1 + hc, H), min(x1 + wc, W)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            logits[:, :, y1:y2, x1:x2] += image_fn(y1, x1, y2, x2)
            count[y1:y2, x1:x2] += 1
    return logits / count, count


def gaussian(th, tw, dtype=torch.float64):
    gy = torch.exp(-0.5 * ((torch.arange(th, dtype=dtype) - (th - 1) / 2) / (th / 8)) ** 2)
    gx = torch.exp(-0.5 * ((torch.arange(tw, dtype=dtype) - (tw - 1) / 2) / (tw / 8)) ** 2)
    return gy[:, None] * gx[None, :]


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "permuted":  # a non-contiguous view with the same values
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
def test_window_starts_follow_spec(grid):
    H, W, th, tw, sh, sw = grid
    seen = []
    spec_loop(lambda y1, x1, y2, x2: seen.append((y1, x1)) or 0.0, 1, 1, H, W, th, tw, sh, sw)
    starts = [(y, x) for y in ref.window_starts(H, th, sh) for x in ref.window_starts(W, tw, sw)]
    assert seen == starts


@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
def test_reference_aggregate_equals_spec_loop(grid):
    H, W, th, tw, sh, sw = grid
    torch.manual_seed(0)
    img = torch.randn(2, 3, H, W, dtype=torch.float64)
    expected, count = spec_loop(lambda y1, x1, y2, x2: img[:, :, y1:y2, x1:x2] * 2, 2, 3, H, W,
                                th, tw, sh, sw)
    tiles = ref.tile_extract(img * 2, th, tw, sh, sw)
    got = ref.tile_aggregate(tiles, 2, H, W, sh, sw)
    covered = count > 0
    torch.testing.assert_close(got[..., covered], expected[..., covered])
    assert (got[..., ~covered] == 0).all()


@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "gaussian"])
@pytest.mark.parametrize("normalize", [True, False], ids=["avg", "sum"])
@pytest.mark.parametrize("mem", ["contiguous", "channels_last", "permuted"])
def test_ops_match_reference(device, grid, weighted, normalize, mem):
    H, W, th, tw, sh, sw = grid
    torch.manual_seed(1)
    w = gaussian(th, tw).to(device) if weighted else None
    img = layout(torch.randn(2, 3, H, W, dtype=torch.float64, device=device), mem)
    tiles = ops.tile_extract(img, (th, tw), (sh, sw), weight=w, normalize=normalize)
    torch.testing.assert_close(tiles, ref.tile_extract(img, th, tw, sh, sw, w, normalize))
    tiles = layout(torch.randn_like(tiles), mem)
    out = ops.tile_aggregate(tiles, 2, H, W, (sh, sw), weight=w, normalize=normalize)
    torch.testing.assert_close(out, ref.tile_aggregate(tiles, 2, H, W, sh, sw, w, normalize))


@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
def test_float32_average_is_bitwise_the_spec_loop(device, grid):
    # float32 windows are summed in float32 in the reference's order, then divided by the
    # count: the very numbers mmseg's loop produces, not merely close ones
    H, W, th, tw, sh, sw = grid
    torch.manual_seed(7)
    img = torch.randn(1, 2, H, W)
    tiles = ref.tile_extract(img, th, tw, sh, sw) * 3 + 1
    expected = ref.tile_aggregate(tiles, 1, H, W, sh, sw)
    assert torch.equal(ops.tile_aggregate(tiles.to(device), 1, H, W, (sh, sw)).cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_reference(device, dtype):
    # flash-attention's rule: our error vs fp64 at most 2x PyTorch's same-precision error (+eps).
    H, W, th, tw, sh, sw = 97, 131, 64, 64, 42, 42
    torch.manual_seed(2)
    tiles64 = torch.randn(2 * 2 * 3, 2, th, tw, dtype=torch.float64, device=device)
    w = gaussian(th, tw).to(device)
    exact = ref.tile_aggregate(tiles64, 2, H, W, sh, sw, w, True)
    low = tiles64.to(dtype)
    ours = ops.tile_aggregate(low, 2, H, W, (sh, sw), weight=w).double()
    naive = torch.zeros(2, 2, H, W, dtype=dtype, device=device)  # same-precision PyTorch loop
    norm = torch.zeros(H, W, dtype=dtype, device=device)
    grid = low.reshape(2, 2, 3, 2, th, tw) * w.to(dtype)
    for i, y in enumerate(ref.window_starts(H, th, sh)):
        for j, x in enumerate(ref.window_starts(W, tw, sw)):
            naive[:, :, y:y + th, x:x + tw] += grid[:, i, j]
            norm[y:y + th, x:x + tw] += w.to(dtype)
    naive_err = (naive / norm).double().sub(exact).abs().max().item()
    ours_err = ours.sub(exact).abs().max().item()
    assert ours_err <= 2 * naive_err + torch.finfo(dtype).eps


def test_batch_of_one_and_empty(device):
    img = torch.randn(1, 2, 40, 40, device=device)
    tiles = ops.tile_extract(img, 32, 16)
    assert tiles.shape == (4, 2, 32, 32)
    torch.testing.assert_close(ops.tile_aggregate(tiles, 1, 40, 40, 16), img)
    empty = torch.randn(0, 2, 40, 40, device=device)
    assert ops.tile_extract(empty, 32, 16).shape == (0, 2, 32, 32)
    assert ops.tile_aggregate(torch.empty(0, 2, 32, 32, device=device), 0, 40, 40, 16).shape == (
        0, 2, 40, 40)


@pytest.mark.parametrize("grid", [GRIDS[0], GRIDS[3], GRIDS[5]], ids=[IDS[0], IDS[3], IDS[5]])
def test_ops_are_adjoint(device, grid):
    H, W, th, tw, sh, sw = grid
    torch.manual_seed(3)
    w = gaussian(th, tw).to(device)
    x = torch.randn(2, 2, H, W, dtype=torch.float64, device=device)
    t = torch.randn_like(ops.tile_extract(x, (th, tw), (sh, sw)))
    lhs = (ops.tile_aggregate(t, 2, H, W, (sh, sw), weight=w) * x).sum()
    rhs = (t * ops.tile_extract(x, (th, tw), (sh, sw), weight=w, normalize=True)).sum()
    assert math.isclose(lhs.item(), rhs.item(), rel_tol=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(device, weighted, normalize):
    H, W, th, tw, sh, sw = 11, 13, 6, 5, 4, 3
    w = gaussian(th, tw).to(device) if weighted else None
    img = torch.randn(2, 2, H, W, dtype=torch.float64, device=device, requires_grad=True)
    tiles = torch.randn(2 * 3 * 4, 2, th, tw, dtype=torch.float64, device=device,
                        requires_grad=True)
    agg = lambda t: ops.tile_aggregate(t, 2, H, W, (sh, sw), weight=w, normalize=normalize)
    ext = lambda x: ops.tile_extract(x, (th, tw), (sh, sw), weight=w, normalize=normalize)
    assert torch.autograd.gradcheck(agg, (tiles,))
    assert torch.autograd.gradcheck(ext, (img,))
    assert torch.autograd.gradgradcheck(agg, (tiles,))


@pytest.mark.skipif(not _native.LOADED, reason="opcheck needs the native ops")
@pytest.mark.parametrize("grid", [GRIDS[0], GRIDS[2], GRIDS[3]], ids=[IDS[0], IDS[2], IDS[3]])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(device, grid, weighted):
    H, W, th, tw, sh, sw = grid
    w = gaussian(th, tw, torch.float32).to(device) if weighted else None
    img = torch.randn(1, 2, H, W, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastunet.tile_extract.default,
                          (img, th, tw, sh, sw, w, weighted))
    tiles = ops.tile_extract(img.detach(), (th, tw), (sh, sw)).requires_grad_()
    torch.library.opcheck(torch.ops.fastunet.tile_aggregate.default,
                          (tiles, 1, H, W, sh, sw, w, True, False))


@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "gaussian"])
@pytest.mark.parametrize("epilogue", ["softmax", "argmax"])
def test_epilogues_match_reference(device, grid, weighted, epilogue):
    H, W, th, tw, sh, sw = grid
    torch.manual_seed(4)
    w = gaussian(th, tw).to(device) if weighted else None
    n = ref.window_count(H, th, sh) * ref.window_count(W, tw, sw)
    tiles = layout(torch.randn(2 * n, 3, th, tw, dtype=torch.float64, device=device), "permuted")
    got = ops.tile_aggregate(tiles, 2, H, W, (sh, sw), weight=w, epilogue=epilogue)
    expected = ref.tile_aggregate(tiles, 2, H, W, sh, sw, w, True, epilogue)
    if epilogue == "argmax":
        assert got.dtype == torch.uint8 and got.shape == (2, H, W)
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected)


def test_epilogues_follow_spec_loop():
    # softmax / argmax of the slide loop's average; uncovered pixels: uniform probabilities, label 0
    H, W, th, tw, sh, sw = 100, 90, 30, 20, 40, 25
    torch.manual_seed(5)
    img = torch.randn(1, 3, H, W, dtype=torch.float64)
    avg, count = spec_loop(lambda y1, x1, y2, x2: img[:, :, y1:y2, x1:x2], 1, 3, H, W, th, tw,
                           sh, sw)
    tiles = ops.tile_extract(img, (th, tw), (sh, sw))
    covered = count > 0
    probs = ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue="softmax")
    labels = ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue="argmax")
    torch.testing.assert_close(probs[..., covered], avg.softmax(1)[..., covered])
    assert torch.equal(labels[0][covered], avg.argmax(1)[0][covered].to(torch.uint8))
    assert (probs[..., ~covered] == 1 / 3).all() and (labels[0][~covered] == 0).all()


def test_argmax_ties_and_nan_like_torch(device):
    # equal classes -> first index; NaN counts as the largest (torch.argmax)
    tiles = torch.zeros(1, 3, 4, 4, device=device)
    tiles[0, 1, 0, 0] = float("nan")
    tiles[0, 2, 1, 1] = 1.0
    tiles[0, 1, 2, 2] = 1.0
    tiles[0, 2, 2, 2] = 1.0
    labels = ops.tile_aggregate(tiles, 1, 4, 4, 4, epilogue="argmax")
    assert torch.equal(labels[0].long(), tiles[0].argmax(0))
    assert labels[0, 0, 0] == 1 and labels[0, 1, 1] == 2 and labels[0, 2, 2] == 1
    assert labels[0, 3, 3] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_argmax_of_low_precision_tiles(device, dtype):
    # the average is taken in float32, then compared: same labels as the float32 reference
    H, W, th, tw, sh, sw = 97, 131, 64, 64, 42, 42
    torch.manual_seed(6)
    tiles = torch.randn(6, 2, th, tw, device=device).to(dtype)
    got = ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue="argmax")
    expected = ref.tile_aggregate(tiles.float(), 1, H, W, sh, sw, None, True, "argmax")
    assert torch.equal(got, expected)


def test_gaussian_weight():
    w = ops.gaussian_weight((64, 48))
    assert w.shape == (64, 48) and w.dtype == torch.float32
    torch.testing.assert_close(w, w.flip(0))  # centred
    torch.testing.assert_close(w, w.flip(1))
    torch.testing.assert_close(w, gaussian(64, 48).float())  # sigma = size / 8
    odd = ops.gaussian_weight(33, dtype=torch.float64)
    assert odd[16, 16] == 1.0 and odd.max() == 1.0
    # one sigma (33/8 pixels) from the centre along an axis: exp(-1/2)
    r = torch.arange(33, dtype=torch.float64) - 16
    torch.testing.assert_close(odd[16], torch.exp(-0.5 * (r / (33 / 8)) ** 2))
    assert (w > 0).all()
    with pytest.raises(ValueError, match="positive"):
        ops.gaussian_weight(0)


def test_bad_epilogue_and_too_many_classes():
    tiles = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="epilogue"):
        ops.tile_aggregate(tiles, 1, 8, 8, 8, epilogue="max")
    if _native.LOADED:
        with pytest.raises(RuntimeError, match="256"):
            ops.tile_aggregate(torch.randn(1, 257, 4, 4), 1, 4, 4, 4, epilogue="argmax")


@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_epilogue_gradcheck(device, weighted):
    H, W, th, tw, sh, sw = 11, 13, 6, 5, 4, 3
    w = gaussian(th, tw).to(device) if weighted else None
    tiles = torch.randn(2 * 3 * 4, 3, th, tw, dtype=torch.float64, device=device,
                        requires_grad=True)
    f = lambda t: ops.tile_aggregate(t, 2, H, W, (sh, sw), weight=w, epilogue="softmax")
    assert torch.autograd.gradcheck(f, (tiles,))
    assert torch.autograd.gradgradcheck(f, (tiles,))


def test_argmax_output_does_not_require_grad(device):
    tiles = torch.randn(4, 2, 8, 8, device=device, requires_grad=True)
    labels = ops.tile_aggregate(tiles, 1, 12, 12, 4, epilogue="argmax")
    assert labels.dtype == torch.uint8 and not labels.requires_grad


@pytest.mark.skipif(not _native.LOADED, reason="opcheck needs the native ops")
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_epilogues(device, weighted):
    H, W, th, tw, sh, sw = GRIDS[0]
    w = gaussian(th, tw, torch.float32).to(device) if weighted else None
    tiles = torch.randn(6, 2, th, tw, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastunet.tile_aggregate.default,
                          (tiles, 1, H, W, sh, sw, w, True, True))
    torch.library.opcheck(torch.ops.fastunet.tile_aggregate_argmax.default,
                          (tiles.detach(), 1, H, W, sh, sw, w))


@pytest.mark.parametrize("call, message", [
    (lambda: ops.tile_extract(torch.randn(1, 1, 20, 20), 32, 8), "fit in the image"),
    (lambda: ops.tile_extract(torch.randn(1, 1, 20, 20), 8, 0), "stride"),
    (lambda: ops.tile_extract(torch.randn(1, 20, 20), 8, 4), "4-D"),
    (lambda: ops.tile_extract(torch.ones(1, 1, 20, 20, dtype=torch.int64), 8, 4), "floating"),
    (lambda: ops.tile_aggregate(torch.randn(3, 1, 8, 8), 1, 20, 20, 4), "expected 16 windows"),
    (lambda: ops.tile_aggregate(torch.randn(16, 1, 8, 8), 1, 20, 20, 4,
                                weight=torch.ones(4, 4)), "shape"),
])
def test_bad_arguments_raise(call, message):
    if not _native.LOADED and message in ("4-D", "floating", "shape"):
        pytest.skip("checked by the native kernels only")
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.slow
@pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")
def test_torch_compile_fullgraph(device):
    def f(x):
        t = ops.tile_extract(x, (16, 16), (10, 10))
        n, _, h, w = x.shape
        avg = ops.tile_aggregate(t * 2 + 1, n, h, w, (10, 10))
        probs = ops.tile_aggregate(t, n, h, w, (10, 10), epilogue="softmax")
        labels = ops.tile_aggregate(t, n, h, w, (10, 10), epilogue="argmax")
        return avg, probs, labels

    x = torch.randn(2, 3, 37, 41, device=device)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


# ---------------------------------------------------------------------------- out=
@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
@pytest.mark.parametrize("epilogue", ["none", "softmax", "argmax"])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "gaussian"])
def test_out_equals_allocating_form(device, grid, epilogue, weighted):
    # bitwise: the same kernel writes into the caller's buffer; whatever was there is overwritten
    H, W, th, tw, sh, sw = grid
    torch.manual_seed(8)
    n = ref.window_count(H, th, sh) * ref.window_count(W, tw, sw)
    w = gaussian(th, tw, torch.float32).to(device) if weighted else None
    tiles = torch.randn(2 * n, 3, th, tw, device=device)
    for normalize in (True, False):
        expected = ops.tile_aggregate(tiles, 2, H, W, (sh, sw), weight=w, normalize=normalize,
                                      epilogue=epilogue)
        out = torch.full_like(expected, 7)
        got = ops.tile_aggregate(tiles, 2, H, W, (sh, sw), weight=w, normalize=normalize,
                                 epilogue=epilogue, out=out)
        assert got is out and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("epilogue", ["none", "softmax", "argmax"])
def test_out_equals_allocating_form_dtypes(device, dtype, epilogue):
    H, W, th, tw, sh, sw = GRIDS[0]
    torch.manual_seed(9)
    tiles = layout(torch.randn(6, 2, th, tw, device=device).to(dtype), "permuted")
    expected = ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue=epilogue)
    out = torch.empty_like(expected)
    ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue=epilogue, out=out)
    assert torch.equal(out, expected)


def test_out_reuse_across_calls(device):
    # one buffer, two different inputs: the second result owes nothing to the first
    H, W, th, tw, sh, sw = GRIDS[3]
    n = ref.window_count(H, th, sh) * ref.window_count(W, tw, sw)
    a, b = torch.randn(2, n, 2, th, tw, device=device)
    out = torch.empty(1, 2, H, W, device=device)
    ops.tile_aggregate(a, 1, H, W, (sh, sw), out=out)
    first = out.clone()
    ops.tile_aggregate(b, 1, H, W, (sh, sw), out=out)
    assert torch.equal(first, ops.tile_aggregate(a, 1, H, W, (sh, sw)))
    assert torch.equal(out, ops.tile_aggregate(b, 1, H, W, (sh, sw)))


def test_out_on_the_reference_path(monkeypatch):
    # without the native kernels the wrapper honours out= (and its checks) all the same
    H, W, th, tw, sh, sw = GRIDS[0]
    tiles = torch.randn(6, 2, th, tw)
    expected = ref.tile_aggregate(tiles, 1, H, W, sh, sw, None, True, "softmax")
    monkeypatch.setattr(_native, "use_native", lambda t: False)
    out = torch.empty(1, 2, H, W)
    assert ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue="softmax", out=out) is out
    assert torch.equal(out, expected)
    labels = torch.empty(1, H, W, dtype=torch.uint8)
    ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue="argmax", out=labels)
    assert torch.equal(labels, ref.tile_aggregate(tiles, 1, H, W, sh, sw, None, True, "argmax"))
    with pytest.raises(RuntimeError, match="shape"):
        ops.tile_aggregate(tiles, 1, H, W, (sh, sw), out=torch.empty(1, 2, H, W + 1))


def _bad_outs(device):
    H, W, th, tw, sh, sw = GRIDS[0]
    tiles = torch.randn(6, 2, th, tw, device=device)
    good = (1, 2, H, W)
    shared = torch.empty(tiles.numel() + 2 * H * W, device=device)
    overlap_tiles = shared[:tiles.numel()].view_as(tiles)
    other = "cuda" if device == "cpu" and torch.cuda.is_available() else "meta"
    return tiles, (H, W, sh, sw), [
        (torch.empty(1, 2, H, W + 1, device=device), "none", "shape"),
        (torch.empty(2, 2, H, W, device=device), "none", "shape"),
        (torch.empty(good, dtype=torch.float64, device=device), "none", "float32|Float"),
        (torch.empty(good, device=device), "argmax", "Byte|uint8"),
        (torch.empty(1, H, W, dtype=torch.uint8, device=device), "none", "float32|Float"),
        (torch.empty(1, 2, W, H, device=device).transpose(2, 3), "none", "contiguous"),
        (torch.empty(good, device=device).contiguous(memory_format=torch.channels_last), "softmax",
         "contiguous"),
        (torch.empty(good, device=other), "none", "device|is on"),
    ], (overlap_tiles, shared[10:10 + 2 * H * W].view(good))


def test_out_bad_arguments_raise(device):
    tiles, (H, W, sh, sw), cases, (overlap_tiles, overlap_out) = _bad_outs(device)
    for out, epilogue, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.tile_aggregate(tiles, 1, H, W, (sh, sw), epilogue=epilogue, out=out)
    overlap_tiles.copy_(tiles)
    if _native.LOADED:  # the kernels also refuse an out that overlaps what they read
        with pytest.raises(RuntimeError, match="shares memory"):
            ops.tile_aggregate(overlap_tiles, 1, H, W, (sh, sw), out=overlap_out)
        with pytest.raises(RuntimeError, match="shape"):  # the op itself, not only the wrapper
            torch.ops.fastunet.tile_aggregate_into(tiles, 1, H, W, sh, sw, None, True, "none",
                                                   out=torch.empty(1, 2, H, 1, device=device))
        with pytest.raises(RuntimeError, match="uint8|Byte"):
            torch.ops.fastunet.tile_aggregate_into(tiles, 1, H, W, sh, sw, None, True, "argmax",
                                                   out=torch.empty(1, H, W, device=device))
        with pytest.raises(RuntimeError, match="epilogue"):
            torch.ops.fastunet.tile_aggregate_into(tiles, 1, H, W, sh, sw, None, True, "max",
                                                   out=torch.empty(1, 2, H, W, device=device))
    with pytest.raises(TypeError, match="out must be a tensor"):
        ops.tile_aggregate(tiles, 1, H, W, (sh, sw), out=[0])


def test_out_refuses_autograd(device):
    H, W, th, tw, sh, sw = GRIDS[0]
    tiles = torch.randn(6, 2, th, tw, device=device, requires_grad=True)
    out = torch.empty(1, 2, H, W, device=device)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.tile_aggregate(tiles, 1, H, W, (sh, sw), out=out)
    with torch.no_grad():  # fine when no gradient is wanted
        ops.tile_aggregate(tiles, 1, H, W, (sh, sw), out=out)
    assert torch.equal(out, ops.tile_aggregate(tiles.detach(), 1, H, W, (sh, sw)))


@pytest.mark.skipif(not _native.LOADED, reason="opcheck needs the native ops")
@pytest.mark.parametrize("grid", [GRIDS[0], GRIDS[3]], ids=[IDS[0], IDS[3]])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_into(device, grid, weighted):
    H, W, th, tw, sh, sw = grid
    n = ref.window_count(H, th, sh) * ref.window_count(W, tw, sw)
    w = gaussian(th, tw, torch.float32).to(device) if weighted else None
    tiles = torch.randn(2 * n, 2, th, tw, device=device)
    for epilogue in ("none", "softmax"):
        torch.library.opcheck(torch.ops.fastunet.tile_aggregate_into.default,
                              (tiles, 2, H, W, sh, sw, w, True, epilogue),
                              {"out": torch.empty(2, 2, H, W, device=device)})
    torch.library.opcheck(torch.ops.fastunet.tile_aggregate_into.default,
                          (tiles, 2, H, W, sh, sw, w, True, "argmax"),
                          {"out": torch.empty(2, H, W, dtype=torch.uint8, device=device)})


@pytest.mark.slow
@pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")
def test_torch_compile_fullgraph_into(device):
    def f(t, out, labels):
        ops.tile_aggregate(t * 2, 1, 37, 41, (10, 10), out=out)
        ops.tile_aggregate(t, 1, 37, 41, (10, 10), epilogue="argmax", out=labels)
        return out + 1

    t = ops.tile_extract(torch.randn(1, 3, 37, 41, device=device), (16, 16), (10, 10))
    out, labels = torch.empty(1, 3, 37, 41, device=device), torch.empty(
        1, 37, 41, dtype=torch.uint8, device=device)
    got = torch.compile(f, fullgraph=True)(t, out, labels)
    torch.testing.assert_close(got, ops.tile_aggregate(t * 2, 1, 37, 41, (10, 10)) + 1)
    assert torch.equal(out, ops.tile_aggregate(t * 2, 1, 37, 41, (10, 10)))
    assert torch.equal(labels, ops.tile_aggregate(t, 1, 37, 41, (10, 10), epilogue="argmax"))

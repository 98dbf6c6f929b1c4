"""The window engine: slide == mmseg's loop, streaming == on-device, overlap-tile/whole/TTA
geometry and symmetry, memory planning, errors. A tiny conv net stands in for the UNet."""
import pytest
import torch
import torch.nn.functional as F

from fastunet import ops
from fastunet.inference import engine as eng
from fastunet.inference import geometry
from fastunet.inference import InferenceEngine, infer
from fastunet.inference import planner
from fastunet.ops import tile_reference as ref
from fastunet.ops.tile_reference import slide_inference as reference_slide_inference


class TinyNet(torch.nn.Module):
    """Two 3x3 convs (receptive radius 2), 2 classes; optionally insists on sizes % 16 == 0
    like UNet-S5-D16, so a window the engine forgot to pad fails loudly."""

    def __init__(self, strict16=True, hidden=4, classes=2):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, hidden, 3, padding=1)
        self.b = torch.nn.Conv2d(hidden, classes, 3, padding=1)
        self.strict16 = strict16
        self.calls = []

    def forward(self, x):
        if self.strict16:
            assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0, x.shape
        self.calls.append(tuple(x.shape))
        return self.b(torch.relu(self.a(x)))


def spec_slide(fn, x, crop, stride):
    """mmseg's loop with slice-adds (bitwise the same as its pad-and-add, much faster); the
    crops go through fn in one batch, as one-at-a-time forwards of a tiny net are slow here."""
    (hc, wc), (hs, ws) = crop, stride
    n, _, H, W = x.shape
    boxes = [(y, x1, y + hc, x1 + wc) for y in ref.window_starts(H, hc, hs)
             for x1 in ref.window_starts(W, wc, ws)]
    logits = fn(torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes]))
    logits = logits.reshape(len(boxes), n, *logits.shape[1:])
    out, count = torch.zeros(n, logits.shape[2], H, W), torch.zeros(1, 1, H, W)
    for (y1, x1, y2, x2), logit in zip(boxes, logits):
        out[:, :, y1:y2, x1:x2] += logit
        count[:, :, y1:y2, x1:x2] += 1
    return out / count


def close(got, expected, rtol=1e-5):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# (name, H, W, crop, stride) of mmseg's published configs
DATASETS = [("drive", 584, 565, 64, 42), ("stare", 605, 700, 128, 85),
            pytest.param("hrf", 2336, 3504, 256, 170, marks=pytest.mark.slow)]


def test_slide_equals_mmseg_loop():
    # mmseg's loop pads every window to the full image: keep the image small (DRIVE's grid
    # shape in miniature: odd size, border windows moved back)
    net = TinyNet()
    H, W, crop, stride = 197, 230, 64, 42
    x = torch.randn(2, 3, H, W)
    expected = reference_slide_inference(net, x, crop, stride)
    got = infer(net, x, "slide", crop, stride)
    assert got.dtype == torch.float32 and got.shape == (2, 2, H, W)
    close(got, expected)


@pytest.mark.parametrize("name, H, W, crop, stride", DATASETS, ids=["drive", "stare", "hrf"])
def test_slide_equals_spec_loop(name, H, W, crop, stride):
    net = TinyNet()
    x = torch.randn(1, 3, H, W)
    expected = spec_slide(net, x, (crop, crop), (stride, stride))
    engine = InferenceEngine(net, "slide", crop, stride)
    engine(x[:, :, :crop, :crop])  # the probe's calls
    net.calls.clear()
    got = engine(x)
    close(got, expected)
    windows = ref.window_count(H, crop, stride) * ref.window_count(W, crop, stride) * x.shape[0]
    batches = [c[0] for c in net.calls]
    # on the CPU every window runs once: no padding windows, and batch sizes differ by <= 1
    assert sum(batches) == windows and max(batches) - min(batches) <= 1
    assert len(batches) < windows  # batched


def test_window_batch_sizes_agree():
    net = TinyNet()
    x = torch.randn(2, 3, 150, 170)
    outs = [infer(net, x, "slide", 64, 42, window_batch=b) for b in (1, 5, 1000, None)]
    for out in outs[1:]:
        close(out, outs[0], rtol=1e-6)


@pytest.mark.parametrize("output", ["logits", "probs", "labels"])
def test_streaming_bands_equal_single_pass(output):
    net = TinyNet()
    x = torch.randn(2, 3, 230, 200)
    full = InferenceEngine(net, "slide", 64, 42)(x, output)
    logits = InferenceEngine(net, "slide", 64, 42)(x)
    for rows in (1, 2, 5):
        streamed = InferenceEngine(net, "slide", 64, 42, band_rows=rows)(x, output)
        if output == "labels":
            margin = (logits[:, 1] - logits[:, 0]).abs()
            sure = margin > 1e-5  # band sums round differently; only near-ties may flip
            assert torch.equal(streamed[sure], full[sure])
        else:
            close(streamed, full, rtol=1e-6)


def test_streams_to_cpu_when_device_memory_is_short(monkeypatch):
    net = TinyNet()
    x = torch.randn(1, 3, 400, 300)
    full = infer(net, x, "slide", 64, 42)
    engine = InferenceEngine(net, "slide", 64, 42, memory_fraction=1.0)
    monkeypatch.setattr(eng, "_available_bytes", lambda device: 3 << 20)
    close(engine(x), full, rtol=1e-6)
    assert engine.last_schedule.streamed  # several bands
    assert engine.last_schedule.band_rows < ref.window_count(400, 64, 42)


def test_output_kinds_follow_logits():
    net = TinyNet(classes=3)
    x = torch.randn(1, 3, 130, 100)
    engine = InferenceEngine(net, "slide", 64, 42)
    logits = engine(x)
    torch.testing.assert_close(engine(x, "probs"), logits.softmax(1))
    labels = engine(x, "labels")
    assert labels.dtype == torch.uint8 and labels.shape == (1, 130, 100)
    assert torch.equal(labels.long(), logits.argmax(1))


@pytest.mark.parametrize("mode, size, output, prob_class", [
    ("slide", (130, 100), ("labels", "probs"), 1),   # the Predictor's call: the average is consumed
    ("slide", (130, 100), ("logits", "labels"), None),  # logits returned: the average is the result
    ("whole", (50, 70), "logits", None),              # canvas padded to 16, result cropped (a copy)
    ("slide", (40, 50), "labels", None),              # smaller than the crop: fused, then cropped
    ("slide", (130, 100), "probs", None),             # returned as aggregated: never a reused one
])
def test_reused_aggregate_buffer_never_leaks_into_results(mode, size, output, prob_class):
    # successive same-size images reuse one CPU aggregate where only copies of it are returned;
    # what a call returned stays as it was after the next call overwrites that buffer
    net = TinyNet(classes=3)
    engine = InferenceEngine(net, mode, 64, 42) if mode == "slide" else InferenceEngine(net, mode)
    fresh = lambda x: (InferenceEngine(net, mode, 64, 42) if mode == "slide"
                       else InferenceEngine(net, mode))(x, output, prob_class=prob_class)
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)
    x1, x2 = torch.randn(2, 1, 3, *size)
    first = as_tuple(engine(x1, output, prob_class=prob_class))
    kept = [t.clone() for t in first]
    buffers = list(engine._out_buffers.values())
    second = as_tuple(engine(x2, output, prob_class=prob_class))
    for got, expected in zip(first + second, kept + list(as_tuple(fresh(x2)))):
        assert torch.equal(got, expected)
    assert not torch.equal(first[0], second[0])  # different images, different results
    returned = {t.untyped_storage().data_ptr() for t in first + second}
    for buffer in buffers:  # reused, and never handed out
        kept_now = list(engine._out_buffers.values())
        assert len(kept_now) == 1 and kept_now[0] is buffer
        assert buffer.untyped_storage().data_ptr() not in returned
    consumed = prob_class is not None or size != (130, 100)
    assert len(buffers) == consumed


def test_slide_small_image_pads_to_16_and_crops_back():
    net = TinyNet()
    # 48x32 < crop 64 and multiples of 16: mmseg's windows are the image itself -> identical
    x = torch.randn(1, 3, 48, 32)
    close(infer(net, x, "slide", 64, 42), reference_slide_inference(net, x, 64, 42))
    # 50x70: mmseg's window would be 50x64, which the UNet rejects: pad rows to 64, crop back
    x = torch.randn(1, 3, 50, 70)
    engine = InferenceEngine(net, "slide", 64, 42)
    plan = engine.plan(50, 70)
    assert (plan.y.window, plan.y.canvas, plan.y.pad_after, plan.y.count) == (64, 64, 14, 1)
    assert (plan.x.window, plan.x.canvas, plan.x.pad_after, plan.x.count) == (64, 70, 0, 2)
    padded = F.pad(x, (0, 0, 0, 14))
    expected = spec_slide(net, padded, (64, 64), (42, 42))[..., :50, :]
    close(engine(x), expected)
    with pytest.raises(AssertionError):  # what mmseg would have run, and the UNet rejects
        reference_slide_inference(net, x, 64, 42)


def test_whole_reflect_pads_to_16_runs_once_and_crops():
    net = TinyNet()
    x = torch.randn(2, 3, 37, 50)
    net.calls.clear()
    got = infer(net, x, "whole")
    assert net.calls[-1] == (2, 3, 48, 64)
    close(got, net(F.pad(x, (0, 14, 0, 11), mode="reflect"))[..., :37, :50])
    tiny = torch.randn(1, 3, 5, 3)  # pads longer than the image mirror again and again
    close(infer(net, tiny, "whole"), net(geometry.pad(tiny, geometry.TilePlan(
        "whole", geometry.whole_axis(5, 16), geometry.whole_axis(3, 16), "reflect")))[..., :5, :3])
    uint8 = torch.randint(0, 256, (1, 3, 37, 50), dtype=torch.uint8)  # normalised in the engine
    mean, std = (120.0, 110.0, 100.0), (50.0, 55.0, 60.0)
    norm = (uint8.float() - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    close(InferenceEngine(net, "whole")(uint8, normalize=(mean, std)), infer(net, norm, "whole"))


@pytest.mark.parametrize("H, W", [(100, 150), (40, 30), (61, 250)])
def test_overlap_tile_gives_every_pixel_full_context(H, W):
    # A net with receptive radius 2 <= margin is exactly translation-equivariant away from its
    # own zero padding, so overlap-tile must equal the net on the reflect-padded whole image.
    net = TinyNet(strict16=True)
    engine = InferenceEngine(net, "overlap-tile", tile_size=64, margin=8)
    x = torch.randn(1, 3, H, W)
    plan = engine.plan(H, W)
    for a in (plan.y, plan.x):
        assert a.window % 16 == 0 and a.tile == a.window - 2 * a.margin and a.margin == 8
    big = F.pad(x, (8, 8, 8, 8), mode="reflect")
    expected = TinyNet(strict16=False)(big)[..., 8:8 + H, 8:8 + W]
    close(engine(x), expected)


def test_overlap_tile_uses_large_tiles():
    net = TinyNet()
    engine = InferenceEngine(net, "overlap-tile")  # tile 1024, margin 32
    plan = engine.plan(584, 565)  # DRIVE: one tile
    assert plan.windows_per_image == 1 and (plan.y.window, plan.x.window) == (656, 640)
    plan = engine.plan(2336, 3504)  # HRF: 3 x 4 tiles of 1024
    assert (plan.y.count, plan.x.count, plan.y.window) == (3, 4, 1024)


def test_reflect_padding_larger_than_the_image():
    net = TinyNet()
    x = torch.randn(1, 3, 5, 3)
    out = infer(net, x, "overlap-tile", tile_size=64, margin=20)
    assert out.shape == (1, 2, 5, 3) and torch.isfinite(out).all()


def test_tta_is_flip_equivariant_on_symmetric_grids():
    net = TinyNet()
    # W = 148: window starts 0, 42, 84 mirror onto themselves; H likewise
    x = torch.randn(1, 3, 148, 148)
    for tta, dims in (("h", (-1,)), ("v", (-2,)), ("hv", (-2, -1))):
        engine = InferenceEngine(net, "slide", 64, 42, tta=tta)
        close(engine(x.flip(dims)), engine(x).flip(dims), rtol=1e-5)
    whole = InferenceEngine(net, "whole", tta=True)
    y = torch.randn(1, 3, 64, 80)
    close(whole(y.flip(-1)), whole(y).flip(-1))
    close(whole(y.flip(-2)), whole(y).flip(-2))
    # TTA averages the un-flipped outputs of the flipped windows
    expected = (net(y) + net(y.flip(-1)).flip(-1) + net(y.flip(-2)).flip(-2)
                + net(y.flip(-2, -1)).flip(-2, -1)) / 4
    close(whole(y), expected)


def test_gaussian_weighting_matches_reference_aggregation():
    net = TinyNet()
    x = torch.randn(1, 3, 150, 130)
    got = infer(net, x, "slide", 64, 42, gaussian=True)
    windows = ops.tile_extract(x, 64, 42)
    expected = ref.tile_aggregate(net(windows), 1, 150, 130, 42, 42,
                                  ops.gaussian_weight(64), True)
    close(got, expected)
    assert not torch.allclose(got, infer(net, x, "slide", 64, 42))


def test_channels_last_and_bf16():
    net = TinyNet()
    x = torch.randn(1, 3, 100, 90)
    base = infer(net, x, "slide", 64, 42)
    close(infer(net.to(memory_format=torch.channels_last), x, "slide", 64, 42,
                channels_last=True), base)
    low = infer(net, x, "slide", 64, 42, precision="bf16")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, base, rtol=0.05, atol=0.05)


def test_window_function_errors_are_clear():
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="shape"):
        infer(lambda w: w[:, :2, ::2, ::2], x, "slide", 64, 42)
    with pytest.raises(ValueError, match="mode"):
        InferenceEngine(TinyNet(), "sliding", 64, 42)
    with pytest.raises(ValueError, match="crop_size and stride"):
        InferenceEngine(TinyNet(), "slide")
    with pytest.raises(ValueError, match="multiple of size_divisor"):
        InferenceEngine(TinyNet(), "slide", 100, 50)
    with pytest.raises(ValueError, match="tile_size"):
        InferenceEngine(TinyNet(), "overlap-tile", tile_size=60)
    with pytest.raises(ValueError, match="precision"):
        InferenceEngine(TinyNet(), "whole", precision="int8")
    with pytest.raises(ValueError, match="cuda_graphs"):
        InferenceEngine(TinyNet(), "whole", cuda_graphs="yes")
    with pytest.raises(ValueError, match="normalised float tensor"):
        InferenceEngine(TinyNet(), "whole")(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_batch_sizing_balances_the_last_batch():
    net = TinyNet()
    engine = InferenceEngine(net, "slide", 64, 42, window_batch=64)
    engine(torch.randn(1, 3, 64, 64))  # the probe's calls
    net.calls.clear()
    engine(torch.randn(1, 3, 584, 565))  # 182 windows: 61 + 61 + 60, not 64 + 64 + 54
    assert [c[0] for c in net.calls] == [61, 61, 60]


def test_batch_pixels_are_capped(monkeypatch):
    # large batches of large windows overflow int32 indexing in some PyTorch kernels
    monkeypatch.setattr(planner, "MAX_BATCH_PIXELS", 3 * 64 * 64)
    net = TinyNet()
    engine = InferenceEngine(net, "slide", 64, 42, window_batch=100)
    engine(torch.randn(1, 3, 64, 64))  # the probe's calls
    net.calls.clear()
    engine(torch.randn(1, 3, 200, 200))
    assert engine.last_schedule.window_batch == 3
    assert [c[0] for c in net.calls] == [3] * 7 + [2] * 2  # 25 windows in 9 forwards


@pytest.mark.cuda
def test_cuda_matches_cpu_and_graphs_match_eager():
    net = TinyNet()
    x = torch.randn(2, 3, 300, 260)
    expected = infer(net, x, "slide", 64, 42)
    gpu = TinyNet().cuda()
    xc = x.cuda()
    close(infer(gpu, xc, "slide", 64, 42).cpu(), expected, rtol=1e-4)
    graphed = InferenceEngine(gpu, "slide", 64, 42, cuda_graphs=True, window_batch=16)
    close(graphed(xc).cpu(), expected, rtol=1e-4)
    close(graphed(xc).cpu(), expected, rtol=1e-4)  # replayed
    auto = InferenceEngine(gpu, "slide", 64, 42, window_batch=16)  # graphs on the 2nd image
    for _ in range(3):
        close(auto(xc).cpu(), expected, rtol=1e-4)
    assert len(auto._graphs) == 1
    streamed = InferenceEngine(gpu, "slide", 64, 42, output_device="cpu", band_rows=2)(xc)
    assert streamed.device.type == "cpu"
    close(streamed, expected, rtol=1e-4)


# ---------------------------------------------------------------- bounded memory

@pytest.mark.parametrize("mode, size", [("overlap-tile", (5, 3)), ("overlap-tile", (1, 40)),
                                        ("overlap-tile", (70, 90)), ("slide", (50, 70)),
                                        ("whole", (37, 50))])
def test_band_rows_equal_the_padded_image(mode, size):
    engine = InferenceEngine(TinyNet(), mode, 64, 42, tile_size=64, margin=20)
    plan = engine.plan(*size)
    x = torch.randn(2, 3, *size)
    full = geometry.pad(x, plan)
    for p0, p1 in ((0, full.shape[2]), (1, 7), (full.shape[2] - 5, full.shape[2])):
        assert torch.equal(geometry.input_rows(x, plan, p0, p1, lambda t: t), full[:, :, p0:p1])


@pytest.mark.parametrize("mode, kw", [("slide", {"gaussian": True}),
                                      ("overlap-tile", {"tile_size": 64, "margin": 8}),
                                      ("overlap-tile", {"tile_size": 64, "margin": 8,
                                                        "gaussian": True})])
def test_streaming_equals_single_pass_in_every_mode(mode, kw):
    x = torch.randn(1, 3, 230, 150)
    full = InferenceEngine(TinyNet(), mode, 64, 42, **kw)(x)
    for rows in (1, 2):
        close(InferenceEngine(TinyNet(), mode, 64, 42, band_rows=rows, **kw)(x), full,
              rtol=1e-6)


def test_raw_pixels_are_normalised_band_by_band():
    mean, std = (120.0, 110.0, 100.0), (50.0, 55.0, 60.0)
    raw = torch.randint(0, 256, (1, 3, 200, 170), dtype=torch.uint8)
    x = (raw.float() - torch.tensor(mean).view(1, 3, 1, 1)) * (
        1.0 / torch.tensor(std).view(1, 3, 1, 1))
    expected = InferenceEngine(TinyNet(), "slide", 64, 42)(x)
    for rows in (None, 1):
        engine = InferenceEngine(TinyNet(), "slide", 64, 42, band_rows=rows)
        logits, labels, p1 = engine(raw, ("logits", "labels", "probs"), normalize=(mean, std),
                                    prob_class=1)
        close(logits, expected, rtol=1e-6)
        assert torch.equal(labels.long(), logits.argmax(1))
        close(p1, logits.softmax(1)[:, 1], rtol=1e-6)
    assert raw.dtype == torch.uint8  # the caller's tensor is untouched
    with pytest.raises(ValueError, match="std must be positive"):
        engine(raw, normalize=(mean, (1.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match="prob_class"):
        engine(raw, "probs", normalize=(mean, std), prob_class=2)
    with pytest.raises(ValueError, match="output must be"):
        engine(raw, ("labels", "nope"), normalize=(mean, std))


def test_buffer_cap_streams_and_is_respected():
    x = torch.randn(1, 3, 600, 400)
    full = InferenceEngine(TinyNet(), "slide", 64, 42)(x, "labels")
    cap = 4 << 20
    engine = InferenceEngine(TinyNet(), "slide", 64, 42, max_buffer_bytes=cap)
    labels = engine(x, "labels")
    s = engine.last_schedule
    assert s.streamed and 1 <= s.band_rows < s.window_rows and s.buffer_bytes <= cap
    assert (labels != full).float().mean() < 1e-3  # only near-ties may differ
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        InferenceEngine(TinyNet(), "slide", 64, 42, max_buffer_bytes=0)


def test_cuda_window_batch_is_capped_by_activation_bytes():
    """On a large GPU the batch is not sized from all free memory: one batch's activations stay
    under CUDA_MAX_ACTIVATION_BYTES, so HRF fits in 4 GB, while DRIVE's windows still share one
    batch. Planned with the per-window bytes the H100 measured (no GPU needed)."""
    budget = planner.Budget(torch.device("cuda"), 0.7 * (79 << 30), None)
    hrf_cost = planner.Footprint(2, window_bytes=78 << 20, fixed_bytes=64 << 20)
    hrf = InferenceEngine(TinyNet(), "slide", 256, 170).plan(2336, 3504)
    s = planner.schedule(hrf, 1, 3, hrf_cost, budget)
    assert not s.streamed and s.pad_last_batch  # one pass: HRF's buffers are small here
    assert 16 <= s.window_batch and s.window_batch * (78 << 20) <= planner.CUDA_MAX_ACTIVATION_BYTES
    assert s.window_batch * (78 << 20) + s.buffer_bytes < 4e9
    drive = InferenceEngine(TinyNet(), "slide", 64, 42).plan(584, 565)
    s = planner.schedule(drive, 1, 3, planner.Footprint(2, 5 << 20, 64 << 20), budget)
    assert s.window_batch == drive.windows_per_image
    assert planner.schedule(hrf, 1, 3, hrf_cost, budget, window_batch=98).window_batch == 98


def test_cpu_window_batch_follows_the_cache_and_the_weights():
    """CPU batches: as many windows as keep the largest op in the last-level cache, or more when
    the weights read per forward would otherwise be more than 1/CPU_FIXED_SHARE of the
    traffic; never padded to one batch shape; evened out over the forwards."""
    drive = InferenceEngine(TinyNet(), "slide", 64, 42).plan(584, 565)  # 182 windows
    budget = planner.Budget(torch.device("cpu"), 8 << 30, 1 << 30, cache_bytes=32 << 20)
    narrow = planner.Footprint(2, window_traffic=12 << 20, fixed_traffic=7 << 20,
                               largest_op=1 << 20)
    s = planner.schedule(drive, 1, 3, narrow, budget)
    assert s.window_batch == 31 and not s.pad_last_batch  # 182 = 2 x 31 + 4 x 30: 6 forwards
    wide = planner.Footprint(2, window_traffic=40 << 20, fixed_traffic=110 << 20,
                             largest_op=4 << 20)
    assert planner.cpu_batch(wide, 32 << 20) == 88  # 32 x 110 / 40, more than the cache's 8
    assert planner.cpu_batch(planner.Footprint(2), 32 << 20) == 32 << 20  # unmeasured: capped
    assert planner.schedule(drive, 1, 3, planner.Footprint(2), budget).window_batch == 182


def test_cpu_probe_counts_the_bytes_the_window_function_moves():
    net = TinyNet(hidden=8)
    engine = InferenceEngine(net, "slide", 64, 42)
    engine(torch.randn(1, 3, 100, 100))
    cost = next(iter(engine._probes.values()))
    # per window: conv a reads 3 and writes 8 channels, relu 8 -> 8, conv b 8 -> 2 (float32)
    assert cost.largest_op == (8 + 8) * 64 * 64 * 4
    assert cost.window_traffic == (3 + 8 + 8 + 8 + 8 + 2) * 64 * 64 * 4
    assert cost.fixed_traffic == sum(p.numel() * 4 for p in net.parameters())


def test_last_level_cache_is_read_or_assumed(monkeypatch):
    assert planner.last_level_cache_bytes() >= 256 << 10
    monkeypatch.setattr(planner.os, "listdir", lambda path: (_ for _ in ()).throw(OSError()))
    monkeypatch.setattr(planner.os, "sysconf", lambda name: -1)
    assert planner.last_level_cache_bytes() == planner.DEFAULT_CACHE_BYTES


def test_inference_mode_keeps_folded_models_and_parameters_usable():
    """The engine runs under inference_mode: folded layers cast in bf16 there (their cached
    packing is keyed on the parameter, which has a version counter), and the model's
    parameters still train afterwards."""
    import copy

    import fastunet

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)).eval()
    fused = fastunet.fuse(copy.deepcopy(net))
    x = torch.randn(1, 3, 100, 90)
    for precision in ("fp32", "bf16"):
        out = infer(fused, x, "slide", 64, 42, precision=precision)
        assert out.is_inference() and torch.isfinite(out).all()
    assert not any(p.is_inference() for p in fused.parameters())
    infer(net, x, "slide", 64, 42)
    net.train()
    net(x).square().mean().backward()  # parameters used under inference mode still train
    assert net[0].weight.grad is not None

"""Training pipeline invariants, OpenCV-compatible arithmetic, determinism across workers."""
import itertools
import os

import numpy as np
import pytest
import torch

from fastunet.data import _cv
from fastunet.data import transforms
from fastunet.data.transforms import (MEAN, STD, EpochSampler, TrainDataset, TrainTransform,
                                      photometric_distortion, sample_rng)

from alignkit import aligned, has_structure, is_dark, line_image

RNG = np.random.default_rng(0)


def vessel_item(h=70, w=60, seed=0):
    """An image whose red channel encodes the label (label 1 -> 255), plus the label."""
    r = np.random.default_rng(seed)
    label = (r.random((h, w)) < 0.3).astype(np.uint8)
    img = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 0] = label * 255
    return dict(img=img, label=label, name=str(seed), fov=None)


class ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def denorm(x):
    m = torch.tensor(MEAN).view(3, 1, 1)
    s = torch.tensor(STD).view(3, 1, 1)
    return (x * s + m).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_rescale_size_matches_mmcv_formula():
    # DRIVE image (h=584, w=565) with the config scale (584, 565) and ratio r
    assert _cv.rescale_size(565, 584, (584, 565)) == (565, 584, 1.0)
    assert _cv.rescale_size(565, 584, (1168, 1130))[:2] == (1130, 1168)
    w, h, f = _cv.rescale_size(565, 584, (int(584 * 0.77), int(565 * 0.77)))
    assert f == min(449 / 584, 435 / 565) and (w, h) == (int(565 * f + 0.5), int(584 * f + 0.5))
    # long/short sides matter, not their order
    assert _cv.rescale_size(700, 605, (605, 700)) == _cv.rescale_size(700, 605, (700, 605))


def test_output_shapes_dtypes_and_label_values():
    items = [vessel_item(seed=s) for s in range(3)]
    tf = TrainTransform(crop_size=(32, 24), img_scale=(70, 60))
    for k in range(30):
        x, y = tf(items[k % 3]["img"], items[k % 3]["label"], sample_rng(0, 0, k))
        assert x.shape == (3, 32, 24) and x.dtype == torch.float32
        assert y.shape == (32, 24) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 1, 255}


def test_pad_to_crop_with_0_and_255():
    it = vessel_item(20, 16)
    tf = TrainTransform(crop_size=(64, 64), img_scale=(20, 16), ratio_range=(1.0, 1.0),
                        photometric=False, flip_prob=0.0)
    x, y = tf(it["img"], it["label"], sample_rng(0, 0, 0))
    assert x.shape == (3, 64, 64)
    assert torch.equal(y[:20, :16], torch.from_numpy(it["label"]).long())
    assert (y[20:] == 255).all() and (y[:, 16:] == 255).all()
    assert (x[:, 20:] == 0).all() and (x[:, :, 16:] == 0).all()


def test_crop_and_flip_keep_image_and_label_aligned():
    it = vessel_item(50, 45)
    tf = TrainTransform(crop_size=(20, 20), img_scale=(50, 45), ratio_range=(1.0, 1.0),
                        photometric=False, cat_max_ratio=1.0)
    flips = 0
    for k in range(40):
        x, y = tf(it["img"], it["label"], sample_rng(1, 0, k))
        red = denorm(x)[..., 0]
        assert np.array_equal(red >= 128, y.numpy() == 1)
        # the crop is a window of the (possibly flipped) original
        img = it["img"]
        found = [(oy, ox, f) for f in (False, True) for oy in range(31) for ox in range(26)
                 if np.array_equal((img[:, ::-1] if f else img)[oy:oy + 20, ox:ox + 20],
                                   denorm(x))]
        assert found
        flips += found[0][2]
    assert 8 < flips < 32  # p = 0.5


def test_cat_max_ratio_honoured_ignore_not_counted():
    h, w = 64, 64
    label = np.zeros((h, w), np.uint8)
    label[:, 48:] = 1             # a vessel band: most random 16x16 crops miss it
    label[:16, :] = 255           # ignored rows do not count towards any class
    img = np.zeros((h, w, 3), np.uint8)

    def ratios(cat_max_ratio, n=300):
        tf = TrainTransform((16, 16), (h, w), ratio_range=(1.0, 1.0), photometric=False,
                            flip_prob=0.0, cat_max_ratio=cat_max_ratio)
        out = []
        for k in range(n):
            y = tf(img, label, sample_rng(3, 0, k))[1].numpy()
            counts = np.bincount(y[y != 255].ravel(), minlength=2)
            out.append(counts.max() / max(counts.sum(), 1) if (counts > 0).sum() > 1 else 1.0)
        return np.array(out)

    p = (ratios(1.0) < 0.75).mean()
    assert p < 0.3                                     # few random crops qualify ...
    # ... but up to 10 re-draws find one: 1 - (1 - p)^11 of the samples
    assert (ratios(0.75) < 0.75).mean() > 1 - (1 - p) ** 11 - 0.08


class _Scripted:
    def __init__(self, values):
        self.values = list(values)

    def integers(self, lo, hi=None):
        return self.values.pop(0)


def test_crop_redraw_loop_exactly_as_mmseg():
    label = np.zeros((32, 64), np.uint8)
    label[:24, 32:] = 255
    label[24:, 32::2] = 1  # right half: 255 above, alternating 0/1 below
    tf = TrainTransform((32, 32), (32, 64), ratio_range=(1.0, 1.0))
    # a single-class crop is re-drawn; a balanced one is kept
    assert tf._crop_box(label, 64, 32, _Scripted([0, 0, 0, 32])) == (0, 32, 32, 64)
    # ignored pixels do not count: 768 x 255 + 128 x 0 + 128 x 1 is balanced, kept at once
    assert tf._crop_box(label, 64, 32, _Scripted([0, 32, 0, 0])) == (0, 32, 32, 64)
    # after 10 re-draws the 11th crop is taken unchecked
    assert tf._crop_box(label, 64, 32, _Scripted([0, 0] * 10 + [0, 5])) == (0, 32, 5, 37)


def test_resize_window_equals_full_resize_then_crop():
    img = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    lab = RNG.integers(0, 3, (37, 53), dtype=np.uint8)
    for nw, nh in [(80, 70), (30, 20), (53, 37), (26, 18)]:
        full = _cv.resize_linear_window(img, nw, nh, 0, nh, 0, nw)
        fl = _cv.resize_nearest_window(lab, nw, nh, 0, nh, 0, nw)
        assert full.shape == (nh, nw, 3) and fl.shape == (nh, nw)
        for y0, x0 in [(0, 0), (3, 5), (nh - 7, nw - 9)]:
            win = _cv.resize_linear_window(img, nw, nh, y0, y0 + 7, x0, x0 + 9)
            assert np.array_equal(win, full[y0:y0 + 7, x0:x0 + 9])
            assert np.array_equal(_cv.resize_nearest_window(lab, nw, nh, y0, y0 + 7, x0, x0 + 9),
                                  fl[y0:y0 + 7, x0:x0 + 9])
    # identity at scale 1, constant images stay constant, labels keep their values
    assert np.array_equal(_cv.resize_linear_window(img, 53, 37, 0, 37, 0, 53), img)
    const = np.full((10, 12, 3), 77, np.uint8)
    assert (_cv.resize_linear_window(const, 29, 23, 0, 23, 0, 29) == 77).all()
    assert set(np.unique(_cv.resize_nearest_window(lab, 91, 67, 0, 67, 0, 91))) <= {0, 1, 2}


def test_nearest_index_is_opencv_inter_nearest():
    # cv2 INTER_NEAREST: src = floor(dst * (1 / (dst_size / src_size))), clamped
    assert _cv.nearest_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _cv.nearest_index(5, 2).tolist() == [0, 2]
    assert _cv.nearest_index(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_hsv_known_colours_and_round_trip():
    cols = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [0, 0, 0],
                      [255, 255, 0]]], np.uint8)
    hsv = _cv.rgb2hsv(cols)
    assert hsv[0].tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128],
                               [0, 0, 0], [30, 255, 255]]
    assert np.array_equal(_cv.hsv2rgb(hsv), cols)
    img = RNG.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    back = _cv.hsv2rgb(_cv.rgb2hsv(img))
    assert np.abs(back.astype(int) - img).max() <= 8  # 8-bit HSV quantisation only


def test_opencv_parity_when_available():
    cv2 = pytest.importorskip("cv2")  # not a dependency: checked where a developer has it
    img = RNG.integers(0, 256, (61, 77, 3), dtype=np.uint8)
    assert np.array_equal(_cv.rgb2hsv(img), cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    assert np.abs(_cv.hsv2rgb(hsv).astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).max() <= 1
    for nw, nh in [(120, 101), (40, 33)]:
        ref = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        mine = _cv.resize_linear_window(img, nw, nh, 0, nh, 0, nw)
        assert np.abs(ref.astype(int) - mine).max() <= 1 and (ref != mine).mean() < 0.01
        lab = img[..., 0]
        assert np.array_equal(cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST),
                              _cv.resize_nearest_window(lab, nw, nh, 0, nh, 0, nw))


class _Coins:
    """A stand-in generator: scripted coin flips, fixed magnitudes."""

    def __init__(self, coins, mode, uniform, hue):
        self.coins, self.mode, self.u, self.hue = list(coins), mode, uniform, hue

    def integers(self, lo, hi=None):
        if hi is None:
            return self.coins.pop(0) if lo == 2 and self.coins else 0
        return self.hue

    def uniform(self, lo, hi):
        return self.u(lo, hi)


def test_photometric_distortion_semantics():
    img = RNG.integers(0, 256, (8, 40, 3), dtype=np.uint8)
    # no coin comes up: identity
    assert np.array_equal(photometric_distortion(img, _Coins([0, 0, 0, 0, 0], 0, None, 0)), img)
    # brightness only: float32 add, clip, truncate (mmseg's convert)
    out = photometric_distortion(img, _Coins([1, 0, 0, 0, 0], 0, lambda lo, hi: 10.7, 0))
    assert np.array_equal(out, np.clip(img.astype(np.float32) + 10.7, 0, 255).astype(np.uint8))
    # contrast, done last (mode 0): multiply
    out = photometric_distortion(img, _Coins([0, 0, 0, 0, 1], 0, lambda lo, hi: 1.3, 0))
    assert np.array_equal(out, np.clip(img.astype(np.float32) * 1.3, 0, 255).astype(np.uint8))
    # hue shift by +10 in OpenCV's 0..179 hue
    out = photometric_distortion(img, _Coins([0, 0, 0, 1, 0], 0, None, 10))
    hsv = _cv.rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 10) % 180
    assert np.array_equal(out, _cv.hsv2rgb(hsv))
    # the real generator: ranges respected (brightness alone moves the mean by at most 32)
    r = np.random.default_rng(0)
    for _ in range(20):
        out = photometric_distortion(img, r)
        assert out.dtype == np.uint8 and out.shape == img.shape


def test_same_seed_epoch_index_same_sample_and_different_otherwise():
    ds = TrainDataset(ListDataset([vessel_item(seed=s) for s in range(4)]),
                      TrainTransform((24, 24), (70, 60)), seed=5)
    a, b = ds[(2, 3)], ds[(2, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(2)
    assert torch.equal(ds[3][0], a[0])
    assert not torch.equal(ds[(3, 3)][0], a[0])
    other = TrainDataset(ds.dataset, ds.transform, seed=6)
    assert not torch.equal(other[(2, 3)][0], a[0])


def test_epoch_sampler_permutations_and_resume():
    s = EpochSampler(5, seed=1)
    keys = list(itertools.islice(iter(s), 15))
    for e in range(3):
        assert sorted(i for ep, i in keys if ep == e) == list(range(5))
    assert len({tuple(i for ep, i in keys if ep == e) for e in range(3)}) > 1  # reshuffled
    resumed = list(itertools.islice(iter(EpochSampler(5, seed=1, start=7)), 8))
    assert resumed == keys[7:15]
    assert list(itertools.islice(iter(EpochSampler(3, shuffle=False)), 4)) == [
        (0, 0), (0, 1), (0, 2), (1, 0)]


def test_dataloader_workers_reproduce_single_process():
    items = [vessel_item(40, 36, seed=s) for s in range(6)]
    ds = TrainDataset(ListDataset(items), TrainTransform((16, 16), (40, 36)), seed=9)
    sampler = EpochSampler(len(ds), seed=9)
    keys = list(itertools.islice(iter(sampler), 16))
    expect = torch.stack([ds[k][0] for k in keys])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
    got = torch.cat([x for x, _ in itertools.islice(iter(loader), 4)])
    assert torch.equal(got, expect)


def test_test_transform_normalises_only():
    it = vessel_item()
    x, y = transforms.TestTransform()(it["img"], it["label"])
    assert x.shape == (3, 70, 60) and torch.equal(y, torch.from_numpy(it["label"]).long())
    assert x[1, 0, 0].item() == pytest.approx((it["img"][0, 0, 1] - MEAN[1]) / STD[1], rel=1e-6)
    assert transforms.TestTransform()(it["img"])[1] is None


def test_bad_inputs_are_rejected():
    tf = TrainTransform(16, (40, 40))
    with pytest.raises(ValueError, match="RGB"):
        tf(np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8), sample_rng(0, 0, 0))
    with pytest.raises(ValueError, match="does not match"):
        tf(np.zeros((10, 10, 3), np.uint8), np.zeros((9, 10), np.uint8), sample_rng(0, 0, 0))


# ---- label resize: on the image's pixel grid by default, mmseg's exactly on request

def test_centre_nearest_index_is_the_pixel_under_each_centre():
    # floor((x + 0.5) * src / dst): 2x up repeats each pixel, 2x down takes the second of each
    # pair (the one under the output pixel's centre), where INTER_NEAREST takes the first
    assert _cv.nearest_index(4, 8, centre=True).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _cv.nearest_index(8, 4, centre=True).tolist() == [1, 3, 5, 7]
    assert _cv.nearest_index(8, 4).tolist() == [0, 2, 4, 6]
    assert _cv.nearest_index(3, 7, centre=True).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert _cv.nearest_index(5, 5, centre=True).tolist() == list(range(5))


def test_centre_nearest_resize_matches_pil():
    from PIL import Image

    lab = RNG.integers(0, 256, (61, 47), dtype=np.uint8)
    for nw, nh in [(94, 122), (23, 30), (47, 61), (100, 17), (31, 90), (140, 183)]:
        ref = np.asarray(Image.fromarray(lab).resize((nw, nh), Image.NEAREST))
        assert np.array_equal(_cv.resize_nearest_window(lab, nw, nh, 0, nh, 0, nw, centre=True),
                              ref), (nw, nh)


def test_centre_nearest_resize_matches_opencv_nearest_exact_when_available():
    cv2 = pytest.importorskip("cv2")  # not a dependency
    lab = RNG.integers(0, 256, (61, 47), dtype=np.uint8)
    for nw, nh in [(94, 122), (23, 30), (100, 17), (31, 90)]:
        ref = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
        assert np.array_equal(_cv.resize_nearest_window(lab, nw, nh, 0, nh, 0, nw, centre=True),
                              ref)


def _aligned_fraction(label_resize, samples=160, photometric=False):
    """Of random training samples of line images (scales 0.5-2, crops, flips), the fraction
    whose label agrees with the image's dark pixels best at zero shift."""
    rng = np.random.default_rng(11)
    hits = total = 0
    for k in range(samples // 4):
        h, w = (int(v) for v in rng.integers(50, 130, 2))
        img, label = line_image(h, w, rng)
        tf = TrainTransform((48, 48), (h, w), photometric=photometric, label_resize=label_resize)
        for j in range(4):
            x, y = tf(img, label, sample_rng(k, 0, j))
            y = y.numpy()
            valid = y != 255
            if not has_structure(y, valid):
                continue
            total += 1
            hits += aligned(y == 1, is_dark(denorm(x)[..., 1]), valid)
    assert total > samples // 2
    return hits / total


def test_training_labels_are_aligned_with_the_image():
    assert _aligned_fraction("centre") >= 0.9
    # the check has teeth: mmseg's INTER_NEAREST labels sit off the image in many crops
    assert _aligned_fraction("mmseg") < 0.75


def test_test_time_labels_are_aligned_with_the_image():
    # the test transform resizes nothing: label and image are the files' own pixels
    rng = np.random.default_rng(5)
    for _ in range(10):
        img, label = line_image(*(int(v) for v in rng.integers(40, 120, 2)), rng)
        x, y = transforms.TestTransform()(img, label)
        assert aligned(y.numpy() == 1, is_dark(denorm(x)[..., 1]))


def test_label_resize_only_moves_labels():
    # same draws, same image window: the two modes differ in the label's nearest map only
    img, label = line_image(90, 77, np.random.default_rng(2))
    a = TrainTransform((32, 32), (90, 77), cat_max_ratio=1.0, label_resize="centre")
    b = TrainTransform((32, 32), (90, 77), cat_max_ratio=1.0, label_resize="mmseg")
    differ = 0
    for k in range(20):
        (xa, ya), (xb, yb) = a(img, label, sample_rng(0, 0, k)), b(img, label, sample_rng(0, 0, k))
        assert torch.equal(xa, xb)
        differ += not torch.equal(ya, yb)
    assert differ >= 10  # most random scales move some label pixels
    with pytest.raises(ValueError, match="label_resize"):
        TrainTransform(32, (90, 77), label_resize="nearest")


def _pipeline_batch(label_resize):
    """Iteration 2's batch (8 samples) of the synthetic config's pipeline on three small
    generated images (scales 0.5-2 of 120x110, so crops, padding, flips and photometric
    distortion all occur)."""
    import fastunet
    from fastunet.data import synthetic
    from fastunet.training import data as tdata

    dcfg = fastunet.get_config("synthetic")["data"]
    dcfg.update(img_scale=(120, 110), label_resize=label_resize)
    items = [dict(synthetic.generate(0, "training", i, (120, 110)), name=str(i))
             for i in range(3)]
    loader = tdata.build_train_loader(items, dcfg, 8, 8, seed=0, start_iter=2, workers=0)
    return next(iter(loader))


def _sha256(t):
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_mmseg_label_resize_reproduces_the_mmseg_pipeline_bit_for_bit():
    # tests/data/mmseg_pipeline_batch.npz: _pipeline_batch's images and labels as the pipeline
    # produced them before label_resize existed (then always mmseg's INTER_NEAREST)
    ref = np.load(os.path.join(os.path.dirname(__file__), "data", "mmseg_pipeline_batch.npz"))
    x, y = _pipeline_batch("mmseg")
    assert (y == 255).any() and set(y.unique().tolist()) == {0, 1, 255}  # padding included
    assert np.array_equal(y.numpy(), ref["labels"])
    assert _sha256(y) == str(ref["labels_sha256"])
    assert _sha256(x) == str(ref["images_sha256"])
    # the default moves labels onto the image's grid: the same batch has other labels
    assert not np.array_equal(_pipeline_batch("centre")[1].numpy(), ref["labels"])

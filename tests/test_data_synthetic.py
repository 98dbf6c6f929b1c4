"""The synthetic vessel generator: determinism, geometry, widths, appearance, cache, baseline."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastunet.data import SyntheticVessels, build_dataset, green_channel_baseline, write_synthetic
from fastunet.data import synthetic as syn

from alignkit import aligned, has_structure

SMALL = (160, 150)


@pytest.fixture(scope="module")
def drive_size():
    return syn.generate(seed=3, split="training", index=0, return_vessels=True)


def test_deterministic_per_seed_split_index():
    a = syn.generate(1, "training", 2, SMALL)
    b = syn.generate(1, "training", 2, SMALL)
    assert all(np.array_equal(a[k], b[k]) for k in ("img", "label", "fov"))
    for other in (syn.generate(1, "training", 3, SMALL), syn.generate(1, "validation", 2, SMALL),
                  syn.generate(2, "training", 2, SMALL)):
        assert not np.array_equal(a["img"], other["img"])
    assert a["img"].shape == (*SMALL, 3) and a["img"].dtype == np.uint8
    assert a["label"].dtype == np.uint8 and a["fov"].dtype == bool


def test_fov_is_a_circle_and_labels_inside(drive_size):
    fov, label = drive_size["fov"], drive_size["label"]
    assert label.shape == fov.shape == (584, 565)
    assert set(np.unique(label)) == {0, 1} and not label[~fov].any()
    yy, xx = np.nonzero(fov)
    cy, cx = yy.mean(), xx.mean()
    r = np.sqrt(fov.sum() / np.pi)
    grid_y, grid_x = np.mgrid[0:584, 0:565]
    disk = np.hypot(grid_y - cy, grid_x - cx) < r
    assert (disk == fov).mean() > 0.998
    assert 0.45 * 565 < r < 0.5 * 565
    frac = label[fov].mean()
    assert 0.06 < frac < 0.2  # DRIVE: ~12% of the FOV is vessel


def test_vessel_widths_1_to_8_px_and_match_the_mask(drive_size):
    label = drive_size["label"].astype(bool)
    points = np.concatenate([p for p, _ in drive_size["vessels"]])
    radii = np.concatenate([r for _, r in drive_size["vessels"]])
    diam = 2 * radii
    assert diam.min() >= 1.0 and diam.max() <= 8.0
    assert (diam < 2).mean() > 0.2 and (diam > 5).any()  # many thin, some thick vessels
    # measure the mask's width across the centre line where the vessel runs alone
    owner = np.concatenate([np.full(len(r), k) for k, (_, r) in enumerate(drive_size["vessels"])])
    rng = np.random.default_rng(0)
    errors = []
    for k in rng.permutation(len(points))[:1500]:
        own = owner == owner[k]
        p, r = points[k], radii[k]
        others = ~own
        if (np.hypot(*(points[others] - p).T) - radii[others]).min() < r + 3:
            continue  # another vessel (crossing, branch, neighbour) is too close
        vp = points[own]
        j = int(np.argmin(np.hypot(*(vp - p).T)))
        if j < 2 or j > len(vp) - 3:
            continue
        t = vp[j + 2] - vp[j - 2]
        n = np.array([-t[1], t[0]]) / (np.linalg.norm(t) + 1e-9)
        steps = np.arange(-12, 12.01, 0.25)
        xy = p[None, :] + steps[:, None] * n[None, :]
        px, py = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
        if not ((px >= 0) & (px < 565) & (py >= 0) & (py < 584)).all():
            continue
        if not drive_size["fov"][py, px].all():
            continue
        on = label[py, px]
        centre = len(steps) // 2
        lo, hi = centre, centre
        while lo > 0 and on[lo - 1]:
            lo -= 1
        while hi < len(on) - 1 and on[hi + 1]:
            hi += 1
        errors.append((hi - lo + 1) * 0.25 - 2 * r)
    errors = np.abs(np.array(errors))
    assert len(errors) > 200
    # pixel quantisation allows ~1 px; the mask is the recorded geometry
    assert np.median(errors) <= 0.5 and np.mean(errors <= 1.0) > 0.95


def _dilate(mask, k):
    out = mask.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _locally_dark(green, half=5, delta=4):
    """Pixels at least ``delta`` levels darker than the mean of their (2 half + 1)^2 window."""
    g = green.astype(np.float64)
    c = np.pad(np.pad(g, half, mode="reflect").cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    n = 2 * half + 1
    mean = (c[n:, n:] - c[:-n, n:] - c[n:, :-n] + c[:-n, :-n]) / n ** 2
    return g < mean - delta


def test_labels_are_aligned_with_the_dark_vessel_pixels(drive_size):
    # in 48x48 crops holding enough vessel, the label agrees with the locally dark green pixels
    # best at zero shift (of -1..1 px in y and x): the mask is drawn on the image's pixel grid
    dark = _locally_dark(drive_size["img"][..., 1])
    label, fov = drive_size["label"], drive_size["fov"]
    rng = np.random.default_rng(0)
    hits = shifted_hits = total = 0
    for _ in range(150):
        y, x = rng.integers(0, label.shape[0] - 48), rng.integers(0, label.shape[1] - 48)
        crop = np.s_[y:y + 48, x:x + 48]
        if not has_structure(label[crop], fov[crop], least=150):
            continue
        total += 1
        hits += aligned(label[crop], dark[crop], fov[crop])
        # the check has teeth: the label moved by one pixel is not best at zero shift
        moved = np.roll(label, 1, axis=1)[crop]
        shifted_hits += aligned(moved, dark[crop], fov[crop])
    assert total >= 30
    assert hits / total >= 0.9 and shifted_hits / total < 0.2


def test_looks_like_a_fundus(drive_size):
    img, label, fov = drive_size["img"].astype(float), drive_size["label"] > 0, drive_size["fov"]
    r, g, b = (img[..., c][fov].mean() for c in range(3))
    assert r > g > b and r > 100  # reddish
    assert img[~fov].mean() < 5   # black outside the field of view
    ring = _dilate(label, 5) & ~_dilate(label, 2) & fov
    contrast = [img[..., c][ring].mean() - img[..., c][label].mean() for c in range(3)]
    assert contrast[1] > 5 and contrast[1] > contrast[0]  # vessels darkest in green


def test_cache_on_first_use_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "envcache"))
    ds = SyntheticVessels("validation", num_images=2, size=SMALL, seed=4, progress=False)
    assert ds.root.startswith(str(tmp_path / "envcache" / "synthetic"))
    files = sorted(p for p in (tmp_path / "envcache").rglob("*.png"))
    assert len(files) == 6  # image, label, FOV mask per item
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = SyntheticVessels("validation", num_images=2, size=SMALL, seed=4, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    fly = SyntheticVessels("validation", num_images=2, size=SMALL, seed=4, cache=False)
    for i in range(2):
        a, b = again[i], fly[i]
        assert a["name"] == b["name"]
        assert all(np.array_equal(a[k], b[k]) for k in ("img", "label", "fov"))
    # an argument overrides the environment; other parameters get another folder
    other = SyntheticVessels("validation", num_images=1, size=SMALL, seed=5, root=tmp_path / "c",
                             progress=False)
    assert other.root.startswith(str(tmp_path / "c")) and other.root != ds.root


def test_interrupted_generation_is_completed_not_trusted(tmp_path):
    ds = SyntheticVessels("training", num_images=2, size=SMALL, root=tmp_path, progress=False)
    # simulate a kill between the label and the image of item 1, and a stale temp file
    name, img_p, seg_p, fov_p = syn._paths(ds.root, "training", 1)
    os.unlink(img_p)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the temporary file of a writer that no longer runs
    stale = os.path.join(os.path.dirname(img_p), f".0001.png.{dead.pid}.0123abcd.tmp")
    open(stale, "wb").write(b"half")
    again = SyntheticVessels("training", num_images=2, size=SMALL, root=tmp_path, progress=False)
    assert os.path.isfile(img_p) and not os.path.exists(stale)
    assert np.array_equal(again[1]["img"], syn.generate(0, "training", 1, SMALL)["img"])


def test_write_synthetic_layout_read_by_drive_loader(tmp_path):
    root = write_synthetic(tmp_path / "synth", num_training=2, num_validation=1, size=SMALL, seed=7)
    ds = build_dataset("drive", root, "training")
    assert ds.names == ["0000", "0001"] and len(build_dataset("drive", root, "validation")) == 1
    item, ref = ds[1], syn.generate(7, "training", 1, SMALL)
    assert np.array_equal(item["img"], ref["img"]) and np.array_equal(item["label"], ref["label"])
    assert np.array_equal(item["fov"], ref["fov"])
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []
    with pytest.raises(FileExistsError):
        write_synthetic(root, 1, 1, size=SMALL)
    assert len(build_dataset("synthetic", tmp_path / "c", "training", num_images=1, size=SMALL,
                             progress=False)) == 1


def test_green_channel_baseline_is_far_below_a_cnn():
    size = (292, 282)  # half DRIVE scale keeps the test fast
    train = [syn.generate(0, "training", i, size) for i in range(3)]
    val = [syn.generate(0, "validation", i, size) for i in range(3)]
    res = green_channel_baseline(train, val)
    assert 0 <= res["threshold"] < 255
    assert res["metrics"]["vessel_dice"] < 45


def test_green_channel_baseline_scores_an_easy_set_perfectly():
    label = np.zeros((20, 20), np.uint8)
    label[5:8, :] = 1
    img = np.full((20, 20, 3), 200, np.uint8)
    img[label == 1] = 40
    item = dict(img=img, label=label, fov=np.ones((20, 20), bool))
    res = green_channel_baseline([item], [item])
    assert res["metrics"]["vessel_dice"] == 100 and 40 <= res["threshold"] < 200


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        syn.generate(0, "test", 0)
    with pytest.raises(ValueError, match="32x32"):
        syn.generate(0, "training", 0, (16, 16))
    with pytest.raises(ValueError, match="num_images"):
        SyntheticVessels(num_images=0, cache=False)
    with pytest.raises(IndexError):
        SyntheticVessels(num_images=1, size=SMALL, cache=False)[1]

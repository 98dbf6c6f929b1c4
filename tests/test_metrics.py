"""SegMetric against hand-computed values (mmseg IoUMetric semantics)."""
import math

import numpy as np
import pytest
import torch

from fastunet.metrics import SegMetric

PRED = np.array([[0, 1, 1, 0],
                 [1, 1, 0, 0],
                 [0, 0, 0, 1]])
LABEL = np.array([[0, 1, 0, 0],
                  [1, 255, 0, 1],
                  [0, 0, 1, 1]])


def test_hand_computed_with_ignore():
    m = SegMetric()
    m.update(PRED, LABEL)
    # scored pixels: all but the 255 -> 11 pairs (pred, label): (0,0) x5, (1,1) x3, (1,0) x1,
    # (0,1) x2. background: I=5, P=7, L=6; vessel: I=3, P=4, L=5
    r = m.compute()
    assert r["IoU.background"] == pytest.approx(100 * 5 / (7 + 6 - 5))
    assert r["IoU.vessel"] == pytest.approx(100 * 3 / (4 + 5 - 3))
    assert r["Dice.background"] == pytest.approx(100 * 2 * 5 / 13)
    assert r["Dice.vessel"] == pytest.approx(100 * 2 * 3 / 9) == r["vessel_dice"]
    assert r["Acc.background"] == pytest.approx(100 * 5 / 6)
    assert r["Acc.vessel"] == pytest.approx(100 * 3 / 5)
    assert r["aAcc"] == pytest.approx(100 * 8 / 11)
    assert r["mIoU"] == pytest.approx((r["IoU.background"] + r["IoU.vessel"]) / 2)
    assert r["mDice"] == pytest.approx((r["Dice.background"] + r["Dice.vessel"]) / 2)
    assert r["mAcc"] == pytest.approx((r["Acc.background"] + r["Acc.vessel"]) / 2)


def test_fov_restricts_scored_pixels():
    fov = np.ones_like(LABEL, bool)
    fov[:, 3] = False  # drop the last column: pred (0,0,1) label (0,1,1)
    m = SegMetric()
    m.update(PRED, LABEL, fov=fov)
    # remaining: background I=4 P=5 L=5; vessel I=2 P=3 L=3
    r = m.compute()
    assert r["Dice.vessel"] == pytest.approx(100 * 4 / 6)
    assert r["IoU.background"] == pytest.approx(100 * 4 / 6)
    assert r["aAcc"] == pytest.approx(100 * 6 / 8)
    # a (H, W) fov broadcasts over a batch
    mb = SegMetric()
    mb.update(np.stack([PRED, PRED]), np.stack([LABEL, LABEL]), fov=fov)
    assert mb.compute()["Dice.vessel"] == pytest.approx(r["Dice.vessel"])


def test_absent_class_is_nan_like_mmseg():
    m = SegMetric()
    m.update(np.zeros((3, 3), int), np.zeros((3, 3), int))
    r = m.compute()
    assert math.isnan(r["IoU.vessel"]) and math.isnan(r["Acc.vessel"])
    assert math.isnan(r["Dice.vessel"]) and math.isnan(r["vessel_dice"])
    assert r["mIoU"] == 100.0 and r["mDice"] == 100.0  # nan-mean over the present class
    # predicted but absent: IoU = Dice = 0, Acc = nan (0/0)
    m = SegMetric()
    pred = np.zeros((3, 3), int)
    pred[0, 0] = 1
    m.update(pred, np.zeros((3, 3), int))
    r = m.compute()
    assert r["IoU.vessel"] == 0 and r["Dice.vessel"] == 0 and math.isnan(r["Acc.vessel"])
    assert r["mIoU"] == pytest.approx((100 * 8 / 9 + 0) / 2)
    # nothing scored at all
    m = SegMetric()
    m.update(np.zeros((2, 2), int), np.full((2, 2), 255))
    assert all(math.isnan(v) for v in m.compute().values())


def test_tensor_numpy_batch_and_accumulation_agree():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 2, (5, 17, 13))
    labels = rng.integers(0, 2, (5, 17, 13))
    labels[rng.random(labels.shape) < 0.1] = 255
    a, b, c = SegMetric(), SegMetric(), SegMetric()
    a.update(preds, labels)
    b.update(torch.from_numpy(preds), torch.from_numpy(labels).to(torch.uint8))
    for p, l in zip(preds, labels):
        c.update(torch.from_numpy(p), l)
    ra, rb, rc = a.compute(), b.compute(), c.compute()
    assert ra == rb == rc
    assert a.num_images == 5
    # against a direct numpy computation
    keep = labels != 255
    p, l = preds[keep], labels[keep]
    i1 = np.sum((p == 1) & (l == 1))
    assert ra["Dice.vessel"] == pytest.approx(100 * 2 * i1 / (np.sum(p == 1) + np.sum(l == 1)))


def test_out_of_range_values_are_not_counted():
    m = SegMetric()
    m.update(np.array([[0, 1, 7]]), np.array([[0, 5, 1]]))
    inter, union, area_pred, area_label = m.areas()
    # label 5 is scored but belongs to no class; pred 7 likewise (mmseg's histc drops both)
    assert inter.tolist() == [1, 0]
    assert area_pred.tolist() == [1, 1] and area_label.tolist() == [1, 1]


def test_reset_and_errors():
    m = SegMetric()
    m.update(PRED, LABEL)
    m.reset()
    assert m.num_images == 0 and all(a.sum() == 0 for a in m.areas())
    with pytest.raises(ValueError, match="shape"):
        m.update(PRED, LABEL[:2])
    with pytest.raises(TypeError, match="argmax"):
        m.update(PRED.astype(np.float32), LABEL)
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        m.update(PRED.tolist(), LABEL)
    with pytest.raises(ValueError, match="class_names"):
        SegMetric(num_classes=3)


def test_table_layout():
    m = SegMetric()
    m.update(PRED, LABEL)
    t = m.table()
    r = m.compute()
    assert "per class results:" in t and "Summary:" in t
    vessel = next(line for line in t.splitlines() if "vessel" in line)
    cells = [c.strip() for c in vessel.strip("|").split("|")]
    assert cells == ["vessel", f"{r['IoU.vessel']:.2f}", f"{r['Acc.vessel']:.2f}",
                     f"{r['Dice.vessel']:.2f}"]
    summary = t.splitlines()[-2]
    assert [c.strip() for c in summary.strip("|").split("|")] == [
        f"{r[k]:.2f}" for k in ("aAcc", "mIoU", "mAcc", "mDice")]
    lines = t.splitlines()
    assert lines[1].startswith("+--") and "Class" in lines[2] and "IoU" in lines[2]

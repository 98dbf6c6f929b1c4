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


def test_vessel_rates_from_the_counts():
    m = SegMetric()
    m.update(PRED, LABEL)
    r = m.compute()
    # vessel positive: TP=3, FN=2, FP=1, TN=5 (the 255 pixel ignored)
    assert r["vessel_se"] == pytest.approx(100 * 3 / 5) == r["Acc.vessel"]
    assert r["vessel_sp"] == pytest.approx(100 * 5 / 6) == r["Acc.background"]
    assert r["vessel_acc"] == pytest.approx(100 * 8 / 11) == r["aAcc"]
    assert "vessel_auc" not in r and math.isnan(m.auc_error_bound())  # no probabilities given
    # three classes: vessel against the other two
    m3 = SegMetric(num_classes=3, class_names=("bg", "vessel", "disc"))
    m3.update(np.array([[1, 1, 2, 0, 0]]), np.array([[1, 2, 2, 1, 0]]))
    r3 = m3.compute()
    assert r3["vessel_se"] == pytest.approx(50) and r3["vessel_sp"] == pytest.approx(100 * 2 / 3)
    assert r3["vessel_acc"] == pytest.approx(60)


def _roc_auc(prob, label):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    return sklearn_metrics.roc_auc_score(label, prob)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_scikit_learn_within_the_stated_bound(seed):
    rng = np.random.default_rng(seed)
    label = (rng.random((3, 61, 47)) < 0.15).astype(np.int64)
    # informative scores of every range: near-0/near-1 probabilities, and float32 ties
    logit = rng.normal(0, 4, label.shape) + 3 * label
    prob = torch.from_numpy(logit).sigmoid().float()
    pred = (prob > 0.5).long()
    label_ign = label.copy()
    label_ign[rng.random(label.shape) < 0.05] = 255
    fov = rng.random(label.shape[1:]) < 0.8
    m = SegMetric()
    for i in range(3):  # pooled over images, not averaged
        m.update(pred[i], label_ign[i], fov=fov, prob=prob[i])
    keep = (label_ign != 255) & fov[None]
    exact = 100 * _roc_auc(prob.numpy()[keep], label_ign[keep])
    got, bound = m.compute()["vessel_auc"], m.auc_error_bound()
    assert abs(got - exact) <= bound + 1e-9
    assert bound < 0.01  # 2^16 logit bins leave few pairs tied
    assert 60 < got < 100


def test_auc_is_exact_for_distinct_bins_and_counts_ties_half():
    # probabilities in distinct bins: the histogram AUC is the exact one
    prob = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], np.float32)
    label = np.array([0, 0, 1, 1, 0, 1])
    m = SegMetric()
    m.update((prob > 0.5).astype(np.int64)[None], label[None], prob=prob[None])
    assert m.compute()["vessel_auc"] == pytest.approx(100 * _roc_auc(prob, label))
    # equal probabilities are ties, as in the exact AUC
    tie = np.array([0.5, 0.5, 0.5, 0.7], np.float32)
    lab = np.array([0, 1, 1, 1])
    m = SegMetric()
    m.update(np.zeros(4, np.int64)[None], lab[None], prob=tie[None])
    assert m.compute()["vessel_auc"] == pytest.approx(100 * _roc_auc(tie, lab))
    assert m.compute()["vessel_auc"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)


def test_auc_memory_is_fixed_and_counts_reduce():
    from fastunet.metrics import AUC_BINS

    rng = np.random.default_rng(3)
    a, b, whole = SegMetric(), SegMetric(), SegMetric()
    for k in range(4):
        label = rng.integers(0, 2, (20, 20))
        prob = rng.random((20, 20)).astype(np.float32)
        pred = (prob > 0.5).astype(np.int64)
        (a if k % 2 else b).update(pred, label, prob=prob)
        whole.update(pred, label, prob=prob)
    assert whole._hist.shape == (2, AUC_BINS)
    # a sum over "processes": a's counts plus b's give the pooled metric
    a.reduce_counts(lambda t: t + torch.from_numpy(
        np.concatenate([b._cm.ravel(), b._hist.ravel()])))
    assert a.compute() == whole.compute()


def test_auc_input_errors():
    m = SegMetric()
    label = np.array([[0, 1]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(label, label, prob=np.array([[-2.0, 3.0]], np.float32))  # logits, not probs
    with pytest.raises(ValueError, match="prob shape"):
        m.update(label, label, prob=np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="float"):
        m.update(label, label, prob=label)
    m.update(label, label, prob=np.array([[0.1, 0.9]], np.float32))
    with pytest.raises(ValueError, match="every update or with none"):
        m.update(label, label)
    # one class only: AUC undefined
    m = SegMetric()
    m.update(label * 0, label * 0, prob=np.array([[0.1, 0.9]], np.float32))
    assert math.isnan(m.compute()["vessel_auc"])


def test_vessel_table():
    m = SegMetric()
    m.update(PRED, LABEL, prob=PRED.astype(np.float32) * 0.8 + 0.1)
    r = m.compute()
    lines = m.vessel_table().splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["Se", "Sp", "Acc", "AUC",
                                                                    "Dice"]
    assert [c.strip() for c in lines[4].strip("|").split("|")] == [
        f"{r[k]:.2f}" for k in ("vessel_se", "vessel_sp", "vessel_acc", "vessel_auc",
                                "vessel_dice")]

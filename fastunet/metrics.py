"""Segmentation metrics pooled over a dataset, as mmseg's IoUMetric computes them.

Per class c, over all pixels of all images whose label is not ``ignore_index`` (and, when a
field-of-view mask is given, that lie inside it): I_c (predicted c and labelled c), P_c
(predicted c), L_c (labelled c). Then IoU_c = I/(P+L-I), Dice_c = 2I/(P+L), Acc_c = I/L,
aAcc = sum(I)/sum(L), and mIoU / mDice / mAcc are nan-means over classes. A class absent from
the labels has nan Acc (0/0) and nan IoU/Dice when it is also never predicted (a class that is
predicted but absent scores IoU = Dice = 0), exactly as mmseg. Predicted or label values outside
[0, num_classes) are not counted for any class (mmseg's histc drops them), though such a label
pixel still counts in the scored set.

All returned values are percentages (x100) as floats, not rounded; ``table()`` prints them with
2 decimals like mmseg's log. ``vessel_dice`` is the Dice of class 1, the number published for
the retinal-vessel benchmarks ("Dice"), while ``mDice`` averages background and vessel.
Counts are exact int64 (mmseg accumulates float32 histograms, which rounds beyond 2^24 pixels).

The retinal-vessel literature's metrics treat vessel (class 1) as the positive class and every
other class as negative, over the same scored pixels: ``vessel_se`` (sensitivity, TP/(TP+FN)),
``vessel_sp`` (specificity, TN/(TN+FP)), ``vessel_acc`` (accuracy, (TP+TN)/all) and, when
``update`` is given the vessel probabilities, ``vessel_auc`` (area under the ROC curve of the
probability, pooled over all scored pixels of the data set). For two classes Se = Acc.vessel,
Sp = Acc.background and accuracy = aAcc; ``vessel_table()`` prints them with the Dice.

The AUC is computed from a fixed histogram instead of all scores, so memory stays constant
(2 x 2^16 counters) whatever the data set's size: each probability p falls into one of
``AUC_BINS`` equal bins of its logit log(p/(1-p)) over [-32, 32] (saturated beyond), and pairs of
a vessel and a background pixel in the same bin count as ties (1/2), as equal scores do in the
exact AUC. Only such pairs can be counted differently from the exact AUC of the same
probabilities (scikit-learn's ``roc_auc_score``), by at most 1/2 each, so
|AUC - exact AUC| <= ``auc_error_bound()`` = (1/2) sum_bins(vessel_b x background_b) / (vessel x
background), which ``compute`` callers can report beside it; it is zero when no bin holds both.
"""
import math
import warnings

import numpy as np
import torch

__all__ = ["SegMetric", "AUC_BINS"]

AUC_BINS = 1 << 16
_LOGIT_RANGE = 32.0  # logits beyond +-32 (p < 1.3e-14 or 1 - p < 1.3e-14) share the end bins
VESSEL = 1  # the positive class of Se / Sp / AUC


class SegMetric:
    """Accumulates intersect/union counts per class over a dataset; see the module docstring."""

    def __init__(self, num_classes=2, ignore_index=255, class_names=("background", "vessel")):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else tuple(
            f"class{i}" for i in range(num_classes))
        self.reset()

    def reset(self):
        """Forget everything accumulated so far."""
        self._cm = np.zeros((self.num_classes + 1, self.num_classes + 1), np.int64)
        # AUC histogram: row 0 negative (labelled another class), row 1 positive (vessel)
        self._hist = np.zeros((2, AUC_BINS), np.int64)
        self._with_probs = None  # whether updates came with probabilities (all or none)
        self._warned = False
        self.num_images = 0

    @staticmethod
    def _as_tensor(x, what):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        if isinstance(x, torch.Tensor):
            return x.detach()
        raise TypeError(f"SegMetric.update: {what} must be a torch.Tensor or numpy array, "
                        f"got {type(x).__name__}")

    def update(self, pred, label, fov=None, prob=None):
        """Add integer predictions (H,W) or (N,H,W) (tensor or ndarray) against same-shape labels.

        fov: optional bool mask of the same shape (or (H,W) broadcast over N); only pixels inside
        it are scored. prob: optional float vessel probabilities in [0, 1] of pred's shape (e.g.
        ``logits.softmax(1)[:, 1]``), for the AUC; give them with every update or with none.
        """
        pred = self._as_tensor(pred, "pred")
        label = self._as_tensor(label, "label")
        if pred.shape != label.shape:
            raise ValueError(f"SegMetric.update: pred shape {tuple(pred.shape)} != label shape "
                             f"{tuple(label.shape)}")
        if self._with_probs is not None and self._with_probs != (prob is not None):
            raise ValueError("SegMetric.update: give prob with every update or with none (the "
                             "AUC pools the probabilities of all scored pixels)")
        if pred.dim() not in (2, 3):
            raise ValueError(f"SegMetric.update: expected (H,W) or (N,H,W), got "
                             f"{tuple(pred.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise TypeError("SegMetric.update: pred and label must be integer class maps "
                            "(take argmax of logits first)")
        device = label.device
        pred = pred.to(device)
        valid = label != self.ignore_index if self.ignore_index is not None else \
            torch.ones_like(label, dtype=torch.bool)
        if fov is not None:
            fov = self._as_tensor(fov, "fov").to(device).bool()
            if fov.shape != label.shape:
                try:
                    fov = fov.expand_as(label)
                except RuntimeError:
                    raise ValueError(f"SegMetric.update: fov shape {tuple(fov.shape)} does not "
                                     f"match label shape {tuple(label.shape)}") from None
            valid = valid & fov
        n = self.num_classes
        p = pred[valid].long()
        l = label[valid].long()
        if not self._warned and l.numel() and (l.min() < 0 or l.max() >= n):
            odd = torch.unique(l[(l < 0) | (l >= n)])[:8].tolist()
            warnings.warn(f"SegMetric: label values {odd} are neither classes 0..{n - 1} nor "
                          f"ignore_index {self.ignore_index}; they count as no class, as in "
                          f"mmseg. Masks with values 0/255 need converting to 0/1 (value >= 128 "
                          f"-> 1) first", RuntimeWarning, stacklevel=2)
            self._warned = True
        # out-of-range values go to an extra bin n, which no class counts
        p = torch.where((p >= 0) & (p < n), p, torch.full_like(p, n))
        l = torch.where((l >= 0) & (l < n), l, torch.full_like(l, n))
        cm = torch.bincount(l * (n + 1) + p, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
        if prob is not None:
            self._add_probs(prob, valid, l, n)
        self._with_probs = prob is not None
        self._cm += cm.cpu().numpy()
        self.num_images += pred.shape[0] if pred.dim() == 3 else 1

    def _add_probs(self, prob, valid, l, n):
        """Histogram the logits of the scored pixels' probabilities by label (see the module
        docstring); l: their labels, out-of-range values already mapped to n."""
        prob = self._as_tensor(prob, "prob").to(valid.device)
        if prob.shape != valid.shape:
            raise ValueError(f"SegMetric.update: prob shape {tuple(prob.shape)} != label shape "
                             f"{tuple(valid.shape)}")
        if not prob.is_floating_point():
            raise TypeError("SegMetric.update: prob must hold float probabilities in [0, 1]")
        p = prob[valid].double()
        if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError("SegMetric.update: prob must be probabilities in [0, 1] (NaN or "
                             "values outside found); pass softmax(logits)[:, 1], not logits")
        z = (torch.log(p) - torch.log1p(-p)).clamp_(-_LOGIT_RANGE, _LOGIT_RANGE)
        bins = ((z + _LOGIT_RANGE) * (AUC_BINS / (2 * _LOGIT_RANGE))).long().clamp_(
            0, AUC_BINS - 1)
        scored = l < n  # labels of no class are in no class's counts, nor here
        positive = (l == VESSEL).long()
        hist = torch.bincount((positive * AUC_BINS + bins)[scored], minlength=2 * AUC_BINS)
        self._hist += hist.reshape(2, AUC_BINS).cpu().numpy()

    def reduce_counts(self, fn):
        """Replace the pooled counts by ``fn(counts)``, an int64 tensor holding all of them (e.g.
        a sum over processes: ``lambda t: all_reduce_sum(t)``); returns self."""
        cm, hist = self._cm, self._hist
        flat = torch.from_numpy(np.concatenate([cm.ravel(), hist.ravel()]))
        flat = fn(flat).cpu().numpy()
        self._cm = flat[:cm.size].reshape(cm.shape).copy()
        self._hist = flat[cm.size:].reshape(hist.shape).copy()
        if self._hist.any():
            self._with_probs = True
        return self

    def areas(self):
        """(intersect, union, pred, label) pixel counts per class, int64 arrays."""
        n = self.num_classes
        cm = self._cm
        inter = np.diag(cm)[:n].copy()
        area_pred = cm[:, :n].sum(0)
        area_label = cm[:n, :].sum(1)
        return inter, area_pred + area_label - inter, area_pred, area_label

    def compute(self):
        """Metrics in percent: aAcc, mIoU, mDice, mAcc, IoU/Dice/Acc per class, vessel_dice."""
        inter, union, area_pred, area_label = (a.astype(np.float64) for a in self.areas())
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union
            dice = 2 * inter / (area_pred + area_label)
            acc = inter / area_label
            aacc = inter.sum() / area_label.sum()
        res = {"aAcc": float(aacc * 100),
               "mIoU": _nanmean(iou) * 100, "mDice": _nanmean(dice) * 100,
               "mAcc": _nanmean(acc) * 100}
        for name, i, d, a in zip(self.class_names, iou, dice, acc):
            res[f"IoU.{name}"] = float(i * 100)
            res[f"Dice.{name}"] = float(d * 100)
            res[f"Acc.{name}"] = float(a * 100)
        res["vessel_dice"] = float(dice[1] * 100) if self.num_classes > 1 else float("nan")
        res.update(self._vessel_rates())
        if self._with_probs:
            res["vessel_auc"] = self._auc()[0] * 100
        return res

    def _vessel_rates(self):
        """Se, Sp and accuracy of vessel (class 1) against all other classes, in percent."""
        n, cm = self.num_classes, self._cm.astype(np.float64)
        if n < 2:
            return {"vessel_se": float("nan"), "vessel_sp": float("nan"),
                    "vessel_acc": float("nan")}
        negatives = [c for c in range(n) if c != VESSEL]
        tp, pos = cm[VESSEL, VESSEL], cm[VESSEL].sum()  # FN includes predictions of no class
        fp, neg = cm[negatives, VESSEL].sum(), cm[negatives].sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            se, sp = np.float64(tp) / pos, (neg - fp) / np.float64(neg)
            acc = (tp + neg - fp) / np.float64(pos + neg)
        return {"vessel_se": float(se * 100), "vessel_sp": float(sp * 100),
                "vessel_acc": float(acc * 100)}

    def _auc(self):
        """(AUC, error bound) as fractions from the histogram; nan without both classes."""
        neg, pos = self._hist.astype(np.float64)
        pairs = pos.sum() * neg.sum()
        if pairs == 0:
            return float("nan"), float("nan")
        below = np.cumsum(neg) - neg  # negatives in lower bins than each bin
        tied = float(np.dot(pos, neg))
        return float((np.dot(pos, below) + 0.5 * tied) / pairs), 0.5 * tied / pairs

    def auc_error_bound(self):
        """Largest possible |vessel_auc - exact AUC| in percentage points (module docstring);
        nan when no probabilities were given or a class is missing."""
        return self._auc()[1] * 100 if self._with_probs else float("nan")

    def table(self):
        """Per-class and summary tables as text, laid out like mmseg's log (2 decimals)."""
        r = self.compute()
        rows = [[name, _fmt(r[f"IoU.{name}"]), _fmt(r[f"Acc.{name}"]), _fmt(r[f"Dice.{name}"])]
                for name in self.class_names]
        per_class = _grid(["Class", "IoU", "Acc", "Dice"], rows)
        summary = _grid(["aAcc", "mIoU", "mAcc", "mDice"],
                        [[_fmt(r["aAcc"]), _fmt(r["mIoU"]), _fmt(r["mAcc"]), _fmt(r["mDice"])]])
        return f"per class results:\n{per_class}\nSummary:\n{summary}"

    def vessel_table(self):
        """The field's metrics of vessel as the positive class: Se, Sp, Acc, AUC (when
        probabilities were given) and Dice, as a table (2 decimals, percent)."""
        r = self.compute()
        keys = [("Se", "vessel_se"), ("Sp", "vessel_sp"), ("Acc", "vessel_acc"),
                ("AUC", "vessel_auc"), ("Dice", "vessel_dice")]
        keys = [(h, k) for h, k in keys if k in r]
        return "vessel metrics (vessel positive):\n" + _grid(
            [h for h, _ in keys], [[_fmt(r[k]) for _, k in keys]])


def _nanmean(x):
    x = np.asarray(x, np.float64)
    return float("nan") if np.isnan(x).all() else float(np.nanmean(x))


def _fmt(v):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _grid(header, rows):
    """A PrettyTable-style box with centred cells."""
    widths = [max(len(str(c)) for c in col) + 2 for col in zip(header, *rows)]
    line = "+" + "+".join("-" * w for w in widths) + "+"
    fmt = lambda cells: "|" + "|".join(str(c).center(w) for c, w in zip(cells, widths)) + "|"
    return "\n".join([line, fmt(header), line, *(fmt(r) for r in rows), line])

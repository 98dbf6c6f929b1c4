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
"""
import math
import warnings

import numpy as np
import torch

__all__ = ["SegMetric"]


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

    def update(self, pred, label, fov=None):
        """Add integer predictions (H,W) or (N,H,W) (tensor or ndarray) against same-shape labels.

        fov: optional bool mask of the same shape (or (H,W) broadcast over N); only pixels inside
        it are scored.
        """
        pred = self._as_tensor(pred, "pred")
        label = self._as_tensor(label, "label")
        if pred.shape != label.shape:
            raise ValueError(f"SegMetric.update: pred shape {tuple(pred.shape)} != label shape "
                             f"{tuple(label.shape)}")
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
        self._cm += cm.cpu().numpy()
        self.num_images += pred.shape[0] if pred.dim() == 3 else 1

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
        return res

    def table(self):
        """Per-class and summary tables as text, laid out like mmseg's log (2 decimals)."""
        r = self.compute()
        rows = [[name, _fmt(r[f"IoU.{name}"]), _fmt(r[f"Acc.{name}"]), _fmt(r[f"Dice.{name}"])]
                for name in self.class_names]
        per_class = _grid(["Class", "IoU", "Acc", "Dice"], rows)
        summary = _grid(["aAcc", "mIoU", "mAcc", "mDice"],
                        [[_fmt(r["aAcc"]), _fmt(r["mIoU"]), _fmt(r["mAcc"]), _fmt(r["mDice"])]])
        return f"per class results:\n{per_class}\nSummary:\n{summary}"


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

"""Segmentation losses: cross-entropy and the Dice loss behind the published UNet numbers.

Both take logits (N, C, H, W) and an int64 label (N, H, W) and return ``loss_weight * loss``.
Built from mmseg-style dicts: ``dict(type='CrossEntropyLoss', loss_weight=0.4)``,
``dict(type='DiceLoss', loss_name='loss_dice', loss_weight=3.0)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

_EPS = torch.finfo(torch.float32).eps  # mmseg's weight_reduce_loss divides by (avg_factor + eps)


def _class_weight(class_weight):
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        raise ValueError("class_weight from a file is not supported: give a list of floats")
    return [float(w) for w in class_weight]


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy averaged over the non-ignored pixels, times ``loss_weight``.

    ``avg_non_ignore=False`` averages over all pixels instead (ignored ones count as 0), which is
    mmseg's default; the two agree whenever the label holds no ``ignore_index`` pixel, as in the
    published training pipeline (crops never need padding there).
    """

    def __init__(self, use_sigmoid=False, use_mask=False, reduction="mean", class_weight=None,
                 loss_weight=1.0, loss_name="loss_ce", avg_non_ignore=True):
        super().__init__()
        if use_sigmoid or use_mask:
            raise NotImplementedError("CrossEntropyLoss: only the softmax form "
                                      "(use_sigmoid=False, use_mask=False) is implemented")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.class_weight = _class_weight(class_weight)
        self.loss_weight = loss_weight
        self.avg_non_ignore = avg_non_ignore
        self._loss_name = loss_name

    @property
    def loss_name(self):
        """Key of this loss in the loss dict."""
        return self._loss_name

    def extra_repr(self):
        return f"loss_weight={self.loss_weight}, avg_non_ignore={self.avg_non_ignore}"

    def forward(self, cls_score, label, ignore_index=255, **kwargs):
        """Weighted CE of logits ``cls_score`` (N, C, H, W) against ``label`` (N, H, W)."""
        weight = None if self.class_weight is None else cls_score.new_tensor(self.class_weight)
        loss = F.cross_entropy(cls_score, label, weight=weight, reduction="none",
                               ignore_index=ignore_index)
        if self.reduction == "none":
            return self.loss_weight * loss
        if self.reduction == "sum":
            return self.loss_weight * loss.sum()
        valid = label != ignore_index
        if weight is not None:
            # PyTorch's weighted mean: divide by the summed weights of the counted pixels
            w = weight[label.clamp(0, weight.numel() - 1)] * valid
            avg_factor = w.sum() + (0 if self.avg_non_ignore else (~valid).sum())
        else:
            avg_factor = valid.sum() if self.avg_non_ignore else label.numel()
        return self.loss_weight * loss.sum() / (avg_factor + _EPS)


class DiceLoss(nn.Module):
    """The Dice loss of the published ``ce-1.0-dice-3.0`` UNet results (mmseg 0.x ``DiceLoss``).

    With softmax probabilities p and one-hot target t, per image and per class
    ``1 - (2·Σ p·t + smooth) / (Σ p^exponent + Σ t^exponent + smooth)``, sums over the pixels
    whose label is not ``ignore_index``, averaged over classes and then images (``reduction``).
    This is not mmseg 1.2's newer ``DiceLoss``.
    """

    def __init__(self, smooth=1, exponent=2, reduction="mean", class_weight=None,
                 loss_weight=1.0, ignore_index=255, loss_name="loss_dice", **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"DiceLoss: unsupported arguments {sorted(kwargs)} (fastunet's "
                             f"DiceLoss is the published mmseg 0.x one: smooth, exponent, "
                             f"reduction, class_weight, loss_weight, ignore_index, loss_name)")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.smooth = smooth
        self.exponent = exponent
        self.reduction = reduction
        self.class_weight = _class_weight(class_weight)
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self._loss_name = loss_name

    @property
    def loss_name(self):
        """Key of this loss in the loss dict."""
        return self._loss_name

    def extra_repr(self):
        return f"loss_weight={self.loss_weight}, smooth={self.smooth}, exponent={self.exponent}"

    def forward(self, pred, target, **kwargs):
        """Weighted Dice loss of logits ``pred`` (N, C, H, W) against ``target`` (N, H, W)."""
        num_classes = pred.shape[1]
        prob = F.softmax(pred, dim=1).flatten(2)                      # (N, C, HW)
        valid = (target != self.ignore_index).flatten(1).unsqueeze(1)  # (N, 1, HW)
        # one-hot by comparison: F.one_hot reads the label range back to the host on the CPU
        classes = torch.arange(num_classes, device=target.device).view(1, -1, 1)
        onehot = (target.clamp(0, num_classes - 1).flatten(1).unsqueeze(1) == classes).to(
            prob.dtype)                                                # (N, C, HW)
        prob, onehot = prob * valid, onehot * valid
        num = 2 * (prob * onehot).sum(-1) + self.smooth
        den = prob.pow(self.exponent).sum(-1) + onehot.pow(self.exponent).sum(-1) + self.smooth
        per_class = 1 - num / den                                      # (N, C)
        if self.class_weight is not None:
            per_class = per_class * per_class.new_tensor(self.class_weight)
        per_image = per_class.sum(1) / num_classes
        if self.reduction == "mean":
            loss = per_image.mean()
        elif self.reduction == "sum":
            loss = per_image.sum()
        else:
            loss = per_image
        return self.loss_weight * loss


LOSSES = {"CrossEntropyLoss": CrossEntropyLoss, "DiceLoss": DiceLoss}


def build_loss(cfg):
    """Build a loss from ``dict(type='CrossEntropyLoss'|'DiceLoss', ...)``."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in LOSSES:
        raise ValueError(f"unsupported loss type {kind!r}: use one of {sorted(LOSSES)}")
    return LOSSES[kind](**cfg)

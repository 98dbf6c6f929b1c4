"""Losses: CE and the published Dice loss, checked against numbers worked out by hand."""
import math

import pytest
import torch

from fastunet.models import CrossEntropyLoss, DiceLoss, build_loss

# one image, 2 classes, 1x3 pixels; softmax of (0, log 3) is (1/4, 3/4)
LOGITS = torch.tensor([[[[0.0, 0.0, 0.0]], [[math.log(3), 0.0, -math.log(3)]]]])
LABEL = torch.tensor([[[1, 0, 255]]])


def test_cross_entropy_by_hand():
    # pixel 0: -log(3/4); pixel 1: -log(1/2); pixel 2 ignored -> mean over 2 pixels
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    ce = CrossEntropyLoss(loss_weight=0.4)
    assert ce(LOGITS, LABEL).item() == pytest.approx(0.4 * expected, rel=1e-6)
    # mmseg's default averaging (over all 3 pixels) stays available
    legacy = CrossEntropyLoss(avg_non_ignore=False)
    assert legacy(LOGITS, LABEL).item() == pytest.approx(expected * 2 / 3, rel=1e-6)


def test_cross_entropy_class_weight_is_a_weighted_mean():
    ce = CrossEntropyLoss(class_weight=[1.0, 3.0])
    expected = (3 * -math.log(0.75) + 1 * -math.log(0.5)) / (3 + 1)
    assert ce(LOGITS, LABEL).item() == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand():
    # valid pixels 0 and 1 (pixel 2 is ignored): p1 = (3/4, 1/2), p0 = (1/4, 1/2),
    # t1 = (1, 0), t0 = (0, 1); smooth 1, exponent 2
    d1 = 1 - (2 * 0.75 + 1) / ((0.75**2 + 0.5**2) + 1 + 1)
    d0 = 1 - (2 * 0.5 + 1) / ((0.25**2 + 0.5**2) + 1 + 1)
    dice = DiceLoss(loss_weight=3.0)
    assert dice(LOGITS, LABEL).item() == pytest.approx(3.0 * (d0 + d1) / 2, rel=1e-6)


def test_dice_averages_classes_then_images():
    torch.manual_seed(0)
    logits, label = torch.randn(3, 2, 5, 4), torch.randint(0, 2, (3, 5, 4))
    per_image = torch.stack([DiceLoss()(logits[i:i + 1], label[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(DiceLoss()(logits, label), per_image.mean())
    torch.testing.assert_close(DiceLoss(reduction="none")(logits, label), per_image)


def test_dice_perfect_prediction_is_near_zero_and_gradient_flows():
    label = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.stack([(label == 0).float(), (label == 1).float()], 1) * 30
    assert DiceLoss()(logits, label).item() < 1e-6
    x = torch.randn(1, 2, 2, 2, requires_grad=True)
    DiceLoss()(x, label).backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [CrossEntropyLoss(), DiceLoss()], ids=["ce", "dice"])
def test_ignored_pixels_do_not_matter(loss):
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, requires_grad=True)
    label = torch.randint(0, 2, (2, 6, 6))
    label[:, :2] = 255
    value = loss(logits, label)
    changed = logits.detach().clone()
    changed[:, :, :2] = torch.randn(2, 2, 2, 6) * 10
    torch.testing.assert_close(loss(changed, label), value)
    value.backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and logits.grad[:, :, 2:].abs().sum() > 0


def test_all_ignored_gives_zero_not_nan():
    label = torch.full((1, 2, 2), 255)
    assert CrossEntropyLoss()(torch.randn(1, 2, 2, 2), label).item() == 0.0


def test_build_loss_from_mmseg_dicts():
    ce = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4))
    assert ce.loss_name == "loss_ce" and ce.loss_weight == 0.4
    dice = build_loss(dict(type="DiceLoss", loss_name="loss_dice", loss_weight=3.0))
    assert dice.loss_name == "loss_dice" and dice.loss_weight == 3.0
    with pytest.raises(ValueError, match="unsupported loss type 'FocalLoss'"):
        build_loss(dict(type="FocalLoss"))
    with pytest.raises(ValueError, match="use_sigmoid"):
        build_loss(dict(type="DiceLoss", use_sigmoid=True))

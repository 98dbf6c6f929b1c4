"""Activation recipes: a U-Net-shaped net keeps far fewer bytes and gets the same gradients."""

import pytest
import torch
import torch.nn as nn

from fastunet import _native
from fastunet.nn import ConvBNReLU, MaxPool2d
from fastunet.ops import recompute
from fused_helpers import saved_bytes, unfused

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")


class MiniUNet(nn.Module):
    """Two encoder stages, one decoder stage and an FCN-style head, wired like UNet-S5-D16."""

    def __init__(self, c=8):
        super().__init__()
        block = lambda i, o: nn.Sequential(ConvBNReLU(i, o, 3, padding=1),
                                           ConvBNReLU(o, o, 3, padding=1))
        self.enc0 = block(3, c)
        self.pool = MaxPool2d(2)
        self.enc1 = block(c, 2 * c)
        self.up = ConvBNReLU(2 * c, c, 1)  # InterpConv: upsample, then 1x1 conv-BN-ReLU
        self.dec = block(2 * c, c)
        self.head = ConvBNReLU(c, c, 3, padding=1)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        skip = self.enc0(x)
        deep = self.enc1(self.pool(skip))
        up = self.up(recompute.interpolate(deep, scale_factor=2, mode="bilinear",
                                           align_corners=False))
        y = self.dec(recompute.cat([skip, up], dim=1))
        return self.conv_seg(self.dropout(self.head(y)))


def run(model, x, seed=0):
    torch.manual_seed(seed)  # the same dropout mask for both models
    return model(x)


def test_unet_shape_saves_under_half_and_matches_gradients():
    torch.manual_seed(1)
    fused = MiniUNet().double().train()
    plain = unfused(fused)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fb, yf = saved_bytes(lambda: run(fused, x), fused)
    pb, yp = saved_bytes(lambda: run(plain, x), plain)
    assert fb / pb < 0.5, (fb, pb)
    torch.testing.assert_close(yf, yp)
    g = torch.randn_like(yp)
    for a, b in zip(torch.autograd.grad(yf, list(fused.parameters()), g),
                    torch.autograd.grad(yp, list(plain.parameters()), g)):
        torch.testing.assert_close(a, b)
    for a, b in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b)


def test_glue_outputs_get_recipes_only_when_tracking():
    block = ConvBNReLU(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert recompute.recipe_of(block(x)) is None  # inference: no bookkeeping
    y = block(x)
    assert recompute.recipe_of(y) is not None
    assert recompute.recipe_of(MaxPool2d(2)(y)) is not None
    assert recompute.recipe_of(recompute.interpolate(y, scale_factor=2)) is not None
    assert recompute.recipe_of(recompute.cat([y, y], 1)) is not None
    assert recompute.recipe_of(recompute.cat([y, torch.randn_like(y)], 1)) is None
    rebuilt = recompute.recipe_of(recompute.cat([y, y], 1)).materialize()
    torch.testing.assert_close(rebuilt, torch.cat([y, y], 1), rtol=0, atol=0)


def test_rebuilding_after_a_parameter_changed_in_place_raises():
    a, b = ConvBNReLU(3, 4, 3, padding=1), ConvBNReLU(4, 4, 3, padding=1)
    out = b(a(torch.randn(2, 3, 8, 8)))
    with torch.no_grad():
        a.bn.weight.mul_(2)  # what the rebuilt input of b depends on
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()

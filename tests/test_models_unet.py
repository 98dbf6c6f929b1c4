"""UNet backbone: mmseg's layout, outputs, input check, norm_eval, with_cp, deconv, init."""
import pytest
import torch
import torch.nn as nn

from fastunet.models import UNet


def small(**kw):
    return UNet(base_channels=4, **kw)


def test_parameter_count_of_unet_s5_d16():
    with torch.device("meta"):
        net = UNet()
    assert sum(p.numel() for p in net.parameters()) == 28_949_568


def test_five_outputs_deepest_first():
    torch.manual_seed(0)
    outs = small().eval()(torch.randn(2, 3, 32, 48))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 2, 3), (2, 32, 4, 6), (2, 16, 8, 12),
                                             (2, 8, 16, 24), (2, 4, 32, 48)]


def test_key_layout_follows_mmseg():
    keys = list(small().state_dict())
    assert keys[0] == "encoder.0.0.convs.0.conv.weight"
    assert "encoder.1.0.weight" not in keys  # index 0 of stages 1..4 is the (stateless) max-pool
    assert "encoder.4.1.convs.1.bn.num_batches_tracked" in keys
    # within a decoder stage conv_block precedes upsample; the 1x1 conv is index 1 after the resize
    first_upsample = next(i for i, k in enumerate(keys) if k.startswith("decoder.0.upsample"))
    last_conv_block = max(i for i, k in enumerate(keys) if k.startswith("decoder.0.conv_block"))
    assert last_conv_block < first_upsample
    assert "decoder.3.upsample.interp_upsample.1.conv.weight" in keys
    assert keys.index("encoder.4.1.convs.1.bn.num_batches_tracked") < keys.index(
        "decoder.0.conv_block.convs.0.conv.weight")


@pytest.mark.parametrize("shape", [(1, 3, 40, 32), (1, 3, 32, 20), (1, 3, 8, 16)])
def test_input_not_divisible_by_16_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"divisible by the encoder's downsample rate 16"):
        small()(torch.zeros(shape))


def test_downsample_rate_counts_strides_and_pools():
    assert UNet(base_channels=2, downsamples=(True, False, True, True)).downsample_rate == 8
    net = UNet(base_channels=2, strides=(1, 2, 1, 1, 1), downsamples=(False, True, True, True))
    assert net.downsample_rate == 16
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.encoder[1])  # strided conv instead
    net.eval()(torch.zeros(1, 3, 16, 16))


def test_norm_eval_keeps_bn_frozen_in_train_mode():
    torch.manual_seed(0)
    net = small(norm_eval=True).train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert net.training and net.encoder[0][0].convs[0].conv.training
    before = bns[0].running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    assert all(m.training for m in small(norm_eval=False).train().modules()
               if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("upsample", ["InterpConv", "DeconvModule"])
def test_with_cp_gives_the_same_outputs_and_gradients(upsample):
    torch.manual_seed(0)
    ref = small(upsample_cfg=dict(type=upsample)).train()
    cp = small(upsample_cfg=dict(type=upsample), with_cp=True).train()
    cp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    outs = [net(x) for net in (ref, cp)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    for net, out in zip((ref, cp), outs):
        sum((o * o).mean() for o in out).backward()
    for (name, a), b in zip(ref.named_parameters(), cp.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_deconv_module_layout_and_shapes():
    net = small(upsample_cfg=dict(type="DeconvModule"))
    sd = net.state_dict()
    assert sd["decoder.0.upsample.deconv_upsamping.0.weight"].shape == (8, 4, 4, 4)  # in, out, k, k
    assert sd["decoder.0.upsample.deconv_upsamping.0.bias"].shape == (4,)
    assert "decoder.0.upsample.deconv_upsamping.1.running_var" in sd
    outs = net.eval()(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs][-1] == (4, 32, 32)


def test_init_like_mmseg():
    torch.manual_seed(0)
    net = UNet(base_channels=16)
    w = net.encoder[4][1].convs[1].conv.weight  # 256 x 256 x 3 x 3
    std = (2.0 / (256 * 9)) ** 0.5  # Kaiming normal, fan_out, relu
    assert abs(w.std().item() - std) / std < 0.05
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strides=(1, 1, 1, 1)), "len\\(strides\\) must be 5"),
    (dict(dec_num_convs=(2, 2, 2, 2, 2)), "len\\(dec_num_convs\\) must be 4"),
    (dict(pretrained="x.pth"), "load_checkpoint"),
    (dict(upsample_cfg=dict(type="PixelShuffle")), "unsupported upsample_cfg"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(base_channels=2, **kwargs)

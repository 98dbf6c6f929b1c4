"""The fused kernels on the real segmentor: fuse() for inference, the lean training path."""

import pytest
import torch

import fastunet
from fastunet import _native
from fastunet.models import apply_overrides, build_segmentor, get_config
from fastunet.nn import ConvBNReLU
from fused_helpers import saved_bytes, trained_looking_bn, unfused

needs_native = pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")


def segmentor(name="fcn_unet_s5-d16_64x64_40k_drive", base=64):
    overrides = [] if base == 64 else [
        f"model.backbone.base_channels={base}", f"model.decode_head.in_channels={base}",
        f"model.auxiliary_head.in_channels={2 * base}"]
    torch.manual_seed(0)
    return trained_looking_bn(build_segmentor(apply_overrides(get_config(name), overrides)))


@pytest.mark.parametrize("name, base", [("fcn_unet_s5-d16_64x64_40k_drive", 64),
                                        ("pspnet_unet_s5-d16_64x64_40k_drive", 16),
                                        ("deeplabv3_unet_s5-d16_64x64_40k_drive", 16)],
                         ids=["fcn-full", "pspnet", "deeplabv3"])
def test_fuse_full_segmentor_matches_unfused(name, base):
    model = segmentor(name, base).eval()
    plain = unfused(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = plain.encode_decode(x)
        fused = fastunet.fuse(model)
        got = fused.encode_decode(x)
    assert fused is model and list(model.state_dict()) == keys
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@needs_native
def test_training_step_same_numbers_and_under_half_the_saved_bytes():
    model = segmentor(base=16).double().train()
    plain = unfused(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    label = torch.randint(0, 2, (2, 64, 64))

    def loss(m):
        torch.manual_seed(2)  # one dropout mask for both
        return sum(m.loss(x, label).values())

    fb, lf = saved_bytes(lambda: loss(model), model)
    pb, lp = saved_bytes(lambda: loss(plain), plain)
    assert fb / pb < 0.5, (fb, pb)  # about 0.4 (UNet-S5-D16 + FCN, fp32 or fp64)
    torch.testing.assert_close(lf, lp)
    params = [p for p in model.parameters() if p.requires_grad]
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(lf, params), torch.autograd.grad(lp, plain_params)):
        torch.testing.assert_close(a, b)
    for (k, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


@needs_native
def test_fused_cpu_model_runs_nchw_inputs_channels_last_inside():
    model = segmentor("fcn_unet_s5-d16_64x64_40k_drive", 16).eval()
    plain = unfused(model)
    x = torch.randn(2, 3, 64, 64)
    cl = torch.channels_last
    assert fastunet.nn.cpu_fused_layout(model, x) == cl
    assert fastunet.nn.cpu_fused_layout(plain, x) is None  # the reference stays NCHW
    assert fastunet.nn.cpu_fused_layout(model, x.contiguous(memory_format=cl)) is None
    assert fastunet.nn.cpu_fused_layout(model, x.double()) is None
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        got, expected = model.encode_decode(x), plain.encode_decode(x)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=cl) and not seen[0].is_contiguous()
    assert got.is_contiguous()  # the logits come back in the input's layout
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # training: the fused blocks get channels_last activations, the losses match the modules'
    model.train()
    plain.train()
    label = torch.randint(0, 2, (2, 64, 64))
    seen.clear()
    hook = model.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    torch.manual_seed(2)  # one dropout mask for both
    lf = model.loss(x, label)
    torch.manual_seed(2)
    lp = plain.loss(x, label)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=cl)
    for k in lp:
        torch.testing.assert_close(lf[k], lp[k], rtol=1e-4, atol=1e-5)

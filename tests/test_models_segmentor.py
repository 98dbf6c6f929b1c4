"""EncoderDecoder: every config builds with mmseg's keys, heads, losses, slide/whole inference."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet.models import apply_overrides, build_segmentor, get_config, list_configs
from fastunet.ops.tile_reference import slide_inference

DATA = os.path.join(os.path.dirname(__file__), "data")
HEAD_OF = {"fcn": "FCNHead", "pspnet": "PSPHead", "deeplabv3": "ASPPHead"}


def mmseg_keys():
    with open(os.path.join(DATA, "mmseg_state_dict_keys.json")) as f:
        return json.load(f)["keys"]


def tiny(name="fcn_unet_s5-d16_64x64_40k_drive", base=4, **test_cfg):
    cfg = apply_overrides(get_config(name), [
        f"model.backbone.base_channels={base}", f"model.decode_head.in_channels={base}",
        "model.decode_head.channels=8", f"model.auxiliary_head.in_channels={2 * base}",
        "model.auxiliary_head.channels=8"])
    cfg["model"]["test_cfg"].update(test_cfg)
    torch.manual_seed(0)
    return build_segmentor(cfg)


@pytest.mark.parametrize("name", [n for n in list_configs() if n != "synthetic"])
def test_every_published_config_has_mmseg_keys_in_order(name):
    with torch.device("meta"):
        model = build_segmentor(get_config(name))
    expected = mmseg_keys()[HEAD_OF[name.split("_")[0]]]
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == expected


def test_head_settings_of_the_published_table():
    with torch.device("meta"):
        fcn = build_segmentor(get_config("fcn_unet_s5-d16_64x64_40k_drive"))
        psp = build_segmentor(get_config("pspnet_unet_s5-d16_128x128_40k_stare"))
        aspp = build_segmentor(get_config("deeplabv3_unet_s5-d16_256x256_40k_hrf"))
    head = fcn.decode_head
    assert (head.in_index, head.channels, head.num_convs) == (4, 64, 1)
    assert not fcn.decode_head.concat_input and fcn.decode_head.dropout.p == 0.1
    assert psp.decode_head.pool_scales == (1, 2, 3, 6) and psp.decode_head.channels == 16
    assert aspp.decode_head.dilations == (1, 12, 24, 36) and aspp.decode_head.channels == 16
    assert [m.conv.dilation for m in aspp.decode_head.aspp_modules] == [(1, 1), (12, 12), (24, 24),
                                                                      (36, 36)]
    for model in (fcn, psp, aspp):
        aux = model.auxiliary_head
        assert (aux.in_channels, aux.in_index, aux.channels) == (128, 3, 64)
        assert aux.loss_decode.loss_weight == 0.4
        assert list(model.state_dict())[:1] == ["backbone.encoder.0.0.convs.0.conv.weight"]


def test_synthetic_config_builds_and_runs():
    cfg = get_config("synthetic")
    model = build_segmentor(cfg).eval()
    assert model.backbone.base_channels == cfg["model"]["backbone"]["base_channels"]
    with torch.no_grad():
        assert model.inference(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)


def test_encode_decode_and_forward():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model.encode_decode(x)
        assert out.shape == (2, 2, 32, 48)
        torch.testing.assert_close(model(x), out)
        feats = model.extract_feat(x)
        assert len(feats) == 5 and feats[4].shape[1] == 4


@pytest.mark.parametrize("size, crop, stride", [((97, 131), (64, 64), (42, 42)),
                                                ((48, 32), (64, 64), (42, 42)),
                                                ((16, 80), (32, 32), (21, 21)),
                                                ((64, 64), (64, 64), (42, 42)),
                                                ((96, 80), (48, 32), (16, 32))])
def test_slide_inference_matches_mmseg_loop(size, crop, stride):
    model = tiny(crop_size=crop, stride=stride).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model.inference(x)
        torch.testing.assert_close(out, slide_inference(model.encode_decode, x, crop, stride),
                                   rtol=1e-5, atol=1e-6)
    assert out.shape == (2, 2, *size)


def test_whole_inference():
    model = tiny(mode="whole").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.inference(x), model.encode_decode(x))



def test_inference_takes_any_mode_over_the_config_default():
    model = tiny().eval()  # a slide config
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(model.inference(x, mode="whole"), model.encode_decode(x))
        tile = model.inference(x, mode="overlap-tile", tile_size=64, margin=16)
        assert tile.shape == (1, 2, 48, 80) and torch.isfinite(tile).all()
        # overlap-tile pads by reflection, so it differs from whole near borders only
        assert not torch.equal(tile, model.encode_decode(x))
        with pytest.raises(ValueError, match="unknown inference mode 'tiles'"):
            model.inference(x, mode="tiles")
    whole = tiny(mode="whole")
    whole.test_cfg = {"mode": "whole"}  # a whole-image config without window settings
    with pytest.raises(ValueError, match="crop_size and stride"):
        whole.inference(x, mode="slide")

def test_loss_keys_and_values():
    model = tiny().train()
    for m in model.modules():  # dropout off so the heads can be recomputed by hand
        if isinstance(m, torch.nn.Dropout2d):
            m.eval()
    x, label = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    losses = model.loss(x, label)
    assert sorted(losses) == ["aux.loss_ce", "decode.loss_ce"]
    feats = model.extract_feat(x)
    aux_logits = model.auxiliary_head(feats)
    assert aux_logits.shape[-1] == 16  # H/2: resized to the label size before the loss
    aux = F.cross_entropy(F.interpolate(aux_logits, (32, 32), mode="bilinear",
                                        align_corners=False), label)
    dec = F.cross_entropy(model.decode_head(feats), label)
    torch.testing.assert_close(losses["aux.loss_ce"], 0.4 * aux)
    torch.testing.assert_close(losses["decode.loss_ce"], dec)
    sum(losses.values()).backward()
    assert model.backbone.encoder[0][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_dice_config_adds_weighted_dice():
    model = tiny("pspnet_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive").eval()
    x, label = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    label[0, :4] = 255
    losses = model.loss(x, label.unsqueeze(1))  # (N, 1, H, W) labels are accepted too
    assert sorted(losses) == ["aux.loss_ce", "decode.loss_ce", "decode.loss_dice"]
    dice = model.decode_head.loss_decode[1]
    torch.testing.assert_close(losses["decode.loss_dice"],
                               dice(model.encode_decode(x), label))
    assert dice.loss_weight == 3.0


def test_build_segmentor_accepts_full_config_or_model_part_and_refuses_bad_ones():
    cfg = get_config("synthetic")
    a, b = build_segmentor(cfg), build_segmentor(cfg["model"])
    assert list(a.state_dict()) == list(b.state_dict())
    assert cfg == get_config("synthetic")  # the config is not modified
    mm_style = dict(cfg["model"], data_preprocessor=dict(type="SegDataPreProcessor"),
                    pretrained=None, train_cfg=dict())
    build_segmentor(mm_style)
    with pytest.raises(ValueError, match="unsupported head type 'UPerHead'"):
        build_segmentor(apply_overrides(get_config("synthetic"),
                                        ["model.decode_head.type=UPerHead"]))
    with pytest.raises(ValueError, match="unsupported backbone type"):
        build_segmentor(dict(cfg["model"], backbone=dict(type="ResNet")))
    with pytest.raises(ValueError, match="test_cfg mode"):
        build_segmentor(dict(cfg["model"], test_cfg=dict(mode="tta")))
    with pytest.raises(TypeError, match="get_config"):
        build_segmentor("synthetic")


def test_public_names():
    assert fastunet.build_segmentor is build_segmentor
    assert fastunet.get_config is get_config
    assert fastunet.models.UNet is fastunet.models.unet.UNet


def test_weights_version_tracks_training_steps_loads_and_mode():
    # The inference engine recaptures its CUDA graphs when this changes (graphs replay the
    # weights of their capture), so every way weights change must change it.
    model = tiny().eval()
    v0 = model.weights_version()
    assert model.weights_version() == v0
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    assert model.weights_version() != v0
    x = torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 2, (2, 32, 32))
    sum(model.loss(x, label).values()).backward()
    v1 = model.weights_version()
    sgd.step()
    assert model.weights_version() != v1
    v2 = model.weights_version()
    model.load_state_dict(tiny().state_dict())
    assert model.weights_version() != v2


@pytest.mark.cuda
def test_cuda_graph_inference_sees_weights_trained_after_capture():
    torch.manual_seed(0)
    model = tiny().cuda().eval()
    x = torch.randn(1, 3, 97, 131, device="cuda")
    for _ in range(3):  # the engine captures a graph once a window shape repeats
        model.inference(x, cuda_graphs=True)
    model.train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    label = torch.randint(0, 2, (2, 64, 64), device="cuda")
    sum(model.loss(torch.randn(2, 3, 64, 64, device="cuda"), label).values()).backward()
    sgd.step()
    model.eval()
    with torch.no_grad():
        expected = slide_inference(model.encode_decode, x, 64, 42)
    torch.testing.assert_close(model.inference(x, cuda_graphs=True), expected, rtol=1e-4, atol=1e-4)


def test_init_weights_initialises_as_mmseg_once():
    import warnings

    model = tiny("pspnet_unet_s5-d16_64x64_40k_drive", base=16)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    assert not model.is_init and not model.backbone.is_init
    torch.manual_seed(1)
    model.init_weights()
    assert model.is_init and model.backbone.is_init and model.decode_head.is_init
    assert model.auxiliary_head.is_init
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # Kaiming normal, fan_out, relu: std sqrt(2 / (out * k * k))
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if conv.weight.numel() >= 4096:
            assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
        assert conv.bias is None or not conv.bias.any()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in bns)
    seg = model.decode_head.conv_seg
    assert seg.weight.std().item() == pytest.approx(0.01, rel=0.5) and not seg.bias.any()
    # the PSP bottleneck (a direct child Conv-BN-ReLU) is re-initialised; the pyramid's convs
    # (inside a ModuleList) are not visited, as in mmengine, and keep the 7s
    assert model.decode_head.bottleneck.conv.weight.abs().max() < 7
    assert (model.decode_head.psp_modules[0][1].conv.weight == 7).all()
    # a second call is a no-op that warns (mmengine's rule); seeded calls repeat
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="more than once"):
        model.init_weights()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = tiny("pspnet_unet_s5-d16_64x64_40k_drive", base=16)
    with torch.no_grad():
        for p in again.parameters():
            p.fill_(7.0)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.init_weights()
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items()
               if "running" not in k and "num_batches" not in k)


def test_deconv_upsampler_keeps_its_default_init():
    cfg = apply_overrides(get_config("synthetic"),
                          ["model.backbone.upsample_cfg.type='DeconvModule'"])
    model = build_segmentor(cfg)
    deconvs = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    before = [d.weight.clone() for d in deconvs]
    model.backbone.init_weights()
    assert deconvs and all(torch.equal(b, d.weight) for b, d in zip(before, deconvs))

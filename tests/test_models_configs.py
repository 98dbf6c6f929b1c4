"""Named configs: the published names, mmseg aliases, the recipe table, overrides, suggestions."""
import pytest

import fastunet
from fastunet.models import apply_overrides, get_config, list_configs
from fastunet.models.configs import list_aliases, resolve_name

HEADS = ("fcn", "pspnet", "deeplabv3")
TAGS = ("64x64_40k_drive", "128x128_40k_stare", "128x128_40k_chase_db1", "256x256_40k_hrf")
# dataset -> (crop, stride, image H x W, img_scale, train/val counts) of the mmseg configs
TABLE = {"drive": (64, 42, (584, 565), (584, 565), 20, 20),
         "stare": (128, 85, (605, 700), (605, 700), 10, 10),
         "chase_db1": (128, 85, (960, 999), (960, 999), 20, 8),
         "hrf": (256, 170, (2336, 3504), (2336, 3504), 15, 30)}
MMSEG_1X = ["unet-s5-d16_deeplabv3_4xb4-40k_drive-64x64",
            "unet-s5-d16_deeplabv3_4xb4-40k_hrf-256x256",
            "unet-s5-d16_deeplabv3_4xb4-40k_stare-128x128",
            "unet-s5-d16_deeplabv3_4xb4-ce-1.0-dice-3.0-40k_chase-db1-128x128",
            "unet-s5-d16_deeplabv3_4xb4-ce-1.0-dice-3.0-40k_drive-64x64",
            "unet-s5-d16_deeplabv3_4xb4-ce-1.0-dice-3.0-40k_hrf-256x256",
            "unet-s5-d16_deeplabv3_4xb4-ce-1.0-dice-3.0-40k_stare-128x128",
            "unet-s5-d16_fcn_4xb4-40k_chase-db1-128x128",
            "unet-s5-d16_fcn_4xb4-40k_drive-64x64",
            "unet-s5-d16_fcn_4xb4-40k_hrf-256x256",
            "unet-s5-d16_fcn_4xb4-40k_stare-128x128",
            "unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_chase-db1-128x128",
            "unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_drive-64x64",
            "unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_hrf-256x256",
            "unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_stare-128x128",
            "unet-s5-d16_pspnet_4xb4-40k_chase-db1-128x128",
            "unet-s5-d16_pspnet_4xb4-40k_drive-64x64",
            "unet-s5-d16_pspnet_4xb4-40k_hrf-256x256",
            "unet-s5-d16_pspnet_4xb4-40k_stare-128x128",
            "unet-s5-d16_pspnet_4xb4-ce-1.0-dice-3.0-40k_chase-db1-128x128",
            "unet-s5-d16_pspnet_4xb4-ce-1.0-dice-3.0-40k_drive-64x64",
            "unet-s5-d16_pspnet_4xb4-ce-1.0-dice-3.0-40k_hrf-256x256",
            "unet-s5-d16_pspnet_4xb4-ce-1.0-dice-3.0-40k_stare-128x128",
            "unet_s5-d16_deeplabv3_4xb4-40k_chase-db1-128x128"]  # the files of mmseg 1.2.2


def published():
    return [f"{h}_unet_s5-d16_{d}{t}" for d in ("", "ce-1.0-dice-3.0_") for t in TAGS
            for h in HEADS]


def test_all_published_names_and_synthetic_are_listed():
    assert sorted(list_configs()) == sorted(published() + ["synthetic"])
    assert fastunet.list_configs() == list_configs()


@pytest.mark.parametrize("name", published())
def test_config_values_follow_the_published_recipe(name):
    cfg = get_config(name)
    assert cfg["name"] == name
    ds = next(d for d in TABLE if name.endswith(d))
    crop, stride, image, img_scale, n_train, n_val = TABLE[ds]
    assert cfg["model"]["test_cfg"] == {"mode": "slide", "crop_size": (crop, crop),
                                        "stride": (stride, stride)}
    data = cfg["data"]
    assert (data["crop_size"], data["image_size"], data["img_scale"]) == ((crop, crop), image,
                                                                         img_scale)
    assert (data["ratio_range"], data["cat_max_ratio"], data["num_train"], data["num_val"]) == (
        (0.5, 2.0), 0.75, n_train, n_val)
    assert cfg["train"] == {"max_iters": 40000, "batch_size": 16, "lr": 0.01, "momentum": 0.9,
                            "weight_decay": 5e-4, "min_lr": 1e-4, "power": 0.9,
                            "eval_interval": 4000, "checkpoint_interval": 4000}
    losses = cfg["model"]["decode_head"]["loss_decode"]
    if "dice" in name:
        assert [(c["type"], c["loss_weight"]) for c in losses] == [("CrossEntropyLoss", 1.0),
                                                                   ("DiceLoss", 3.0)]
    else:
        assert (losses["type"], losses["loss_weight"]) == ("CrossEntropyLoss", 1.0)
    assert cfg["model"]["auxiliary_head"]["loss_decode"]["loss_weight"] == 0.4


@pytest.mark.parametrize("alias", MMSEG_1X)
def test_every_mmseg_1x_file_name_is_an_alias(alias):
    name = resolve_name(alias)
    cfg = get_config(f"configs/unet/{alias}.py")  # a config path works too
    assert cfg["name"] == name
    head = next(h for h in HEADS if f"_{h}_" in alias)
    assert name.startswith(head + "_unet_s5-d16_")
    assert ("dice" in alias) == ("dice" in name)
    assert name.endswith(next(t for t in TAGS if t.split("_", 2)[2].replace("_", "-")
                              in alias))


def test_aliases_include_the_0x_chase_db1_dice_file_names():
    assert resolve_name("fcn_unet_s5-d16_ce-1.0-dice-3.0_128x128_40k_chase-db1") == (
        "fcn_unet_s5-d16_ce-1.0-dice-3.0_128x128_40k_chase_db1")
    assert set(MMSEG_1X) <= set(list_aliases())


def test_get_config_returns_a_fresh_copy():
    a = get_config("fcn_unet_s5-d16_64x64_40k_drive")
    a["model"]["backbone"]["base_channels"] = 1
    a["train"]["lr"] = 1.0
    b = get_config("fcn_unet_s5-d16_64x64_40k_drive")
    assert b["model"]["backbone"]["base_channels"] == 64 and b["train"]["lr"] == 0.01


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(KeyError, match="did you mean 'fcn_unet_s5-d16_64x64_40k_drive'") as e:
        get_config("fcn_unet_s5-d16_64x64_40k_driv")
    assert str(e.value).startswith("unknown config 'fcn_unet_s5-d16_64x64_40k_driv'")
    with pytest.raises(KeyError, match="unknown config 'resnet50'"):
        get_config("resnet50")


def test_apply_overrides():
    cfg = get_config("fcn_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive")
    apply_overrides(cfg, ["model.decode_head.dropout_ratio=0", "train.max_iters=100",
                          "model.test_cfg.crop_size=(32, 32)", "data.dataset=MyData",
                          "model.decode_head.loss_decode.1.loss_weight=1.5",
                          "data.data_root=/tmp/a=b", "model.backbone.norm_cfg.momentum=0.01"])
    assert cfg["model"]["decode_head"]["dropout_ratio"] == 0
    assert cfg["train"]["max_iters"] == 100
    assert cfg["model"]["test_cfg"]["crop_size"] == (32, 32)
    assert cfg["data"]["dataset"] == "MyData" and cfg["data"]["data_root"] == "/tmp/a=b"
    assert cfg["model"]["decode_head"]["loss_decode"][1]["loss_weight"] == 1.5
    assert cfg["model"]["backbone"]["norm_cfg"]["momentum"] == 0.01  # new key on a module dict
    fastunet.build_segmentor(apply_overrides(get_config("synthetic"),
                                             ["model.decode_head.dropout_ratio=0"]))


@pytest.mark.parametrize("item, match", [
    ("train.max_iter=5", "unknown config key 'train.max_iter'; did you mean 'train.max_iters'"),
    ("model.decode_head.loss_decode.7.loss_weight=1", "not an index"),
    ("train.lr.x=1", "is a float"),
    ("train.lr", "must look like"),
])
def test_bad_overrides_are_clear_errors(item, match):
    with pytest.raises((KeyError, ValueError), match=match):
        apply_overrides(get_config("fcn_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive"), [item])

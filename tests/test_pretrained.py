"""The weights shipped in fastunet/weights/: their record, strict loading, plain torch.load, the
builder, the default of Predictor and predict, and a plausible mask on a real fundus photograph
(scikit-image's retina photo, when scikit-image is installed)."""
import json
import os
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet import predict, weights
from fastunet.inference.fov import detect_fov
from fastunet.models import save_checkpoint
from fastunet.weights.build import build_weights, sha256, training_fov_diameter


def test_the_record_matches_the_file():
    record = weights.pretrained_record()
    assert record["file"] == os.path.basename(weights.PRETRAINED)
    assert sha256(weights.PRETRAINED) == record["sha256"]
    assert os.path.getsize(weights.PRETRAINED) == record["bytes"] < 8 * 2**20
    assert record["command"] == "python -m fastunet.train" and record["config"] == "synthetic"
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert set(record["metrics"]) == {"vessel_dice", "mDice", "mIoU", "aAcc"}
    assert 70 < record["metrics"]["vessel_dice"] < 100
    meta = torch.load(weights.PRETRAINED, weights_only=True)["meta"]
    assert meta["metrics"] == record["metrics"] and meta["fov_diameter"] == record["fov_diameter"]


def test_the_file_loads_strictly_into_the_synthetic_config_with_plain_torch_load():
    ckpt = torch.load(weights.PRETRAINED, map_location="cpu", weights_only=True)
    model = fastunet.build_segmentor(fastunet.get_config("synthetic"))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    assert ckpt["meta"]["config"]["model"] == fastunet.get_config("synthetic")["model"]
    meta = fastunet.load_checkpoint(fastunet.build_segmentor(fastunet.get_config("synthetic")),
                                    weights.PRETRAINED)
    assert meta["config_name"] == "synthetic"


@pytest.mark.slow
def test_the_recorded_fov_diameter_is_the_training_images():
    assert training_fov_diameter(fastunet.get_config("synthetic")) == pytest.approx(
        weights.pretrained_record()["fov_diameter"], abs=0.05)


def test_build_weights_writes_fp16_weights_and_their_record(tmp_path):
    cfg = fastunet.get_config("synthetic")
    model = fastunet.build_segmentor(cfg)
    metrics = {"vessel_dice": 80.123, "mDice": 89.0, "mIoU": 81.5, "aAcc": 96.25, "other": 1.0}
    save_checkpoint(tmp_path / "latest.pth", model, {"config": cfg, "metrics": metrics,
                                                     "iteration": 3000})
    out, record = tmp_path / "w.pt", tmp_path / "w.json"
    info = build_weights(tmp_path / "latest.pth", out, record, commit="a" * 40, fov_diameter=500)
    assert json.loads(record.read_text()) == info
    assert info["sha256"] == sha256(out) and info["metrics"]["vessel_dice"] == 80.12
    assert info["iterations"] == 3000 and info["fov_diameter"] == 500
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["state_dict"]["decode_head.conv_seg.weight"].dtype == torch.float16
    assert ckpt["meta"]["config"] == cfg
    halved = fastunet.build_segmentor(cfg)
    fastunet.load_checkpoint(halved, out)
    for (name, a), b in zip(model.state_dict().items(), halved.state_dict().values()):
        assert torch.equal(a.half().to(a.dtype) if a.is_floating_point() else a, b), name
    save_checkpoint(tmp_path / "untrained.pth", model, {"config": cfg})
    with pytest.raises(ValueError, match="no validation metrics"):
        build_weights(tmp_path / "untrained.pth", out, record, "a" * 40, 500)


def test_pretrained_predictor_uses_the_shipped_weights_and_rescales():
    predictor = fastunet.Predictor.pretrained(device="cpu", precision="fp32")
    assert predictor.config["name"] == "synthetic"
    assert predictor.fov_diameter == weights.pretrained_record()["fov_diameter"]
    assert fastunet.Predictor.pretrained(device="cpu", fov_diameter=None).fov_diameter is None


def test_predict_without_a_checkpoint_says_it_uses_the_shipped_weights(tmp_path, capsys):
    from fastunet.data.io import write_png
    from fastunet.data.synthetic import generate

    write_png(tmp_path / "photo.png", generate(0, "validation", 0, (200, 190))["img"])
    out = tmp_path / "out"
    status = predict.main([str(tmp_path / "photo.png"), "--out-dir", str(out), "--device", "cpu",
                           "--no-overlay"])
    err = capsys.readouterr().err
    assert status == 0, err
    said = [line for line in err.splitlines() if "pretrained weights" in line]
    assert len(said) == 1 and "synthetic" in said[0] and "field of view" in said[0]
    assert os.listdir(out) == ["photo_mask.png"]
    assert predict.main([str(tmp_path / "photo.png"), "--out-dir", str(out), "--device", "cpu",
                         "--quiet"]) == 0
    assert "pretrained" not in capsys.readouterr().err


def test_predict_config_without_checkpoint_is_a_usage_error(tmp_path, capsys):
    from fastunet.data.io import write_png

    write_png(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    status = predict.main([str(tmp_path / "a.png"), "--config", "synthetic", "--out-dir",
                           str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "--checkpoint" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("value, ok", [("auto", True), ("off", True), ("540", True),
                                       ("12", False), ("big", False)])
def test_predict_fov_diameter_option(value, ok, capsys):
    argv = ["x.png", "--fov-diameter", value]
    if ok:
        expected = {"auto": "auto", "off": None}.get(value, 540.0)
        assert predict.build_parser().parse_args(argv).fov_diameter == expected
    else:
        with pytest.raises(SystemExit) as e:
            predict.build_parser().parse_args(argv)
        assert e.value.code == 2 and "auto, off or a diameter" in capsys.readouterr().err


# ---------------------------------------------------------------- a real fundus photograph


def retina_checks(rgb, labels):
    """Plausibility of a vessel mask of a fundus photo, from the photo itself: (vessel fraction
    inside the field of view, vessel fraction just above the optic disc, just below it).

    The field of view is the photo's bright disc (detect_fov's threshold on red); the optic disc
    is its brightest spot (the maximum of the luminance averaged over a tenth of the FOV's
    diameter, away from the FOV's rim); the main arcades leave it upwards and downwards, so the
    regions from 0.08 to 0.3 FOV diameters above and below it, 0.2 diameters wide, must hold
    vessels."""
    fov = detect_fov(rgb)
    inside = rgb[..., 0].astype(np.float32) > fov.threshold
    diameter = fov.diameter
    luminance = torch.from_numpy(rgb.astype(np.float32).mean(2))[None, None]
    k = int(diameter / 10) | 1
    smooth = F.avg_pool2d(luminance, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0]
    yy, xx = np.mgrid[:rgb.shape[0], :rgb.shape[1]]
    cy, cx = np.argwhere(inside).mean(0)
    central = np.hypot(yy - cy, xx - cx) < 0.35 * diameter  # not the bright rim of the FOV
    smooth = smooth.numpy()
    smooth[~central] = -1
    dy, dx = np.unravel_index(np.argmax(smooth), smooth.shape)
    vessel = labels.astype(bool)
    near, far, half = int(0.08 * diameter), int(0.3 * diameter), int(0.1 * diameter)
    cols = slice(max(0, dx - half), dx + half)
    above = vessel[max(0, dy - far):max(0, dy - near), cols]
    below = vessel[dy + near:dy + far, cols]
    return vessel[inside].mean(), above.mean(), below.mean()


@pytest.fixture(scope="module")
def retina():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.retina()


@pytest.fixture(scope="module")
def retina_mask(retina):
    predictor = fastunet.Predictor.pretrained(device="cpu")
    predictor.predict(retina[::8, ::8])  # warm-up
    start = time.perf_counter()
    labels = predictor.predict(retina)
    print(f"retina: {time.perf_counter() - start:.2f} s")
    return labels


# measured on the shipped weights' mask (docs/pretrained.md): 9.2% of the FOV is vessel, 14.9%
# and 17.5% of the regions above and below the disc; random weights give 32%, an empty or full
# mask 0% or 100%, and noise (or anything uniform) no denser near the disc than elsewhere
VESSEL_FRACTION = (0.05, 0.20)
ARCADE_DENSITY = 1.3  # times the FOV's vessel fraction, above and below the disc
# the mask of the photo at half its resolution, brought back to full size, against the full
# resolution's: 0.93 with the rescaling to the training FOV, 0.85 without
SAME_AT_HALF_RESOLUTION = 0.9


def assert_plausible(rgb, labels):
    fraction, above, below = retina_checks(rgb, labels)
    assert VESSEL_FRACTION[0] < fraction < VESSEL_FRACTION[1], fraction
    assert min(above, below) > ARCADE_DENSITY * fraction, (fraction, above, below)


def assert_resolution_independent(predictor, rgb, labels):
    """The photo at half its resolution (the same eye) gives the same vessels."""
    from PIL import Image

    height, width = rgb.shape[:2]
    half = np.asarray(Image.fromarray(rgb).resize((width // 2, height // 2), Image.BILINEAR))
    small = predictor.predict(half).astype(np.uint8) * 255
    back = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)) > 127
    full = labels.astype(bool)
    dice = 2 * (back & full).sum() / (back.sum() + full.sum())
    assert dice > SAME_AT_HALF_RESOLUTION, dice


@pytest.mark.slow
def test_the_shipped_weights_find_the_vessels_of_a_real_photo(retina, retina_mask):
    assert retina_mask.shape == retina.shape[:2]
    assert_plausible(retina, retina_mask)
    assert_resolution_independent(fastunet.Predictor.pretrained(device="cpu"), retina,
                                  retina_mask)


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["random weights", "all zero", "all one", "noise",
                                    "not rescaled"])
def test_a_broken_mask_of_the_real_photo_fails_the_checks(retina, broken):
    if broken == "not rescaled":  # plausible masks, but they change with the resolution
        predictor = fastunet.Predictor.pretrained(device="cpu", fov_diameter=None)
        with pytest.raises(AssertionError):
            assert_resolution_independent(predictor, retina, predictor.predict(retina))
        return
    if broken == "random weights":
        torch.manual_seed(0)
        labels = fastunet.Predictor("synthetic", device="cpu", fov_diameter=540).predict(retina)
    elif broken == "noise":
        labels = np.random.default_rng(0).random(retina.shape[:2]) < 0.1
    else:
        labels = np.full(retina.shape[:2], broken == "all one")
    with pytest.raises(AssertionError):
        assert_plausible(retina, labels)

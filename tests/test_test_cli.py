"""python -m fastunet.test: tables, JSON, predictions, FOV scoring, mmseg checkpoints, errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fastunet
from fastunet import test as test_cli
from fastunet.data import build_dataset, write_synthetic
from fastunet.data.transforms import normalize
from fastunet.metrics import SegMetric

from trainkit import run_cli, tiny_model

DATA = os.path.join(os.path.dirname(__file__), "data")
MMSEG_CKPT = os.path.join(DATA, "mmseg_unet_bc2_fcn.pt")   # saved by mmseg 1.2.2 itself
MMSEG_CONFIG = "unet-s5-d16_fcn_4xb4-40k_drive-64x64"       # its mmseg 1.x config name
MMSEG_OVERRIDES = ["model.backbone.base_channels=2", "model.decode_head.in_channels=2",
                   "model.decode_head.channels=4", "model.auxiliary_head.in_channels=4",
                   "model.auxiliary_head.channels=4"]


@pytest.fixture(scope="module")
def drive_root(tmp_path_factory):
    """A converted DRIVE-layout root (96x96 synthetic fundus images with FOV masks)."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "DRIVE", num_training=1,
                           num_validation=3, size=(96, 96))


def _expected(root, use_fov, mode="slide", tta=None, precision="fp32"):
    model = fastunet.build_segmentor(fastunet.models.apply_overrides(
        fastunet.get_config(MMSEG_CONFIG), MMSEG_OVERRIDES))
    fastunet.load_checkpoint(model, MMSEG_CKPT)
    model.eval().test_cfg["mode"] = mode
    metric, preds = SegMetric(), {}
    with torch.no_grad():
        for item in build_dataset("drive", root, "validation"):
            logits = model.inference(normalize(item["img"])[None], tta=tta,
                                     precision=precision)
            pred = logits.argmax(1)[0].numpy()
            preds[item["name"]] = pred
            metric.update(pred, item["label"], fov=item["fov"] if use_fov else None,
                          prob=logits.softmax(1)[0, 1])
    return metric.compute(), preds


@pytest.mark.parametrize("use_fov", [False, True])
def test_mmseg_checkpoint_scores_as_computed_by_hand(drive_root, tmp_path, capsys, use_fov):
    out_json, pred_dir = tmp_path / "r.json", tmp_path / "preds"
    code = test_cli.main(["--config", MMSEG_CONFIG, "--checkpoint", MMSEG_CKPT,
                          "--data-root", drive_root, "--json", str(out_json),
                          "--save-predictions", str(pred_dir), "--cfg-options",
                          *MMSEG_OVERRIDES] + (["--fov"] if use_fov else []))
    out = capsys.readouterr().out
    assert code == 0
    assert "per class results:" in out and "Summary:" in out and "iteration 4000" in out
    record = json.loads(out_json.read_text())
    expected, preds = _expected(drive_root, use_fov)
    assert json.dumps(record["metrics"]) == json.dumps(expected)
    assert record["fov"] is use_fov and record["num_images"] == 3 and record["mode"] == "slide"
    assert record["precision"] == "fp32"  # the published numbers' precision, unless asked
    for name, pred in preds.items():  # predictions as vessel 255 / background 0 PNGs
        saved = np.asarray(Image.open(pred_dir / f"{name}.png"))
        assert np.array_equal(saved, (pred == 1).astype(np.uint8) * 255)
    # the printed summary shows the same numbers (2 decimals)
    assert f"{expected['mDice']:.2f}" in out and f"{expected['aAcc']:.2f}" in out
    # and the field's metrics: Se, Sp, Acc, AUC-ROC (pooled, inside the FOV with --fov), Dice
    table = out[out.index("vessel metrics"):].splitlines()
    assert [c.strip() for c in table[2].strip("|").split("|")] == ["Se", "Sp", "Acc", "AUC",
                                                                    "Dice"]
    assert [c.strip() for c in table[4].strip("|").split("|")] == [
        f"{expected[k]:.2f}" for k in ("vessel_se", "vessel_sp", "vessel_acc", "vessel_auc",
                                       "vessel_dice")]
    # this tiny model's probabilities all lie within 0.5 +- 3e-4, so many share a histogram bin
    assert 0 < record["vessel_auc_max_error"] <= 50 and record["tta"] is None


def test_grayscale_images_warn_once(drive_root, tmp_path, capsys):
    gray_root = tmp_path / "DRIVE"
    import shutil

    shutil.copytree(drive_root, gray_root)
    for png in (gray_root / "images" / "validation").iterdir():
        img = np.asarray(Image.open(png).convert("L").convert("RGB"))
        Image.fromarray(img).save(png)
    assert test_cli.main(["--config", MMSEG_CONFIG, "--checkpoint", MMSEG_CKPT, "--data-root",
                          str(gray_root), "--cfg-options", *MMSEG_OVERRIDES]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "3 of the images" in err and "colour" in err
    # colour images: no warning
    assert test_cli.main(["--config", MMSEG_CONFIG, "--checkpoint", MMSEG_CKPT, "--data-root",
                          drive_root, "--cfg-options", *MMSEG_OVERRIDES]) == 0
    assert "grayscale" not in capsys.readouterr().err


@pytest.mark.parametrize("option, value, key, expected_kwargs", [
    ("--tta", "hv", "tta", dict(tta="hv")),
    ("--precision", "bf16", "precision", dict(precision="bf16")),
    ("--mode", "whole", "mode", dict(mode="whole")),
], ids=["tta", "bf16", "whole"])
def test_option_scores_what_it_names(option, value, key, expected_kwargs, drive_root, tmp_path,
                                     capsys):
    # the JSON's metrics are those of the evaluation the option asks for, computed independently
    out_json = tmp_path / "r.json"
    assert test_cli.main(["--config", MMSEG_CONFIG, "--checkpoint", MMSEG_CKPT, "--data-root",
                          drive_root, option, value, "--json", str(out_json),
                          "--cfg-options", *MMSEG_OVERRIDES]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    record = json.loads(out_json.read_text())
    assert record[key] == value
    expected, _ = _expected(drive_root, False, **expected_kwargs)
    assert json.dumps(record["metrics"]) == json.dumps(expected)
    plain, _ = _expected(drive_root, False)
    if option == "--tta":
        assert "| TTA hv |" in header
        assert expected["vessel_auc"] != plain["vessel_auc"]  # the flips changed the prediction
    elif option == "--precision":
        assert "precision bf16" in header


def test_mode_overlap_tile(drive_root, tmp_path):
    from fastunet.inference import InferenceEngine

    out_json = tmp_path / "o.json"
    assert test_cli.main(["--config", MMSEG_CONFIG, "--checkpoint", MMSEG_CKPT, "--data-root",
                          drive_root, "--mode", "overlap-tile", "--json", str(out_json),
                          "--cfg-options", *MMSEG_OVERRIDES]) == 0
    model = fastunet.build_segmentor(fastunet.models.apply_overrides(
        fastunet.get_config(MMSEG_CONFIG), MMSEG_OVERRIDES))
    fastunet.load_checkpoint(model, MMSEG_CKPT)
    engine = InferenceEngine(model.eval().encode_decode, "overlap-tile")
    metric = SegMetric()
    with torch.no_grad():
        for item in build_dataset("drive", drive_root, "validation"):
            logits = engine(normalize(item["img"])[None])
            metric.update(logits.argmax(1)[0], item["label"], prob=logits.softmax(1)[0, 1])
    record = json.loads(out_json.read_text())
    assert record["mode"] == "overlap-tile"
    assert json.dumps(record["metrics"]) == json.dumps(metric.compute())


def test_synthetic_needs_no_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    opts = [*tiny_model(2), "data.image_size=(96,96)", "data.num_val=2", "data.num_train=1"]
    cfg = fastunet.models.apply_overrides(fastunet.get_config("synthetic"), opts)
    torch.manual_seed(0)
    fastunet.models.save_checkpoint(tmp_path / "s.pth", fastunet.build_segmentor(cfg))
    assert test_cli.main(["--config", "synthetic", "--checkpoint", str(tmp_path / "s.pth"),
                          "--cfg-options", *opts]) == 0
    assert "2 validation images" in capsys.readouterr().out


def test_the_config_comes_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    opts = [*tiny_model(2), "data.image_size=(96,96)", "data.num_val=2", "data.num_train=1"]
    cfg = fastunet.models.apply_overrides(fastunet.get_config("synthetic"), opts)
    torch.manual_seed(0)
    model = fastunet.build_segmentor(cfg)
    fastunet.models.save_checkpoint(tmp_path / "s.pth", model, {"config": cfg})
    assert test_cli.main(["--checkpoint", str(tmp_path / "s.pth")]) == 0
    assert "2 validation images" in capsys.readouterr().out
    assert test_cli.main(["--checkpoint", str(tmp_path / "s.pth"),
                          "--cfg-options", "data.num_val=1"]) == 0
    assert "1 validation images" in capsys.readouterr().out
    fastunet.models.save_checkpoint(tmp_path / "bare.pth", model)  # no config stored
    assert test_cli.main(["--checkpoint", str(tmp_path / "bare.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no config" in err and "--config" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--data-root", "/nonexistent/DRIVE"],
     "does not exist"),
    (["--config", "fcn_unet_s5-d16_64x64_40k_driv"], "did you mean"),
    (["--config", "synthetic"], "generates its own images"),  # with --data-root
    (["--config", MMSEG_CONFIG], "does not match the model"),  # the tiny mmseg ckpt, full model
    (["--config", MMSEG_CONFIG, "--cfg-options", *MMSEG_OVERRIDES, "--mode", "whole",
      "--checkpoint", "/nonexistent.pth"], "not found"),
])
def test_user_errors_are_one_line(args, message, drive_root, capsys):
    full = [*args] if "--checkpoint" in args else [*args, "--checkpoint", MMSEG_CKPT]
    if "--data-root" not in full:
        full += ["--data-root", drive_root]
    code = test_cli.main(full)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert err.startswith("python -m fastunet.test: error:") and len(err.splitlines()) == 1


def test_help(tmp_path):
    out = run_cli("fastunet.test", ["--help"], tmp_path)
    assert out.returncode == 0
    for opt in ("--config", "--checkpoint", "--data-root", "--mode", "slide", "whole",
                "overlap-tile", "--fov", "--tta", "--save-predictions", "--json", "--device"):
        assert opt in out.stdout

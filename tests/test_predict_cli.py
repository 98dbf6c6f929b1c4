"""python -m fastunet.predict: outputs per image, a corrupt file skipped, exit statuses."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastunet
from fastunet import predict
from fastunet.data.io import read_image, read_label, write_png

CONFIG = "synthetic"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config(CONFIG))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    write_png(root / "one.png", rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    write_png(root / "sub" / "two.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))  # gray
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "notes.txt").write_text("not an image")
    return root


def run(argv, capsys):
    status = predict.main(argv)
    return status, capsys.readouterr().err


def test_folder_with_a_corrupt_file(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run([str(folder), "--config", CONFIG, "--checkpoint", str(checkpoint),
                       "--out-dir", str(out), "--save-probs", "--device", "cpu"], capsys)
    assert status == 1
    skipped = [line for line in err.splitlines() if line.startswith("fastunet.predict: skipped")]
    assert len(skipped) == 1 and "corrupt.png" in skipped[0]
    assert "wrote 2 of 3 images" in err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["one_mask.png", "one_overlay.png", "one_prob.png",
                       os.path.join("sub", "two_mask.png"), os.path.join("sub", "two_overlay.png"),
                       os.path.join("sub", "two_prob.png")]
    predictor = fastunet.Predictor(CONFIG, checkpoint, device="cpu")
    image = read_image(folder / "one.png")
    labels, probs = predictor.predict(image, return_probs=True)
    mask = read_label(out / "one_mask.png")
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask, labels * 255)
    assert np.abs(read_label(out / "one_prob.png").astype(int) - probs * 255).max() <= 0.5 + 1e-3
    tinted = read_image(out / "one_overlay.png")
    assert tinted.shape == image.shape
    assert np.array_equal(tinted[mask == 0], image[mask == 0])
    if (mask > 0).any():
        assert (tinted[mask > 0, 1] >= image[mask > 0, 1]).all()


def test_only_good_files_exit_zero(checkpoint, tmp_path, capsys):
    write_png(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    status, err = run([str(tmp_path / "a.png"), "--config", CONFIG, "--checkpoint",
                       str(checkpoint), "--out-dir", str(tmp_path / "o"), "--no-overlay",
                       "--quiet", "--mode", "whole", "--window-batch", "2"], capsys)
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "o")) == ["a_mask.png"]


def test_missing_input_and_bad_arguments(checkpoint, tmp_path, capsys):
    write_png(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    common = ["--config", CONFIG, "--checkpoint", str(checkpoint), "--out-dir",
              str(tmp_path / "o"), "--quiet"]
    status, err = run([str(tmp_path / "a.png"), str(tmp_path / "nope.png")] + common, capsys)
    assert status == 1 and "nope.png: no such file" in err
    status, err = run([str(tmp_path / "empty_dir_missing")] + common, capsys)
    assert status == 2 and "no images found" in err
    status, err = run([str(tmp_path / "a.png"), "--config", CONFIG, "--checkpoint",
                       str(tmp_path / "missing.pth"), "--out-dir", str(tmp_path / "o")], capsys)
    assert status == 2 and "missing.pth" in err and len(err.strip().splitlines()) == 1
    status, err = run([str(tmp_path / "a.png"), "--config", "no_such_config", "--checkpoint",
                       str(checkpoint), "--out-dir", str(tmp_path / "o")], capsys)
    assert status == 2 and "no_such_config" in err


def test_clashing_names_keep_their_extension(tmp_path):
    for name in ("a.png", "a.jpg", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    files, missing, own = predict.collect_inputs([str(tmp_path)])
    assert [stem for _, stem in files] == ["a_jpg", "a_png", "b"] and missing == [] and own == 0


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "fastunet.predict", "--help"], text=True,
                         capture_output=True, check=True).stdout
    for option in ("--config", "--checkpoint", "--out-dir", "--save-probs", "--device",
                   "--precision", "--mode", "--tta", "--window-batch", "--no-overlay"):
        assert option in out
    assert "Exit status" in out

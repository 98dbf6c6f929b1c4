"""Config files: YAML/JSON round trips, _base_ merging, mmseg .py configs read without running
them, --print-config, and a YAML config that trains on a folder of images and masks."""
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import fastunet
from fastunet import train as train_cli
from fastunet.data import write_synthetic
from fastunet.models.config_files import ConfigFileError, config_text, load_config_file

from trainkit import tiny_model

MMSEG = os.path.join(os.path.dirname(__file__), "data", "mmseg_configs")
HAS_YAML = importlib.util.find_spec("yaml") is not None
FORMATS = ["json", pytest.param("yaml", marks=pytest.mark.skipif(
    not HAS_YAML, reason="PyYAML is not installed"))]


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", fastunet.list_configs())
def test_printed_config_loads_back_equal(name, fmt, tmp_path):
    cfg = fastunet.get_config(name)
    path = _write(tmp_path / f"{name}.{fmt}", config_text(cfg, fmt))
    assert fastunet.get_config(path) == cfg  # named after the file, which bears the name
    other = _write(tmp_path / f"mine.{fmt}", config_text(cfg, fmt))
    assert fastunet.get_config(other) == {**cfg, "name": "mine"}


def test_print_config_cli_writes_a_loadable_file(tmp_path, capsys):
    pytest.importorskip("yaml")
    assert train_cli.main(["--print-config", "synthetic", "--cfg-options", "train.lr=0.02"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# fastunet config") and "lr: 0.02" in text
    cfg = fastunet.get_config(_write(tmp_path / "synthetic.yaml", text))
    expected = fastunet.models.apply_overrides(fastunet.get_config("synthetic"),
                                               ["train.lr=0.02"])
    assert cfg == expected
    # --print-config alone prints --config's config
    assert train_cli.main(["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--print-config"]) == 0
    assert "dataset: DRIVE" in capsys.readouterr().out
    assert train_cli.main(["--print-config", "nope"]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err


def test_without_pyyaml_json_is_printed_and_a_yaml_file_of_json_loads(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    assert train_cli.main(["--print-config", "synthetic"]) == 0
    captured = capsys.readouterr()
    assert "PyYAML is not installed" in captured.err
    path = _write(tmp_path / "synthetic.yaml", captured.out)
    assert fastunet.get_config(path) == fastunet.get_config("synthetic")
    real_yaml = _write(tmp_path / "real.yaml", "_base_: synthetic\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigFileError, match=r"needs PyYAML \(pip install pyyaml\)"):
        fastunet.get_config(real_yaml)


@pytest.mark.parametrize("fmt", FORMATS)
def test_base_merges_and_delete_replaces(fmt, tmp_path):
    if fmt == "json":
        dump = json.dumps
    else:
        import yaml
        dump = yaml.safe_dump
    base = _write(tmp_path / f"base.{fmt}", dump({
        "_base_": "synthetic", "train": {"lr": 0.02}, "data": {"num_val": 3}}))
    child = _write(tmp_path / f"child.{fmt}", dump({
        "_base_": [os.path.basename(base)],
        "model": {"backbone": {"norm_cfg": {"_delete_": True, "type": "BN"}}},
        "train": {"max_iters": 10}}))
    cfg = fastunet.get_config(child)
    expected = fastunet.get_config("synthetic")
    expected["name"] = "child"
    expected["train"].update(lr=0.02, max_iters=10)
    expected["data"]["num_val"] = 3
    expected["model"]["backbone"]["norm_cfg"] = {"type": "BN"}  # replaced, not merged
    assert cfg == expected


def test_yaml_reads_exponent_floats(tmp_path):
    pytest.importorskip("yaml")
    cfg = fastunet.get_config(_write(tmp_path / "a.yaml", "_base_: synthetic\ntrain:\n"
                                                          "  lr: 1e-3\n  min_lr: 5E-6\n"))
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["min_lr"] == 5e-6


@pytest.mark.parametrize("text, message", [
    ('{"_base_": "synthetic", "trian": {}}', "unknown top-level key 'trian'; did you mean "
                                            "'train'?"),
    ('{"_base_": "synthetic", "data": {"crop_szie": 3}}', "did you mean 'data.crop_size'"),
    ('{"model": {}}', "'data' is missing"),
    ('[1, 2]', "holds a mapping"),
    ('{"_base_": "synthtic"}', "did you mean 'synthetic'"),
    ('{"_base_": "missing.json"}', "_base_ file missing.json not found"),
    ('{"_base_": "x.py"}', "load an mmseg .py config directly"),
    ('{"_base_": "a.json"}', "cycle"),
    ('{"a": 1,,}', "not valid JSON (line 1"),
])
def test_bad_json_configs_are_one_line_errors(text, message, tmp_path):
    path = _write(tmp_path / "a.json", text)
    with pytest.raises(ConfigFileError) as e:
        fastunet.get_config(path)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(ConfigFileError, match="not found"):
        fastunet.get_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigFileError, match="is a folder"):
        load_config_file(str(tmp_path))
    with pytest.raises(ConfigFileError, match="config file .*my_cfg.py not found, nor is it a "
                                              "built-in config name"):
        fastunet.get_config(str(tmp_path / "my_cfg.py"))
    # an mmseg config path that is not there still names the built-in config, as before
    assert fastunet.get_config("configs/unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py")[
        "name"] == "fcn_unet_s5-d16_64x64_40k_drive"


@pytest.mark.parametrize("path, name", [
    ("v1/unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py", "fcn_unet_s5-d16_64x64_40k_drive"),
    ("v1/unet/unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_drive-64x64.py",
     "fcn_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive"),
    ("v0/unet/pspnet_unet_s5-d16_128x128_40k_stare.py", "pspnet_unet_s5-d16_128x128_40k_stare"),
])
def test_mmseg_python_configs_equal_the_built_in_ones(path, name):
    cfg = fastunet.get_config(os.path.join(MMSEG, path))
    assert cfg["name"] == os.path.basename(path)[:-3]
    assert cfg == {**fastunet.get_config(name), "name": cfg["name"]}
    fastunet.build_segmentor(cfg)


def _mmseg_tree(tmp_path):
    root = tmp_path / "configs"
    shutil.copytree(os.path.join(MMSEG, "v1"), root)
    return root


@pytest.mark.parametrize("source, message", [
    ("import os\n", "3: an import is not supported"),
    ("from mmengine.config import read_base\n", "3: an import is not supported"),
    ("with read_base():\n    pass\n", "3: a with block is not supported"),
    ("if True:\n    crop = 1\n", "3: an if statement is not supported"),
    ("model = dict(backbone=dict(base_channels=len([1])))\n",
     "3: calling len() is not supported"),
    ("model = dict(decode_head={{_base_.model.decode_head}})\n",
     "3: mmengine's {{_base_.xxx}} substitution is not supported"),
    ("model = dict(backbone=dict(norm_cfg=norm_cfg))\n",
     "the name 'norm_cfg' (not assigned above in this file"),
    ("train_pipeline = [dict(type=t) for t in 'ab']\n"
     "train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))\n",
     "3: a list comprehension is not supported"),
    ("train_dataloader = dict(dataset=dict(dataset=dict(type='ADE20KDataset')))\n",
     "dataset type 'ADE20KDataset' is not supported"),
    ("optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-3))\n",
     "optimizer 'AdamW' is not supported"),
    ("param_scheduler = [dict(type='LinearLR'), dict(type='PolyLR')]\n",
     "param_scheduler ['LinearLR'] is not supported"),
    ("model = dict(\n", "not valid Python"),
])
def test_mmseg_constructs_outside_the_subset_are_named(source, message, tmp_path):
    root = _mmseg_tree(tmp_path)
    path = _write(root / "unet" / "mine.py",
                  "_base_ = './unet-s5-d16_fcn_4xb4-40k_drive-64x64.py'\n# mine\n" + source)
    with pytest.raises(ConfigFileError) as e:
        fastunet.get_config(path)
    text = str(e.value)
    assert message in text and len(text.splitlines()) == 1, text
    assert "mine.py" in text


def test_mmseg_values_are_computed_without_running_code(tmp_path):
    root = _mmseg_tree(tmp_path)
    marker = tmp_path / "ran"
    path = _write(root / "unet" / "mine_2xb8.py", f"""
_base_ = './unet-s5-d16_fcn_4xb4-40k_drive-64x64.py'
iters = 2000
half = -(-iters // 2)
unused = __import__('pathlib').Path({str(marker)!r}).touch()
train_cfg = dict(max_iters=iters * 2, val_interval=half)
train_dataloader = dict(batch_size=8)
extra = dict(lr=0.5)
optim_wrapper = dict(optimizer=dict(**extra, momentum=0.95))
model = dict(backbone=dict(base_channels=16 + 16), decode_head=dict(in_channels=32))
""")
    cfg = fastunet.get_config(path)
    assert not marker.exists()  # the call was read, not made
    assert cfg["train"]["max_iters"] == 4000 and cfg["train"]["eval_interval"] == 1000
    assert cfg["train"]["batch_size"] == 16  # 2 GPUs x 8, from the file name
    assert cfg["train"]["lr"] == 0.5 and cfg["train"]["momentum"] == 0.95
    assert cfg["train"]["weight_decay"] == 0.0005  # the rest of the base's optimizer
    assert cfg["model"]["backbone"]["base_channels"] == 32


def test_mmseg_base_files_must_be_present(tmp_path):
    path = _write(tmp_path / "unet-s5-d16_fcn_4xb4-40k_drive-64x64.py",
                  open(os.path.join(MMSEG, "v1", "unet",
                                    "unet-s5-d16_fcn_4xb4-40k_drive-64x64.py")).read())
    with pytest.raises(ConfigFileError, match="its _base_ file ../_base_/models/fcn_unet_s5-d16.py "
                                              "is not at .* keep mmseg's configs/ folder layout"):
        fastunet.get_config(path)


def test_cli_reads_config_files_and_reports_errors_in_one_line(tmp_path, capsys):
    from fastunet import test as test_cli

    bad = _write(tmp_path / "bad.json", '{"_base_": "synthetic", "train": {"lr": -1}}')
    assert train_cli.main(["--config", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lr' must be a positive number" in err and len(err.splitlines()) == 1
    assert test_cli.main(["--config", str(tmp_path / "none.yaml"), "--checkpoint", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("none.yaml not found") and len(err.splitlines()) == 1


def _folder_dataset(root, tmp_path):
    """images/ (JPEG), masks/ (black/white PNG) and fov/ per split, from synthetic images."""
    drive = write_synthetic(tmp_path / "drive", num_training=2, num_validation=1,
                            size=(96, 96))
    for split in ("training", "validation"):
        for png in sorted(os.listdir(os.path.join(drive, "images", split))):
            stem = png[:-4]
            img = Image.open(os.path.join(drive, "images", split, png))
            os.makedirs(root / "images" / split, exist_ok=True)
            img.save(root / "images" / split / f"{stem}.jpg", quality=95)
            label = np.asarray(Image.open(os.path.join(drive, "annotations", split,
                                                       f"{stem}_manual1.png")))
            os.makedirs(root / "masks" / split, exist_ok=True)
            Image.fromarray((label * 255).astype(np.uint8)).save(
                root / "masks" / split / f"{stem}.png")
            os.makedirs(root / "fov" / split, exist_ok=True)
            shutil.copy(os.path.join(drive, "fov", split, png), root / "fov" / split / png)
    return root


def test_a_yaml_config_trains_on_a_folder_of_images_and_masks(tmp_path, monkeypatch, capsys):
    pytest.importorskip("yaml")
    data = _folder_dataset(tmp_path / "my_vessels", tmp_path)
    text = f"""_base_: synthetic
data:
  dataset: folder
  data_root: {data}
  img_scale: [96, 96]
train:
  max_iters: 2
  batch_size: 2
  eval_interval: 2
  checkpoint_interval: 2
"""
    cfg_path = _write(tmp_path / "my_vessels.yaml", text)
    work = tmp_path / "work"
    args = ["--config", cfg_path, "--work-dir", str(work), "--cfg-options", *tiny_model(4)]
    assert train_cli.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "config my_vessels | 2 training / 1 validation images" in out
    assert os.path.isfile(work / "latest.pth")
    from fastunet import test as test_cli
    assert test_cli.main(["--config", cfg_path, "--checkpoint", str(work / "latest.pth"),
                          "--fov", "--cfg-options", *tiny_model(4)]) == 0
    assert "FOV only" in capsys.readouterr().out


def test_data_root_with_the_synthetic_config_is_refused(tmp_path, capsys):
    assert train_cli.main(["--data-root", str(tmp_path), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "synthetic config generates its own images" in err and "data.dataset=folder" in err
    assert len(err.splitlines()) == 1 and not os.listdir(tmp_path)

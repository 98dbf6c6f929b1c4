"""python -m fastunet.train end to end on tiny models and data (CPU): every head, the default
command's reduced variant, non-finite losses, and one-line user errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fastunet
from fastunet import train as train_cli
from fastunet.data import write_synthetic
from fastunet.training import poly_lr

from trainkit import assert_same_state, intervals, run_cli, tiny_model, tiny_synthetic


@pytest.fixture(scope="module")
def drive_root(tmp_path_factory):
    """A DRIVE-layout data root (64x64 synthetic images, 2 training, 1 validation)."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "DRIVE", num_training=2,
                           num_validation=1, size=(64, 64))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("config", ["fcn_unet_s5-d16_64x64_40k_drive",
                                    "pspnet_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive",
                                    "deeplabv3_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive"])
def test_every_head_trains_a_few_iterations(config, drive_root, tmp_path, capsys):
    work = tmp_path / "work"
    code = train_cli.main(["--config", config, "--data-root", drive_root, "--work-dir", str(work),
                           "--max-iters", "3", "--batch-size", "2", "--log-interval", "1",
                           "--cfg-options", *tiny_model(4)])
    out = capsys.readouterr().out
    assert code == 0
    records = [json.loads(l) for l in (work / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["mode"] == "train"]
    assert [r["iter"] for r in train] == [1, 2, 3]
    dice = "decode.loss_dice" in train[0]
    assert dice == ("dice" in config)  # the ce+dice configs log the Dice term
    assert all(np.isfinite(r["loss"]) for r in train)
    # lr follows poly over the 3-iteration horizon
    assert [r["lr"] for r in train] == pytest.approx(
        [poly_lr(i, 3) for i in range(3)])
    assert "vessel Dice" in out
    meta = fastunet.load_checkpoint(fastunet.build_segmentor(
        fastunet.models.apply_overrides(fastunet.get_config(config), tiny_model(4))),
        work / "latest.pth")
    assert meta["iteration"] == 3 and meta["config"]["name"] == config


def test_default_command_reduced(tmp_path, capsys):
    # the no-argument command with a tiny set and 3 iterations: table, checkpoint, overlay
    work = tmp_path / "work"
    code = train_cli.main(["--max-iters", "3", "--work-dir", str(work), "--cfg-options",
                           *tiny_model(4), *tiny_synthetic(96)])
    out = capsys.readouterr().out
    assert code == 0
    for header in ("Class", "IoU", "Acc", "Dice", "background", "vessel", "aAcc", "mIoU",
                   "mDice"):
        assert header in out
    ckpt = work / "latest.pth"
    overlay = work / "vis" / "val_iter_3.png"
    assert f"checkpoint: {ckpt}" in out and f"overlay:    {overlay}" in out
    assert (work / "curves.png").is_file() and (work / "log.jsonl").is_file()
    img = np.asarray(Image.open(overlay))
    assert img.shape[0] > 96 and img.shape[1] >= 2 * 96 + 6  # image | gap | prediction, legend
    meta = fastunet.load_checkpoint(fastunet.build_segmentor(fastunet.models.apply_overrides(
        fastunet.get_config("synthetic"), tiny_model(4))), ckpt)
    assert meta["iteration"] == 3 and "vessel_dice" in meta["metrics"]
    assert meta["config"]["name"] == "synthetic"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_cli.TrainStep.forward
    calls = {"n": 0}

    def poisoned(self, images, labels):
        calls["n"] += 1
        losses = real(self, images, labels)
        if calls["n"] == 4:  # iteration 4 goes bad
            losses["decode.loss_ce"] = losses["decode.loss_ce"] * float("nan")
        return losses

    monkeypatch.setattr(train_cli.TrainStep, "forward", poisoned)
    work = tmp_path / "work"
    code = train_cli.main(["--max-iters", "8", "--work-dir", str(work), "--cfg-options",
                           *tiny_model(2), *tiny_synthetic(), *intervals(2),
                           "train.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite at iteration 4" in err and "latest.pth" in err
    assert len(err.strip().splitlines()) == 1
    saved = {p for p in os.listdir(work) if p.endswith(".pth")}
    assert {"iter_2.pth", "latest.pth"} <= saved and "iter_4.pth" not in saved
    assert not any(p.startswith(".tmp") for p in os.listdir(work))
    ck = torch.load(work / "latest.pth", weights_only=False)
    assert ck["meta"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values()
               if v.is_floating_point())


@pytest.mark.parametrize("args, message", [
    (["--config", "fcn_unet_s5-d16_64x64_40k_driv"], "did you mean"),
    (["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--data-root", "/nonexistent/DRIVE"],
     "python -m fastunet.convert drive"),
    (["--cfg-options", "train.lrr=0.1"], "did you mean 'train.lr'"),
    (["--cfg-options", "train.lr"], "key.subkey=value"),
    (["--batch-size", "0"], "batch size"),
    (["--cfg-options", "data.label_resize=nearest"], "'data.label_resize' must be 'centre' or"),
    (["--capture", "graph", "--device", "cpu"], "--capture graph needs a CUDA device"),
    (["--resume"], "--resume: no checkpoint"),
    (["--load-from", "/nonexistent.pth"], "not found"),
])
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    code = train_cli.main([*args, "--work-dir", str(tmp_path / "w"), "--max-iters", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and err.startswith("python -m fastunet.train: error:")
    assert len(err.splitlines()) == 1, err


def test_checkpoint_of_another_model_is_a_one_line_error(tmp_path, capsys):
    other = fastunet.build_segmentor(fastunet.models.apply_overrides(
        fastunet.get_config("synthetic"), tiny_model(2)))
    fastunet.models.save_checkpoint(tmp_path / "other.pth", other)
    code = train_cli.main(["--load-from", str(tmp_path / "other.pth"), "--max-iters", "1",
                           "--work-dir", str(tmp_path / "w"), "--cfg-options", *tiny_model(4)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not match the model" in err and len(err.splitlines()) == 1


def test_help_and_module_entry_point(tmp_path):
    out = run_cli("fastunet.train", ["--help"], tmp_path)
    assert out.returncode == 0
    for opt in ("--config", "--data-root", "--work-dir", "--max-iters", "--batch-size", "--amp",
                "--resume", "--seed", "--cfg-options", "--device", "--workers", "--compile",
                "--capture", "--deterministic", "torchrun", "label_resize=mmseg"):
        assert opt in out.stdout
    bad = run_cli("fastunet.train", ["--config", "nope"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_loader_workers_do_not_change_the_result(tmp_path):
    # samples are keyed by (seed, epoch, index): worker processes must not change the data
    states = []
    for workers in ("0", "2"):
        work = tmp_path / f"w{workers}"
        assert train_cli.main(["--max-iters", "3", "--workers", workers, "--work-dir", str(work),
                               "--cfg-options", *tiny_model(2), *tiny_synthetic(),
                               "train.batch_size=2"]) == 0
        states.append(torch.load(work / "latest.pth", weights_only=False)["state_dict"])
    assert_same_state(*states)


def test_fused_auto_is_fused_for_full_width_backbones_on_cpu_only():
    from fastunet.conv_plan import train_fused_default

    narrow = fastunet.build_segmentor(fastunet.get_config("synthetic"))
    wide = fastunet.build_segmentor(fastunet.get_config("fcn_unet_s5-d16_64x64_40k_drive"))
    assert train_fused_default(narrow, torch.device("cpu")) is False  # the plain modules
    assert train_fused_default(wide, torch.device("cpu")) is True  # the fused kernels
    assert train_fused_default(wide, torch.device("cuda")) is False  # committed GPU results


def test_an_undefined_dice_is_never_the_best(monkeypatch, tmp_path):
    # a model that predicts no vessel where there is none scores Dice NaN (0/0): it must not
    # become "the best" (a resumed run would then refuse its own checkpoint's meta.best)
    import types

    import fastunet.train as train_mod

    scores = iter([float("nan"), 10.0, float("nan")])

    class Metric:
        def compute(self):
            return dict(vessel_dice=next(scores), mDice=0.0, mIoU=0.0, aAcc=0.0)

    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: (Metric(), 0.0))
    dist = types.SimpleNamespace(is_main=False, rank=0, world_size=1, device=torch.device("cpu"))
    job = train_mod.Job({}, dist, str(tmp_path), 0, 3, 1)
    log = types.SimpleNamespace(val=lambda *a: None, print=lambda *a: None)
    run = train_mod.RunState()
    model = torch.nn.Linear(1, 1)
    verdicts = []
    for it in (1, 2, 3):
        run.iteration = it
        verdicts.append(train_mod._evaluate(job, run, model, [], False, log))
    assert verdicts == [False, True, False] and run.best == {"vessel_dice": 10.0, "iteration": 2}

"""Training on a GPU: the CUDA recipe (channels_last, fused, AMP) and --deterministic repeats."""
import pytest
import torch

import fastunet
from fastunet import train as train_cli

from trainkit import assert_same_state, run_cli, tiny_model, tiny_synthetic

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_cuda_training_runs(amp, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "w"
    code = train_cli.main(["--device", "cuda", "--amp", amp, "--max-iters", "3",
                           "--batch-size", "4", "--workers", "0", "--work-dir", str(work),
                           "--cfg-options", *tiny_model(4), *tiny_synthetic()])
    out = capsys.readouterr().out
    assert code == 0
    assert f"amp {'off (fp32)' if amp == 'off' else amp}" in out and "fused on" in out
    ck = torch.load(work / "latest.pth", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values()
               if v.is_floating_point())
    if amp == "fp16":
        assert "scaler" in ck  # the GradScaler state resumes too


def test_deterministic_cuda_runs_repeat_bit_for_bit(tmp_path):
    # PSPNet + Dice: adaptive pooling and bilinear resizes, the ops with atomic-add gradients
    args = ["--config", "pspnet_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive", "--device", "cuda",
            "--deterministic", "--max-iters", "4", "--batch-size", "4", "--workers", "0",
            "--cfg-options", *tiny_model(8), "data.dataset=synthetic", "data.data_root=None",
            *tiny_synthetic()]
    states = []
    for run in ("a", "b"):
        out = run_cli("fastunet.train", [*args, "--work-dir", str(tmp_path / run)],
                      tmp_path / "cache")
        assert out.returncode == 0, out.stderr[-3000:]
        states.append(torch.load(tmp_path / run / "latest.pth", weights_only=False)["state_dict"])
    assert_same_state(*states)


@pytest.mark.parametrize("fused", ["on", "off"])
def test_captured_training_runs(fused, tmp_path, monkeypatch, capsys):
    # --capture graph: 3 eager warm-ups, one capture, replays; evaluation and checkpoints between
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "w"
    code = train_cli.main(["--device", "cuda", "--capture", "graph", "--fused", fused,
                           "--max-iters", "8", "--batch-size", "4", "--workers", "0",
                           "--log-interval", "2", "--work-dir", str(work), "--cfg-options",
                           *tiny_model(4), *tiny_synthetic(), "train.eval_interval=4",
                           "train.checkpoint_interval=4"])
    out = capsys.readouterr().out
    assert code == 0 and "captured" in out and "iter 8/8" in out
    ck = torch.load(work / "latest.pth", weights_only=False)
    assert ck["meta"]["iteration"] == 8
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values()
               if v.is_floating_point())

"""--resume after a real SIGKILL ends with exactly the weights of an uninterrupted run (CPU)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from trainkit import ROOT, assert_same_run, cli_env, intervals, run_cli, tiny_model, \
    tiny_synthetic

MAX_ITERS = 40


def _args(work, fused="auto"):
    # dropout is on (heads), so the random states matter; checkpoints every 4 iterations,
    # evaluation only at the end
    return ["--max-iters", str(MAX_ITERS), "--batch-size", "2", "--log-interval", "1",
            "--workers", "0", "--seed", "3", "--fused", fused, "--work-dir", str(work),
            "--cfg-options",
            *tiny_model(4), *tiny_synthetic(num_train=3, num_val=1), *intervals(4),
            f"train.eval_interval={MAX_ITERS}"]


@pytest.mark.parametrize("fused", ["off", "on"])  # plain modules (CPU default), fused kernels
def test_resume_after_sigkill_gives_the_same_weights(tmp_path, fused):
    cache = tmp_path / "cache"
    whole = run_cli("fastunet.train", _args(tmp_path / "whole", fused), cache)
    assert whole.returncode == 0, whole.stderr

    # the same run, killed for real (no chance to clean up) after its iteration 10
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "fastunet.train", *_args(work, fused)],
                            cwd=ROOT, env=cli_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("iter 10/"):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(work / "latest.pth", weights_only=False)["meta"]["iteration"]
    assert 8 <= killed_at < MAX_ITERS  # it died mid-run, after the checkpoint of iteration 8

    resumed = run_cli("fastunet.train", [*_args(work, fused), "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {work / 'latest.pth'} at iteration {killed_at}" in resumed.stdout

    a = torch.load(tmp_path / "whole" / "latest.pth", weights_only=False)
    b = torch.load(work / "latest.pth", weights_only=False)
    assert_same_run(a, b, MAX_ITERS)
    assert json.dumps(a["meta"]["metrics"]) == json.dumps(b["meta"]["metrics"])
    # the log has each iteration once, the killed run's unsaved tail replaced

    records = [json.loads(l) for l in (work / "log.jsonl").read_text().splitlines()]
    iters = [r["iter"] for r in records if r["mode"] == "train"]
    assert iters == list(range(1, MAX_ITERS + 1))


def test_resume_of_a_finished_run_only_evaluates(tmp_path):
    cache = tmp_path / "cache"
    args = ["--max-iters", "2", "--batch-size", "2", "--work-dir", str(tmp_path / "w"),
            "--cfg-options", *tiny_model(2), *tiny_synthetic()]
    assert run_cli("fastunet.train", args, cache).returncode == 0
    again = run_cli("fastunet.train", [*args, "--resume"], cache)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "vessel Dice" in again.stdout


def test_resume_with_changed_settings_says_so(tmp_path, capsys):
    from fastunet import train as train_cli

    args = ["--max-iters", "2", "--batch-size", "2", "--work-dir", str(tmp_path / "w"),
            "--cfg-options", *tiny_model(2), *tiny_synthetic()]
    assert train_cli.main(args) == 0
    capsys.readouterr()
    assert train_cli.main(["--resume", *args, "train.lr=0.02",
                           "data.label_resize=mmseg"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out
    assert "note: the data/train settings differ from the checkpoint's; continuing with the " \
           "current ones" in out

"""torchrun with 2 CPU processes (gloo): identical weights on both ranks, only rank 0 writes."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from trainkit import ROOT, cli_env, tiny_model, tiny_synthetic

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_process_gloo_run(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "dist_train_worker.py"), str(tmp_path),
           "--max-iters", "2", "--batch-size", "4", "--device", "cpu", "--workers", "0",
           "--work-dir", str(work), "--cfg-options", *tiny_model(4),
           *tiny_synthetic(num_train=4, num_val=3)]
    out = subprocess.run(cmd, cwd=ROOT, env=cli_env(tmp_path / "cache"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # gradients are averaged over the ranks, so the parameters agree exactly (BN statistics
    # are per process on CPU: DDP allows SyncBN on GPUs only)
    for name, value in r0["state_dict"].items():
        if not name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, r1["state_dict"][name]), name
    # rank 0 wrote the checkpoint, the overlay and the curves; rank 1 wrote nothing
    assert r1["writes"] == []
    assert "save_training_checkpoint" in r0["writes"]
    assert sorted(os.listdir(work)) == sorted(["iter_2.pth", "latest.pth", "log.jsonl",
                                               "curves.png", "vis"] + [
        p for p in os.listdir(work) if p.startswith("best_")])
    # both ranks report the metrics of the whole validation set (sharded, then summed)
    assert r0["metrics"] == r1["metrics"]
    assert "x 2 processes (gloo)" in out.stdout
    assert "per process on CPU" in out.stdout

"""Helpers for the training tests: tiny models and data through --cfg-options (not a test file)."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(width=4):
    """--cfg-options that shrink any config's UNet and heads to ``width`` base channels."""
    return [f"model.backbone.base_channels={width}", f"model.decode_head.in_channels={width}",
            f"model.decode_head.channels={width}",
            f"model.auxiliary_head.in_channels={2 * width}",
            f"model.auxiliary_head.channels={width}"]


def tiny_synthetic(size=96, num_train=2, num_val=1):
    """--cfg-options for a small built-in synthetic set (size x size images, 64x64 crops)."""
    return [f"data.image_size=({size},{size})", f"data.img_scale=({size},{size})",
            f"data.num_train={num_train}", f"data.num_val={num_val}",
            "model.test_cfg.crop_size=(64,64)", "model.test_cfg.stride=(42,42)"]


def intervals(every):
    """--cfg-options for evaluation and checkpoints every ``every`` iterations."""
    return [f"train.eval_interval={every}", f"train.checkpoint_interval={every}"]


def cli_env(cache_dir, **extra):
    """Environment for a CLI subprocess: this tree importable, its own synthetic cache, 1 thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["FASTUNET_CACHE"] = str(cache_dir)
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(module, args, cache_dir, timeout=300, **env):
    """Run ``python -m <module> args`` to completion; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=cli_env(cache_dir, **env))


def state_dict(path):
    """The state_dict stored in a checkpoint file."""
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_state(a, b):
    """Two state_dicts hold exactly the same tensors (bit for bit)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_same_run(a, b, iteration):
    """Two training checkpoints both at ``iteration`` with bitwise equal weights and SGD
    momentum buffers: an interrupted and resumed run ended where an uninterrupted one did."""
    assert a["meta"]["iteration"] == b["meta"]["iteration"] == iteration
    assert_same_state(a["state_dict"], b["state_dict"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])

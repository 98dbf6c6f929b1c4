"""Nothing lost, nothing half-written: predict and convert killed (SIGKILL) at random moments leave
only complete outputs (and clearly named temporary files, which the next run removes); a rerun
completes the job."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastunet
from fastunet.data.converters import MANIFEST
from fastunet.data.io import read_image, read_label, write_png
from fastunet.models import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 3


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def kill_at_random(argv, first_output, rng, max_delay):
    """Start ``python -m argv``, wait until ``first_output()`` is true (work has begun) or the
    process ends, then SIGKILL it after a random delay. Returns whether it was killed."""
    proc = subprocess.Popen([sys.executable, "-m"] + argv, env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and not first_output() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, max_delay))
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ predict

@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_kill")
    torch.manual_seed(0)
    ckpt = save_checkpoint(d / "tiny.pth", fastunet.build_segmentor(fastunet.get_config(
        "synthetic")))
    rng = np.random.default_rng(0)
    images = d / "images"
    images.mkdir()
    for i in range(8):
        write_png(images / f"img{i}.png", rng.integers(0, 256, (300, 340, 3), dtype=np.uint8))
    return ckpt, images


def _check_outputs(out, images, complete):
    """Every output present is a complete PNG of the right size; temporary files are hidden
    and clearly named; with ``complete``, all outputs exist and no temporary file is left."""
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    temps = [n for n in names if n.startswith(".")]
    assert all(n.endswith(".tmp") for n in temps), temps
    done = [n for n in names if not n.startswith(".")]
    for name in done:
        stem, kind = name.rsplit("_", 1)
        assert kind in ("mask.png", "overlay.png", "prob.png"), name
        arr = read_label(out / name) if kind != "overlay.png" else read_image(out / name)
        assert arr.shape[:2] == (300, 340), name
    if complete:
        expected = sorted(f"img{i}_{k}.png" for i in range(8) for k in ("mask", "overlay", "prob"))
        assert done == expected and temps == []
    return len(done)


def test_predict_killed_leaves_only_complete_files(predict_inputs, tmp_path):
    ckpt, images = predict_inputs
    out = tmp_path / "out"
    argv = ["fastunet.predict", str(images), "--config", "synthetic", "--checkpoint", str(ckpt),
            "--out-dir", str(out), "--save-probs", "--device", "cpu", "--quiet"]
    rng = random.Random(1234)
    counts = []
    for _ in range(KILLS):
        killed = kill_at_random(argv, lambda: out.is_dir() and any(out.iterdir()), rng, 1.5)
        counts.append((killed, _check_outputs(out, images, complete=not killed)))
    assert any(killed and 0 < n < 24 for killed, n in counts)  # killed mid-way at least once
    # a rerun finishes the job and removes the temporary files of the killed runs
    (out / ".img0_mask.png.999999999.0123abcd.tmp").write_bytes(b"\x89PNG partial")
    proc = subprocess.run([sys.executable, "-m"] + argv, env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_outputs(out, images, complete=True)


# ------------------------------------------------------------------------------ convert

@pytest.fixture(scope="module")
def drive_zips(tmp_path_factory):
    import test_convert

    d = tmp_path_factory.mktemp("convert_kill")
    test_convert.H, test_convert.W = 200, 180  # big enough to take a moment to convert
    try:
        return test_convert.drive_archives(d)
    finally:
        test_convert.H, test_convert.W = 12, 10


def _root_complete(root):
    manifest = json.load(open(root / MANIFEST))
    on_disk = {os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root)
               for f in fs} - {MANIFEST}
    assert on_disk == set(manifest["files"])
    assert manifest["counts"] == {"training": 20, "validation": 20}
    for rel in manifest["files"]:
        (read_image if rel.startswith("images") else read_label)(root / rel)


def test_convert_killed_leaves_no_partial_root(drive_zips, tmp_path):
    out = tmp_path / "DRIVE"
    argv = ["fastunet.convert", "drive", *drive_zips, "-o", str(out), "-q"]
    rng = random.Random(99)
    started = lambda: any(n.startswith(".DRIVE.converting-") for n in os.listdir(tmp_path))
    kills = 0
    for _ in range(KILLS):
        killed = kill_at_random(argv, started, rng, 0.8)
        kills += killed
        if killed:
            assert not out.exists() or (out / MANIFEST).exists()
        if out.exists():  # the rename is the last step: a root that exists is complete
            _root_complete(out)
        leftovers = [n for n in os.listdir(tmp_path) if n != "DRIVE"]
        assert all(n.startswith(".DRIVE.converting-") for n in leftovers), leftovers
    assert kills  # at least one run was killed before it finished
    proc = subprocess.run([sys.executable, "-m"] + argv, env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _root_complete(out)
    if any(n.startswith(".DRIVE.converting-") for n in os.listdir(tmp_path)):
        assert "left from an interrupted run" in proc.stderr


# ------------------------------------------------------------------------------ train

TRAIN_ITERS = 90
TRAIN_KILLS = int(os.environ.get("FASTUNET_TRAIN_KILLS", "5"))


def _train_args(work):
    from trainkit import intervals, tiny_model, tiny_synthetic

    # dropout is on, so random states matter; a checkpoint every 7 iterations, one evaluation
    return ["--max-iters", str(TRAIN_ITERS), "--batch-size", "2", "--workers", "0",
            "--log-interval", "1", "--seed", "5", "--work-dir", str(work), "--cfg-options",
            *tiny_model(2), *tiny_synthetic(num_train=3, num_val=1), *intervals(7),
            f"train.eval_interval={TRAIN_ITERS}"]


def test_train_killed_at_random_moments_resumes_to_the_same_weights(tmp_path):
    from fastunet.training.state import load_training_checkpoint
    from trainkit import assert_same_run, cli_env

    cache = tmp_path / "cache"
    env = cli_env(cache)

    def run(work, resume, timeout=600):
        args = _train_args(work) + (["--resume"] if resume else [])
        return subprocess.Popen([sys.executable, "-m", "fastunet.train", *args], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    t0 = time.time()
    whole = run(tmp_path / "whole", False)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    whole.stderr.close()
    duration = time.time() - t0

    work = tmp_path / "killed"
    rng = random.Random(2024)
    model = fastunet.build_segmentor(fastunet.models.apply_overrides(
        fastunet.get_config("synthetic"), _train_args(work)[_train_args(work).index(
            "--cfg-options") + 1:]))
    seen, kills = [], 0
    for _ in range(TRAIN_KILLS):
        latest = work / "latest.pth"
        proc = run(work, resume=latest.exists())
        try:
            proc.wait(timeout=rng.uniform(0.3, duration))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
        finally:
            proc.stderr.close()
        if latest.exists():  # always loadable: weights, and the full training state
            ckpt = load_training_checkpoint(latest)
            seen.append(ckpt["meta"]["iteration"])
            fastunet.load_checkpoint(model, latest)
        temps = [n for n in os.listdir(work) if n.startswith(".")] if work.exists() else []
        assert all(n.endswith((".pth", ".tmp")) for n in temps), temps  # hidden, named so
    assert kills >= 2, "the random delays killed fewer than 2 runs"
    final = run(work, resume=(work / "latest.pth").exists())
    assert final.wait(timeout=600) == 0, final.stderr.read()
    final.stderr.close()
    assert not [n for n in os.listdir(work) if n.startswith(".")]  # leftovers removed
    a = torch.load(tmp_path / "whole" / "latest.pth", weights_only=False)
    b = torch.load(work / "latest.pth", weights_only=False)
    assert_same_run(a, b, TRAIN_ITERS)
    assert seen == sorted(seen)  # checkpoints only move forward

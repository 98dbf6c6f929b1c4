"""Deterministic mode: fastunet.set_deterministic / --deterministic give bitwise-equal results run
to run; fastunet's own kernels are deterministic even across thread counts."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastunet
from fastunet import _native, ops, runtime
from fastunet.data.io import write_png
from fastunet.inference import InferenceEngine
from fastunet.inference import engine as eng
from fastunet.models import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def deterministic():
    restore = fastunet.set_deterministic(True)
    yield
    restore()


def test_set_deterministic_switches_and_restores():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    restore = fastunet.set_deterministic(True)
    try:
        assert torch.are_deterministic_algorithms_enabled() and runtime.is_deterministic()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    finally:
        restore()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    assert not runtime.is_deterministic()


def test_engine_plan_ignores_free_memory_in_deterministic_mode(monkeypatch, deterministic):
    net = lambda x: x[:, :2] * 2
    x = torch.randn(1, 3, 700, 500)
    schedules = []
    for free in (64 << 20, 1 << 40):  # a busy machine, an idle one
        monkeypatch.setattr(eng, "_available_bytes", lambda device, free=free: free)
        engine = InferenceEngine(net, "slide", 64, 42, max_buffer_bytes=8 << 20)
        engine(x)
        schedules.append(engine.last_schedule)
    assert schedules[0] == schedules[1]


@pytest.mark.skipif(not _native.LOADED, reason="checks the native kernels")
def test_own_kernels_are_bitwise_repeatable_across_thread_counts():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 48, 40).contiguous(memory_format=torch.channels_last) * 3 + 1
    tiles = torch.randn(6 * 6 * 2, 3, 16, 16)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            mean, var = ops.bn_stats(x)
            sums = ops.bn_relu_backward_reduce(x * 0.5, x, mean, var, None, None, 1e-5)
            agg = ops.tile_aggregate(tiles, 2, 61, 61, 9, weight=ops.gaussian_weight(16))
            results.append([mean, var, *sums, agg, ops.tile_extract(agg, 16, 9)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def checkpoint_and_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    ckpt = save_checkpoint(d / "tiny.pth", fastunet.build_segmentor(
        fastunet.get_config("synthetic")))
    image = np.random.default_rng(0).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    write_png(d / "img.png", image)
    return ckpt, d / "img.png", image


def test_predictor_twice_is_bitwise_equal(checkpoint_and_image, deterministic):
    ckpt, _, image = checkpoint_and_image
    runs = []
    for _ in range(2):
        predictor = fastunet.Predictor("synthetic", ckpt, device="cpu")
        runs.append(predictor.predict(image, return_probs=True))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])  # probabilities too, bit for bit


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_predictor_twice_is_bitwise_equal(checkpoint_and_image, deterministic, precision):
    ckpt, _, image = checkpoint_and_image
    big = np.tile(image, (4, 4, 1))  # several window batches
    runs = []
    for _ in range(2):
        predictor = fastunet.Predictor("synthetic", ckpt, device="cuda", precision=precision)
        runs.append([predictor.predict(big, return_probs=True) for _ in range(2)])  # 2nd: graphs
    flat = [r for run in runs for r in run]
    for labels, probs in flat[1:]:
        assert np.array_equal(labels, flat[0][0]) and np.array_equal(probs, flat[0][1])


def test_predict_cli_deterministic_twice_gives_identical_files(checkpoint_and_image, tmp_path):
    ckpt, image, _ = checkpoint_and_image
    env = dict(os.environ, PYTHONPATH=ROOT)
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        proc = subprocess.run(
            [sys.executable, "-m", "fastunet.predict", str(image), "--config", "synthetic",
             "--checkpoint", str(ckpt), "--out-dir", str(out), "--save-probs", "--device", "cpu",
             "--deterministic", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append({n: (out / n).read_bytes() for n in sorted(os.listdir(out))})
    assert list(outs[0]) == ["img_mask.png", "img_overlay.png", "img_prob.png"]
    assert outs[0] == outs[1]


def test_train_and_test_cli_deterministic_twice_are_bitwise_equal(tmp_path):
    from trainkit import assert_same_state, run_cli, tiny_model, tiny_synthetic

    opts = ["--cfg-options", *tiny_model(2), *tiny_synthetic(num_train=3, num_val=2),
            "train.eval_interval=6", "train.checkpoint_interval=6"]
    results = []
    for i in range(2):
        work = tmp_path / f"run{i}"
        done = run_cli("fastunet.train", ["--max-iters", "6", "--batch-size", "2", "--workers",
                                          "0", "--deterministic", "--work-dir", str(work), *opts],
                       tmp_path / "cache")
        assert done.returncode == 0, done.stderr
        scored = run_cli("fastunet.test", ["--config", "synthetic", "--checkpoint",
                                           str(work / "latest.pth"), "--deterministic",
                                           "--json", str(work / "m.json"), "--save-predictions",
                                           str(work / "pred"), *opts], tmp_path / "cache")
        assert scored.returncode == 0, scored.stderr
        preds = {n: (work / "pred" / n).read_bytes() for n in sorted(os.listdir(work / "pred"))}
        metrics = __import__("json").loads((work / "m.json").read_text())["metrics"]
        results.append((torch.load(work / "latest.pth", weights_only=False), preds, metrics))
    (a, preds_a, metrics_a), (b, preds_b, metrics_b) = results
    assert_same_state(a["state_dict"], b["state_dict"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert preds_a == preds_b and len(preds_a) == 2
    assert metrics_a == metrics_b

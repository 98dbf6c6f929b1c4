"""Training checkpoints (files, links, random states) and the deterministic-mode gradients."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet.training import determinism, state

from trainkit import ROOT, tiny_model


def _model():
    cfg = fastunet.get_config("synthetic")
    fastunet.models.apply_overrides(cfg, tiny_model(2))
    return cfg, fastunet.build_segmentor(cfg)


def _trained_one_step():
    """(config, model, SGD optimizer with momentum buffers) after one update."""
    cfg, model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.loss(torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32)))["decode.loss_ce"] \
        .backward()
    opt.step()
    return cfg, model, opt


def test_checkpoint_files_copies_and_meta(tmp_path):
    cfg, model, opt = _trained_one_step()
    meta = {"config": cfg, "metrics": {"vessel_dice": 50.0}}
    p2 = state.save_training_checkpoint(tmp_path, model, opt, 2, meta, [state.rng_state()],
                                        best=True)
    p4 = state.save_training_checkpoint(tmp_path, model, opt, 4, meta, [state.rng_state()])
    p6 = state.save_training_checkpoint(tmp_path, model, opt, 6, meta, [state.rng_state()],
                                        best=True)
    names = sorted(os.listdir(tmp_path))
    # periodic ones kept, latest = the newest, only one best; no temp files left behind
    assert names == ["best_vessel_dice_iter_6.pth", "iter_2.pth", "iter_4.pth", "iter_6.pth",
                     "latest.pth"]
    # latest and best are copies, files of their own: damage to one never reaches the other
    for copy in ("latest.pth", "best_vessel_dice_iter_6.pth"):
        assert not os.path.samefile(tmp_path / copy, p6)
        assert (tmp_path / copy).read_bytes() == open(p6, "rb").read()
    assert state.latest_checkpoint(tmp_path) == str(tmp_path / "latest.pth")
    os.remove(tmp_path / "latest.pth")
    assert state.latest_checkpoint(tmp_path) == p6  # falls back to the highest iter_N
    # loadable by the public loader, meta as promised
    fresh = fastunet.build_segmentor(cfg)
    got = fastunet.load_checkpoint(fresh, p4)
    assert got["iteration"] == 4 and got["config"] == cfg
    assert got["metrics"] == {"vessel_dice": 50.0}
    ck = state.load_training_checkpoint(p2)
    assert ck["optimizer"]["state"], "momentum buffers are saved"


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    _, model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state.save_training_checkpoint(tmp_path, model, opt, 1, {}, [state.rng_state()])
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state.set_rng_state(state.load_training_checkpoint(tmp_path / "latest.pth")["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_training_checkpoint_loads_with_plain_torch_load(tmp_path):
    cfg, model, opt = _trained_one_step()
    loader = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # numpy holds a cached Gaussian: has_gauss and gauss stored too
    path = state.save_training_checkpoint(tmp_path, model, opt, 1, {"config": cfg},
                                          [state.rng_state(loader)])
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3),
                torch.rand(2, generator=loader))
    ckpt = torch.load(path, weights_only=True)  # no safe_globals: tensors and plain values only
    assert ckpt["optimizer"]["state"] and ckpt["meta"]["config"] == cfg
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loader.manual_seed(9)
    state.set_rng_state(ckpt["rng"][0], loader)
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3),
           torch.rand(2, generator=loader))
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_an_older_checkpoints_numpy_state_still_restores(tmp_path):
    """Checkpoints written before the states were stored as plain values held numpy's legacy
    state tuple (with a uint32 array); they still resume."""
    _, model = _model()
    np.random.seed(4)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    expected = np.random.rand(4).tolist()
    torch.save({"meta": {"iteration": 1}, "state_dict": model.state_dict(), "optimizer": {},
                "rng": [legacy]}, tmp_path / "old.pth")
    np.random.seed(9)
    state.set_rng_state(state.load_training_checkpoint(tmp_path / "old.pth")["rng"][0])
    assert np.random.rand(4).tolist() == expected


def test_save_checkpoint_refuses_what_plain_torch_load_cannot_read(tmp_path):
    _, model = _model()
    with pytest.raises(TypeError, match=r"\['meta'\]\['when'\].*weights_only=True"):
        fastunet.models.save_checkpoint(tmp_path / "x.pth", model, {"when": object()})
    assert not os.path.exists(tmp_path / "x.pth")
    fastunet.models.save_checkpoint(tmp_path / "y.pth", model,
                                    {"n": np.int64(3), "a": np.arange(3), "t": (1, "x", None)})
    meta = torch.load(tmp_path / "y.pth", weights_only=True)["meta"]
    assert meta["n"] == 3 and type(meta["n"]) is int and torch.equal(meta["a"], torch.arange(3))
    assert meta["t"] == (1, "x", None)


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    _, model = _model()
    fastunet.models.save_checkpoint(tmp_path / "w.pth", model)
    with pytest.raises(ValueError, match="--load-from"):
        state.load_training_checkpoint(tmp_path / "w.pth")


@pytest.mark.parametrize("sizes", [((8, 7), (16, 14), False, 2.0), ((5, 9), (64, 64), False, None),
                                   ((1, 1), (13, 11), False, None), ((6, 6), (17, 5), True, None)])
def test_deterministic_upsample_backward_equals_pytorch(sizes):
    (hi, wi), (ho, wo), align, scale = sizes
    x = torch.randn(2, 3, hi, wi, dtype=torch.float64, requires_grad=True)
    y = (F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=align) if scale
         else F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=align))
    g = torch.randn_like(y)
    y.backward(g)
    got = determinism.upsample_bilinear2d_backward(g, y.shape[-2:], x.shape, align, scale, scale)
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sizes", [((64, 64), 1), ((64, 64), 6), ((17, 13), 6), ((5, 5), 6)])
def test_deterministic_adaptive_pool_backward_equals_pytorch(sizes):
    (hi, wi), out = sizes
    x = torch.randn(2, 3, hi, wi, dtype=torch.float64, requires_grad=True)
    y = F.adaptive_avg_pool2d(x, out)
    g = torch.randn_like(y)
    y.backward(g)
    got = determinism.adaptive_avg_pool2d_backward(g, x)
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-12)


def test_deterministic_kernels_dispatch_through_aten():
    # the CUDA registration cannot run here; registering the same functions for CPU (in a
    # child process) checks the op signatures and that autograd reaches them
    code = r"""
import torch, torch.nn.functional as F
from fastunet.training import determinism as d
from fastunet import models
torch.manual_seed(0)
x = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
def grads():
    x.grad = None
    y = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    z = F.adaptive_avg_pool2d(y, 6)
    (y.square().sum() + z.sin().sum()).backward()
    return x.grad.clone()
ref = grads()
calls = []
def spy(fn):
    def f(*a):
        calls.append(fn.__name__)
        return fn(*a)
    return f
lib = torch.library.Library("aten", "IMPL")
lib.impl("upsample_bilinear2d_backward", spy(d.upsample_bilinear2d_backward), "CPU")
lib.impl("_adaptive_avg_pool2d_backward", spy(d.adaptive_avg_pool2d_backward), "CPU")
got = grads()
assert sorted(set(calls)) == ["adaptive_avg_pool2d_backward", "upsample_bilinear2d_backward"], calls
torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_check_resumable_refuses_a_damaged_grad_scaler_state(tmp_path):
    _, model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state.save_training_checkpoint(tmp_path, model, opt, 1, {}, [state.rng_state()], scaler)
    ckpt = state.load_training_checkpoint(tmp_path / "latest.pth")
    state.check_resumable(ckpt, model, opt, scaler, max_iters=10)  # a real one passes
    for key, value in (("scale", float("nan")), ("scale", -1.0), ("growth_interval", "x"),
                       ("backoff_factor", 2.0)):
        damaged = dict(ckpt, scaler=dict(ckpt["scaler"], **{key: value}))
        with pytest.raises(ValueError, match=rf"scaler\['{key}'\] is"):
            state.check_resumable(damaged, model, opt, scaler, max_iters=10)


def test_check_resumable_takes_a_captured_runs_optimizer_and_back(tmp_path):
    # a run with --capture graph holds lr in a tensor and may step fused/foreach: its checkpoint
    # resumes an eager run (and back); a wrong type in those keys is still refused
    _, model = _model()
    captured = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1), momentum=0.9,
                               foreach=True)
    eager = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for saver, loader in ((captured, eager), (eager, captured)):
        state.save_training_checkpoint(tmp_path, model, saver, 1, {}, [state.rng_state()])
        ckpt = state.load_training_checkpoint(tmp_path / "latest.pth")
        state.check_resumable(ckpt, model, loader, max_iters=10)
    groups = [dict(g, foreach="yes") for g in ckpt["optimizer"]["param_groups"]]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['foreach'\] is"):
        state.check_resumable(dict(ckpt, optimizer=dict(ckpt["optimizer"], param_groups=groups)),
                              model, eager, max_iters=10)


def test_check_resumable_names_weights_of_another_model(tmp_path):
    # refused before anything loads, with what differs (not torch's multi-line load error)
    _, model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state.save_training_checkpoint(tmp_path, model, opt, 1, {}, [state.rng_state()])
    ckpt = state.load_training_checkpoint(tmp_path / "latest.pth")
    sd = dict(ckpt["state_dict"])
    key = next(iter(sd))
    sd["extra.weight"] = sd.pop(key)
    with pytest.raises(ValueError, match=rf"its weights do not match the model: 1 missing keys "
                                         rf"\({key}\); 1 unexpected keys \(extra.weight\)"):
        state.check_resumable(dict(ckpt, state_dict=sd), model, opt, max_iters=10)

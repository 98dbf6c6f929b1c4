"""Checkpoints: fastunet/mmseg layouts, 'module.' prefix, clear mismatch errors, safe loading."""
import os

import numpy as np
import pytest
import torch

import fastunet
from fastunet.models import apply_overrides, build_segmentor, get_config, save_checkpoint
from fastunet.models.checkpoint import OpaqueObject, UnsafeCheckpointError, read_checkpoint

SIDE_EFFECTS = []


def _side_effect(*args):
    SIDE_EFFECTS.append(args)
    return "ran"


class Evil:
    """Pickles as a call to _side_effect: loading it must not call it."""

    def __reduce__(self):
        return (_side_effect, ("pwned",))


class HistoryBuffer:
    """Pickled by class and state under mmengine's name, as mmengine's HistoryBuffer is."""

    def __init__(self):
        self._log_history = np.array([0.5, 0.4])
        self.max_length = 1000000


HistoryBuffer.__module__ = "mmengine.logging.history_buffer"


def model(head="fcn", base=2, seed=0):
    name = {"fcn": "fcn_unet_s5-d16_64x64_40k_drive",
            "psp": "pspnet_unet_s5-d16_64x64_40k_drive"}[head]
    cfg = apply_overrides(get_config(name), [
        f"model.backbone.base_channels={base}", f"model.decode_head.in_channels={base}",
        "model.decode_head.channels=4", f"model.auxiliary_head.in_channels={2 * base}",
        "model.auxiliary_head.channels=4"])
    torch.manual_seed(seed)
    return build_segmentor(cfg)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fastunet_round_trip(tmp_path):
    src, dst = model(seed=1), model(seed=2)
    path = save_checkpoint(tmp_path / "ckpt.pth", src, meta={"iter": 7}, optimizer={"lr": 0.01})
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind
    meta = fastunet.load_checkpoint(dst, path)
    assert same_state(src, dst)
    assert meta["iter"] == 7 and meta["fastunet_version"] == fastunet.__version__
    ckpt = read_checkpoint(path)
    assert set(ckpt) == {"meta", "state_dict", "optimizer"}  # mmseg's layout


def test_mmseg_layout_with_numpy_meta_and_mmengine_objects(tmp_path, monkeypatch):
    import sys
    import types

    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    src, dst = model(seed=1), model(seed=2)
    path = tmp_path / "iter_4000.pth"
    torch.save({"meta": {"seed": np.int64(42), "best": np.float64(0.79),
                         "mean": np.array([123.675, 116.28, 103.53]), "CLASSES": ("bg", "vessel"),
                         "PALETTE": [[0, 0, 0], [255, 255, 255]], "iter": 4000},
                "state_dict": src.state_dict(),
                "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}}, path)
    meta = fastunet.load_checkpoint(dst, path)
    assert same_state(src, dst)
    assert meta["seed"] == 42 and meta["best"] == pytest.approx(0.79)
    np.testing.assert_array_equal(meta["mean"], [123.675, 116.28, 103.53])
    buf = read_checkpoint(path)["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, OpaqueObject) and buf.name == "mmengine.logging.history_buffer." \
                                                        "HistoryBuffer"
    np.testing.assert_array_equal(buf.state["_log_history"], [0.5, 0.4])


def test_pickled_code_never_runs(tmp_path):
    path = tmp_path / "evil.pth"
    src = model()
    torch.save({"state_dict": src.state_dict(), "meta": {"x": Evil()}}, path)
    SIDE_EFFECTS.clear()
    with pytest.raises(UnsafeCheckpointError, match="test_models_checkpoint._side_effect"):
        fastunet.load_checkpoint(model(seed=3), path)
    assert SIDE_EFFECTS == []


def test_bare_and_module_prefixed_state_dicts(tmp_path):
    src = model(seed=1)
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "ddp.pth")
    for f in ("bare.pth", "ddp.pth"):
        dst = model(seed=2)
        assert fastunet.load_checkpoint(dst, tmp_path / f) == {}
        assert same_state(src, dst)


def test_saves_from_a_dataparallel_wrapper_without_prefix(tmp_path):
    src = model(seed=1)
    path = save_checkpoint(tmp_path / "dp.pth", torch.nn.DataParallel(src))
    assert not any(k.startswith("module.") for k in read_checkpoint(path)["state_dict"])


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "psp.pth", model("psp"))
    with pytest.raises(ValueError) as e:
        fastunet.load_checkpoint(model("fcn"), path)
    msg = str(e.value)
    assert "does not match the model" in msg
    assert "missing keys (decode_head.convs.0.conv.weight" in msg
    assert "unexpected keys (decode_head.psp_modules.0.1.conv.weight" in msg
    assert "(+" in msg and "more)" in msg  # long lists are cut, with counts
    path = save_checkpoint(tmp_path / "wide.pth", model("fcn", base=4))
    with pytest.raises(ValueError, match=r"shape mismatches \(backbone.encoder.0.0.convs.0.conv"
                                         r".weight \(4, 3, 3, 3\) vs model \(2, 3, 3, 3\)"):
        fastunet.load_checkpoint(model("fcn", base=2), path)


def test_non_strict_loads_what_matches_and_warns(tmp_path):
    src = model("psp", seed=1)
    path = save_checkpoint(tmp_path / "psp.pth", src)
    dst = model("fcn", seed=2)
    with pytest.warns(UserWarning, match="loaded the matching tensors only"):
        fastunet.load_checkpoint(dst, path, strict=False)
    torch.testing.assert_close(dst.backbone.state_dict(), src.backbone.state_dict())


def test_failed_save_keeps_the_old_file(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pth", model(seed=1), meta={"iter": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, model(seed=2), meta={"iter": 2}, bad=lambda: None)  # unpicklable
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    assert read_checkpoint(path)["meta"]["iter"] == 1


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        fastunet.load_checkpoint(model(), tmp_path / "nope.pth")
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no state_dict in checkpoint"):
        fastunet.load_checkpoint(model(), tmp_path / "other.pth")

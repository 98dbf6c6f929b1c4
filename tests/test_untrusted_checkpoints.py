"""Checkpoints from the internet: a pickle that would create a file if it ran never does, through
every entry point that loads checkpoints, and is refused in one clear line wherever it sits.
Foreign classes that run nothing (mmengine's HistoryBuffer, an argparse.Namespace) load as inert
placeholders, so real mmseg checkpoints still load."""
import builtins
import os
import pickle
import sys
import types
import warnings

import pytest
import torch

import fastunet
from fastunet import predict
from fastunet.data.io import write_png
from fastunet.models.checkpoint import OpaqueObject, UnsafeCheckpointError, read_checkpoint

CONFIG = "synthetic"


class ShellPayload:
    """Unpickling calls os.system('touch <marker>') (pickled as posix.system; torch blocks it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling calls exec() on code that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class OpenPayload:
    """Unpickling calls open(marker, 'w'), which creates the file by itself."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


PAYLOADS = [ShellPayload, ExecPayload, OpenPayload]
CALL_NAMES = {ShellPayload: "posix.system", ExecPayload: "builtins.exec", OpenPayload: "io.open"}


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return fastunet.build_segmentor(fastunet.get_config(CONFIG)).state_dict()


def _save(path, obj, legacy=False):
    if legacy:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, path)
    return path


def _layouts(weights, payload):
    """Where an attacker may put the payload: name -> checkpoint object."""
    return {
        "meta": {"meta": {"note": payload}, "state_dict": weights},
        "message_hub": {"meta": {}, "state_dict": weights, "message_hub": {"log": [payload]}},
        "state_dict_value": {"state_dict": {**weights, "backbone.evil": payload}},
        "state_dict": {"meta": {}, "state_dict": payload},
        "top_level": payload,
    }


def _entry_points(tmp_path):
    """name -> function(path) loading the checkpoint the way a user would."""
    image = tmp_path / "in.png"
    write_png(image, torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())

    def cli(path):
        status = predict.main([str(image), "--config", CONFIG, "--checkpoint", str(path),
                               "--out-dir", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
        if status:
            raise RuntimeError(f"predict exit status {status}")

    return {
        "read_checkpoint": read_checkpoint,
        "load_checkpoint": lambda p: fastunet.load_checkpoint(
            fastunet.build_segmentor(fastunet.get_config(CONFIG)), p),
        "Predictor": lambda p: fastunet.Predictor(CONFIG, p, device="cpu"),
        "predict_cli": cli,
    }


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_payload_never_runs_through_any_entry_point(payload, weights, tmp_path, capsys):
    marker = tmp_path / "pwned"
    entry_points = _entry_points(tmp_path)
    for where, obj in _layouts(weights, payload(str(marker))).items():
        path = _save(tmp_path / f"{where}.pth", obj)
        for name, load in entry_points.items():
            with pytest.raises((ValueError, RuntimeError)) as info:
                load(path)
            assert not marker.exists(), f"{where} via {name}: the pickled payload ran"
            if name != "predict_cli":
                msg = str(info.value)
                assert isinstance(info.value, UnsafeCheckpointError), (where, name, msg)
                assert "\n" not in msg and "nothing was executed" in msg, msg
                assert CALL_NAMES[payload] in msg, msg
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_foreign_classes_load_as_inert_data(weights, tmp_path):
    class Recorder:  # a class of some other package: its __setstate__ must never run
        def __setstate__(self, state):
            open(state["marker"], "w").write("pwned")

    marker = tmp_path / "pwned"
    obj = Recorder()
    obj.__dict__["marker"] = str(marker)
    Recorder.__module__, Recorder.__qualname__ = "somepackage.hooks", "Recorder"
    sys.modules["somepackage"] = types.ModuleType("somepackage")
    sys.modules["somepackage.hooks"] = mod = types.ModuleType("somepackage.hooks")
    mod.Recorder = Recorder
    try:
        path = _save(tmp_path / "meta.pth", {"meta": {"hook": obj}, "state_dict": weights})
    finally:
        del sys.modules["somepackage"], sys.modules["somepackage.hooks"]
    ckpt = read_checkpoint(path)
    hook = ckpt["meta"]["hook"]
    assert isinstance(hook, OpaqueObject) and hook.name == "somepackage.hooks.Recorder"
    assert not marker.exists()
    model = fastunet.build_segmentor(fastunet.get_config(CONFIG))
    fastunet.load_checkpoint(model, path)  # the weights load


def test_legacy_format_and_raw_pickles_are_refused(weights, tmp_path):
    marker = tmp_path / "pwned"
    legacy = _save(tmp_path / "legacy.pth", {"meta": {"x": ExecPayload(str(marker))},
                                             "state_dict": weights}, legacy=True)
    with pytest.raises(RuntimeError, match="legacy-format checkpoint"):
        read_checkpoint(legacy)
    raw = tmp_path / "raw.pth"
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": ShellPayload(str(marker))}, f)
    with pytest.raises(RuntimeError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(raw)
    assert not marker.exists()


def test_real_mmseg_checkpoint_and_training_args_load_silently(weights, tmp_path):
    # an mmseg 1.x file (tests/data, written by mmseg) pickles mmengine's HistoryBuffer and the
    # builtins.getattr calls of its state; scripts often save an argparse.Namespace of arguments
    import argparse
    mmseg_file = os.path.join(os.path.dirname(__file__), "data", "mmseg_unet_bc1_aspp.pt")
    path = _save(tmp_path / "args.pth", {"meta": {"args": argparse.Namespace(lr=0.01)},
                                         "state_dict": weights})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub = read_checkpoint(mmseg_file)["message_hub"]["log_scalars"]["train/loss"]
        args = read_checkpoint(path)["meta"]["args"]
    assert isinstance(hub, OpaqueObject) and hub.name.endswith("HistoryBuffer")
    assert isinstance(args, OpaqueObject) and args.name == "argparse.Namespace"


# ------------------------------------------------------------------------------ train / test CLIs

@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A real 1-iteration training checkpoint of a tiny model on a tiny DRIVE-layout root."""
    from fastunet import train as train_cli
    from fastunet.data import write_synthetic
    from trainkit import tiny_model

    d = tmp_path_factory.mktemp("train_ckpt")
    root = write_synthetic(d / "DRIVE", num_training=2, num_validation=1, size=(64, 64))
    args = ["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--data-root", str(root),
            "--batch-size", "2", "--workers", "0", "--cfg-options", *tiny_model(2)]
    assert train_cli.main([*args, "--max-iters", "1", "--work-dir", str(d / "work")]) == 0
    ckpt = torch.load(d / "work" / "latest.pth", weights_only=False)  # our own file: trusted
    return ckpt, args, d


def _poisoned(ckpt, where, payload, path):
    ckpt = dict(ckpt, meta=dict(ckpt["meta"]), optimizer=dict(ckpt["optimizer"]))
    if where == "meta":
        ckpt["meta"]["note"] = payload
    elif where == "optimizer":
        ckpt["optimizer"]["state"] = payload
    else:
        ckpt["rng"] = [payload]
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("where", ["meta", "optimizer", "rng"])
def test_train_resume_load_from_and_test_cli_never_run_it(where, payload, training_checkpoint,
                                                          tmp_path, capsys):
    from fastunet import test as test_cli
    from fastunet import train as train_cli

    ckpt, args, d = training_checkpoint
    marker = tmp_path / "pwned"
    path = _poisoned(ckpt, where, payload(str(marker)), tmp_path / "poisoned.pth")
    cut = args.index("--cfg-options")
    flags, opts = args[:cut], args[cut:]
    runs = {
        # iteration 1 of 1 done: a resume only evaluates, a load-from trains 1 iteration
        "train --resume": lambda: train_cli.main([*flags, "--max-iters", "1", "--work-dir",
                                                  str(tmp_path / "r"), "--resume", str(path),
                                                  *opts]),
        "train --load-from": lambda: train_cli.main([*flags, "--max-iters", "1", "--work-dir",
                                                     str(tmp_path / "l"), "--load-from",
                                                     str(path), *opts]),
        "test": lambda: test_cli.main(["--config", args[1], "--data-root", args[3],
                                       "--checkpoint", str(path), *opts]),
    }
    for name, run in runs.items():
        code = run()
        err = capsys.readouterr().err
        assert not marker.exists(), f"{name}: the pickled payload ran"
        assert "Traceback" not in err
        assert code == 2 and "nothing was executed" in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)

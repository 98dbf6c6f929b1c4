"""Checkpoints from the internet: a pickle that would create a file if it ran never does, through
every entry point that loads checkpoints. Calls into os/posix/sys are refused outright; other
pickled calls become inert placeholders, so the weights still load (with a warning) when the
payload sits in ``meta``, and anything that takes the place of the weights is refused in one
clear line."""
import builtins
import os
import pickle
import warnings

import pytest
import torch

import fastunet
from fastunet import predict
from fastunet.data.io import write_png
from fastunet.models.checkpoint import CheckpointSecurityWarning, OpaqueObject, read_checkpoint

CONFIG = "synthetic"


class ShellPayload:
    """Unpickling calls os.system('touch <marker>') (pickled as posix.system): refused."""

    refused = True

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling calls exec() on code that creates the marker file: neutralised."""

    refused = False

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class OpenPayload:
    """Unpickling calls open(marker, 'w'), which creates the file by itself: neutralised."""

    refused = False

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


PAYLOADS = [ShellPayload, ExecPayload, OpenPayload]


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
    """Where an attacker may put the payload: name -> (checkpoint object, weights usable?)."""
    return {
        "meta": ({"meta": {"note": payload}, "state_dict": weights}, True),
        "message_hub": ({"meta": {}, "state_dict": weights,
                         "message_hub": {"log": [payload, payload]}}, True),
        "state_dict_value": ({"state_dict": {**weights, "backbone.evil": payload}}, False),
        "state_dict": ({"meta": {}, "state_dict": payload}, False),
        "top_level": (payload, False),
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
    for where, (obj, usable) in _layouts(weights, payload(str(marker))).items():
        path = _save(tmp_path / f"{where}.pth", obj)
        for name, load in entry_points.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    load(path)
                    error = None
                except (ValueError, RuntimeError) as exc:
                    error = exc
            assert not marker.exists(), f"{where} via {name}: the pickled payload ran"
            if payload.refused:
                assert error is not None, f"{where} via {name}: loaded"
                if name != "predict_cli":
                    assert "nothing was executed" in str(error) and "posix.system" in str(error)
            elif name == "read_checkpoint" or usable:
                assert error is None, f"{where} via {name}: {error}"
                if name != "predict_cli":  # the CLI prints the warning instead
                    assert any(issubclass(w.category, CheckpointSecurityWarning)
                               and "never executed" in str(w.message) for w in caught), where
            else:
                assert error is not None, f"{where} via {name}: loaded"
                if name != "predict_cli":
                    msg = str(error)
                    assert "\n" not in msg and ("not tensors" in msg or "never executed" in msg
                                                or "no state_dict" in msg), msg
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_neutralised_payload_is_inert_data(weights, tmp_path):
    marker = tmp_path / "pwned"
    path = _save(tmp_path / "meta.pth", {"meta": {"note": OpenPayload(str(marker))},
                                         "state_dict": weights})
    with pytest.warns(CheckpointSecurityWarning, match=r"io\.open"):
        ckpt = read_checkpoint(path)
    note = ckpt["meta"]["note"]
    assert isinstance(note, OpaqueObject) and note.name == "io.open"
    assert note.args == (str(marker), "w")
    assert not marker.exists()


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
        warnings.simplefilter("error", CheckpointSecurityWarning)
        hub = read_checkpoint(mmseg_file)["message_hub"]["log_scalars"]["train/loss"]
        args = read_checkpoint(path)["meta"]["args"]
    assert isinstance(hub, OpaqueObject) and hub.name.endswith("HistoryBuffer")
    assert isinstance(args, OpaqueObject) and args.name == "argparse.Namespace"

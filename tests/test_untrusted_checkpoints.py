"""Checkpoints from the internet: a pickle that would create a file if it ran never does, through
every entry point that loads checkpoints, and is refused in one clear line wherever it sits,
naming what it found, before torch unpickles anything. Only an allowlist of globals may appear;
mmengine's HistoryBuffer and an argparse.Namespace load as inert placeholders, so real mmseg
checkpoints still load. Files built to exhaust memory (compressed members, storages or numpy
arrays larger than the file) are refused before they cost it."""
import builtins
import collections
import os
import pickle
import struct
import sys
import types
import warnings
import zipfile

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


def test_foreign_classes_are_refused_by_name(weights, tmp_path):
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
        with pytest.raises(UnsafeCheckpointError, match="somepackage.hooks.Recorder"):
            read_checkpoint(path)
    finally:
        del sys.modules["somepackage"], sys.modules["somepackage.hooks"]
    assert not marker.exists()


def test_legacy_format_and_raw_pickles_are_refused_by_name(weights, tmp_path):
    marker = tmp_path / "pwned"
    legacy = _save(tmp_path / "legacy.pth", {"meta": {"x": ExecPayload(str(marker))},
                                             "state_dict": weights}, legacy=True)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec.*nothing was executed"):
        read_checkpoint(legacy)
    raw = tmp_path / "raw.pth"
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": ShellPayload(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="posix.system.*nothing was executed"):
        read_checkpoint(raw)
    assert not marker.exists()
    plain = _save(tmp_path / "plain_legacy.pth", {"state_dict": weights}, legacy=True)
    assert read_checkpoint(plain)["state_dict"].keys() == weights.keys()


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


# ------------------------------------------------------------------------------ hand-made pickles

def _text(value):
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _torch_zip(path, pickle_bytes, extra=None, compress=None):
    """A file in torch.save's zip layout whose data.pkl is ``pickle_bytes`` (and ``extra``
    records {name: bytes}); members stored, or compressed with ``compress``."""
    torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    prefix = next(n for n in members if n.endswith("/data.pkl"))[:-len("data.pkl")]
    members[prefix + "data.pkl"] = pickle_bytes
    members.update({prefix + k: v for k, v in (extra or {}).items()})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, compress_type=compress if name.endswith("/data/0")
                       else zipfile.ZIP_STORED)
    return path


def _gadgets(marker):
    """Pickles that chain calls the way exploits do; torch itself fails on them, so they were
    once reported as 'truncated or corrupt' instead of as what they are."""
    cmd = f"touch {marker}"
    return {
        "builtins.__import__": (b"\x80\x02" + _global("builtins", "getattr")
                                + _global("builtins", "__import__") + _text("os") + b"\x85R"
                                + _text("system") + b"\x86R" + _text(cmd) + b"\x85R."),
        "builtins.eval": (b"\x80\x02" + _global("builtins", "eval")
                          + _text("__import__('os').system") + b"\x85R" + _text(cmd)
                          + b"\x85R."),
        "builtins.exec": (b"\x80\x02" + _global("builtins", "exec")
                          + _text(f"open({str(marker)!r}, 'w')") + b"\x85R" + _text("x")
                          + b"\x85R."),
    }


@pytest.mark.parametrize("name", ["builtins.__import__", "builtins.eval", "builtins.exec"])
def test_code_running_gadgets_are_named_even_where_torch_fails(name, tmp_path):
    marker = tmp_path / "pwned"
    pkl = _gadgets(marker)[name]
    whole = _torch_zip(tmp_path / "gadget.pth", pkl)
    end = pkl.index(name.split(".")[1].encode() + b"\n") + len(name.split(".")[1]) + 1
    cut = _torch_zip(tmp_path / "cut.pth", pkl[:end + 3])  # truncated just after the name
    for path in (whole, cut):
        with pytest.raises(UnsafeCheckpointError) as info:
            read_checkpoint(path)
        msg = str(info.value)
        assert name in msg and "nothing was executed" in msg and "\n" not in msg, msg
    assert not marker.exists()


def test_a_call_of_a_call_is_refused_even_with_allowed_names(tmp_path):
    # getattr (allowed as inert data for mmengine's buffers) used to fetch and call a method
    pkl = (b"\x80\x02" + _global("builtins", "getattr") + _global("collections", "OrderedDict")
           + _text("fromkeys") + b"\x86R" + _text("ab") + b"\x85R.")
    with pytest.raises(UnsafeCheckpointError, match="calls the result of another call"):
        read_checkpoint(_torch_zip(tmp_path / "chain.pth", pkl))


def _writes_marker(marker):
    """(name, callable, args) whose call would create ``marker``, or run code, or touch files;
    none is something a weights file needs."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    import cProfile
    import pdb
    import timeit

    import numpy as np
    import torch.utils.cpp_extension

    from fastunet.data import io
    from fastunet.models import checkpoint

    return [
        ("timeit.timeit", timeit.timeit, (code,)),
        ("cProfile.run", cProfile.run, (code,)),
        ("pdb.run", pdb.run, (code,)),
        ("numpy.load", np.load, (str(marker), None, True)),
        ("numpy.fromfile", np.fromfile, (str(marker),)),
        ("torch.serialization.load", torch.serialization.load, (str(marker),)),
        ("torch.utils.cpp_extension.load_inline", torch.utils.cpp_extension.load_inline,
         ("x", "int f() { return 0; }")),
        ("fastunet.data.io.write_png", io.write_png, (str(marker), np.zeros((2, 2), np.uint8))),
        ("fastunet.models.checkpoint.save_checkpoint", checkpoint.save_checkpoint,
         (str(marker), {})),
    ]


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("index", range(9), ids=lambda i: _writes_marker("m")[i][0])
def test_globals_outside_the_allowlist_are_refused_by_name(index, weights, tmp_path):
    marker = tmp_path / "pwned"
    name, func, args = _writes_marker(marker)[index]
    path = _save(tmp_path / "ckpt.pth", {"meta": {"hook": _Call(func, args)},
                                         "state_dict": weights})
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert name in str(info.value) and "nothing was executed" in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------ memory bombs

class _StorageRef:
    pass


class _Tensor:
    """Pickles as torch's tensor rebuild over storage '0' declaring ``numel`` floats."""

    def __init__(self, numel):
        self.numel = numel

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_StorageRef(), 0, (self.numel,), (1,), False,
                                                  collections.OrderedDict()))


def _tensor_pickle(numel):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"state_dict": {"w": _Tensor(numel)}})
    return buf.getvalue()


def _deflated_zeros(path, numel):
    """A checkpoint whose storage of ``numel`` float zeros is a deflated zip member: a few KB
    on disk, ``4 * numel`` bytes once read."""
    from test_convert import replace_with_deflated_zeros

    _torch_zip(path, _tensor_pickle(numel))
    with zipfile.ZipFile(path) as z:
        prefix = next(n for n in z.namelist() if n.endswith("/data.pkl"))[:-len("data.pkl")]
    replace_with_deflated_zeros(path, prefix + "data/0", 4 * numel)
    return path


class _NumpyCall:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _bombs(tmp_path):
    """name -> (path, text the refusal must contain); each would allocate far more than its file."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    big = 64 << 20  # floats: 256 MiB
    return {
        "deflated storage": (_deflated_zeros(tmp_path / "deflated.pth", big), "is compressed"),
        "storage larger than its record": (
            _torch_zip(tmp_path / "short.pth", _tensor_pickle(big), {"data/0": bytes(16)}),
            "more than the"),
        "numpy.ndarray call": (
            _save(tmp_path / "ndarray.pth", {"meta": {"x": _NumpyCall(np.ndarray,
                                                                      ((20000, 20000), "f8"))}}),
            "numpy.ndarray"),
        "numpy _reconstruct of a huge shape": (
            _save(tmp_path / "reconstruct.pth", {"meta": {"x": _NumpyCall(
                multiarray.multiarray._reconstruct, (np.ndarray, (30000, 30000), b"b"))}}),
            "array of shape"),
    }


@pytest.mark.parametrize("case", ["deflated storage", "storage larger than its record",
                                  "numpy.ndarray call", "numpy _reconstruct of a huge shape"])
def test_files_that_would_exhaust_memory_are_refused_before_loading(case, tmp_path):
    path, message = _bombs(tmp_path)[case]
    assert os.path.getsize(path) < 4 << 20
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)

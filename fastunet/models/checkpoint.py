"""Checkpoints: load fastunet and mmseg ``.pth`` files safely; save atomically in mmseg's layout.

Files are read with ``torch.load(weights_only=True)``: no pickled code ever runs. Besides tensors
and plain Python values, the numpy scalars/arrays an mmseg ``meta`` may hold are allowed, and other
classes (e.g. mmengine's ``HistoryBuffer`` in ``message_hub``, an ``argparse.Namespace`` of
training arguments) are read as inert :class:`OpaqueObject` s that keep their pickled arguments and
state but run nothing. A file that pickles a call which would run code or touch files (``exec``,
``open``, ``os.system``, ``subprocess``, ...) is refused with an :class:`UnsafeCheckpointError`
(a RuntimeError) naming those calls; nothing in it was executed. Legacy (pre-1.6, non-zip) files
holding any object beyond tensors, plain values and numpy are refused too. Weights themselves must
be tensors: a state_dict that holds anything else is refused with a ValueError.
"""
import os
import re
import tempfile
import time
import warnings
import zipfile

import torch
import torch.nn as nn

__all__ = ["load_checkpoint", "save_checkpoint", "read_checkpoint", "extract_state_dict",
           "OpaqueObject", "UnsafeCheckpointError"]

# Pickled calls that run code or touch files: no weights file needs them, so finding one means the
# file was crafted (or saved carelessly). Safety does not depend on this list (every unknown
# global is neutralised, or refused by torch); it only decides which neutralised names make the
# file refused. Ordinary foreign classes (mmengine's HistoryBuffer and the builtins.getattr calls its
# state pickles, an argparse.Namespace of training arguments) load silently.
_CODE_RUNNING = ("builtins.exec", "builtins.eval", "builtins.compile", "builtins.open",
                 "builtins.__import__", "builtins.breakpoint", "builtins.input", "io.",
                 "_io.", "subprocess.", "shutil.", "importlib.", "runpy.", "pickle.", "_pickle.",
                 "marshal.", "ctypes.", "socket.", "code.", "pty.", "webbrowser.", "pathlib.",
                 "tempfile.", "multiprocessing.", "threading.", "signal.", "platform.",
                 "torch.hub.", "torch.load", "torch.jit.", "torch.ops.")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint pickles calls that would run code or touch files; it was not loaded (nothing
    in it was executed)."""


class OpaqueObject:
    """Stand-in for a pickled object of a class fastunet does not trust; holds its data only."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        obj.name = getattr(cls, "_pickled_name", None)  # e.g. 'mmengine.logging.HistoryBuffer'
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"OpaqueObject({self.name or 'unknown'})"


def _numpy_globals():
    """Name -> object for the numpy pieces needed to rebuild scalars, arrays and dtypes."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return {}
    multiarray = getattr(np, "_core", None) or np.core
    safe = {"ndarray": np.ndarray, "dtype": np.dtype,
            "_reconstruct": multiarray.multiarray._reconstruct,
            "scalar": multiarray.multiarray.scalar}
    out = {}
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        for attr, obj in safe.items():
            out[f"{mod}.{attr}"] = obj
    for dt in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128,
               np.str_, np.bytes_):
        cls = type(np.dtype(dt))
        out[f"{cls.__module__}.{cls.__name__}"] = cls  # numpy>=1.25 pickles dtypes by class
    return out


def _opaque_class(name):
    # a distinct subclass per name: torch's allowlist maps one object to one name
    return type("OpaqueObject", (OpaqueObject,), {"__module__": __name__, "_pickled_name": name})


def _safe_globals_for(path):
    """(allowlist for torch.serialization.safe_globals, names neutralised as OpaqueObject)."""
    numpy_globals = _numpy_globals()
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) file: only numpy can be allowed up front
        wanted = list(numpy_globals)
    # all numpy pieces always: a dtype instance is checked by its class, which the pickle never
    # names (it names numpy.dtype), so it cannot be discovered from the file
    out = [(obj, name) for name, obj in numpy_globals.items()]
    opaque = [name for name in wanted if name not in numpy_globals]
    out += [(_opaque_class(name), name) for name in opaque]
    return out, opaque


def _reason(e):
    """A short reason from torch's error: never its advice to retry with weights_only=False."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        # the unpickler's own words come after "WeightsUnpickler error:"
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        text = detail[0] if detail and "Weights only" not in detail[0] else "not a pickle"
    text = text.splitlines()[0] if text else type(e).__name__
    cut = text.find(". ")
    text = text[:cut] if cut > 0 else text.rstrip(".")
    return f"{type(e).__name__}: {text[:160]}"


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint file's object, read with ``weights_only=True`` (never runs pickled code)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a .pth file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    allowed, opaque = _safe_globals_for(path)
    with torch.serialization.safe_globals(allowed):
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            if not zipfile.is_zipfile(path) and "Unsupported global" in str(e):
                raise RuntimeError(f"{path}: a legacy-format checkpoint holding objects that "
                                   f"cannot be read safely; re-save its state_dict with a recent "
                                   f"torch (torch.save(ckpt['state_dict'], new_path))") from e
            blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(e))
            if blocked:  # torch refuses os/posix/nt/sys outright, whatever the allowlist
                raise UnsafeCheckpointError(
                    f"refusing checkpoint {path}: it pickles a call to {blocked.group(1)} (a "
                    f"weights file never needs one); nothing was executed") from e
            if isinstance(e, (PermissionError, IsADirectoryError)):
                raise RuntimeError(f"cannot read checkpoint {path}: {e.strerror}") from e
            hint = ("" if zipfile.is_zipfile(path) or os.path.getsize(path) > 0 else
                    " (the file is empty)")
            raise RuntimeError(f"cannot read checkpoint {path}: not a readable PyTorch "
                               f"checkpoint{hint}; is it truncated or corrupt? "
                               f"({_reason(e)})") from e
    suspicious = sorted(n for n in opaque if n.startswith(_CODE_RUNNING))
    if suspicious:
        raise UnsafeCheckpointError(
            f"refusing checkpoint {path}: it pickles calls that would run code or open files "
            f"({_summary(suspicious)}; a weights file never needs them); nothing was executed. "
            f"If you trust its source, re-save only its weights: torch.save({{'state_dict': "
            f"torch.load(path, weights_only=False)['state_dict']}}, new_path)")
    return obj


def extract_state_dict(ckpt):
    """The state_dict in a checkpoint (``ckpt['state_dict']`` or bare), ``module.`` removed."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state = ckpt
    else:
        if isinstance(ckpt, OpaqueObject) or (isinstance(ckpt, dict) and isinstance(
                ckpt.get("state_dict"), OpaqueObject)):
            what = ckpt if isinstance(ckpt, OpaqueObject) else ckpt["state_dict"]
            raise ValueError(f"no weights in checkpoint: its state_dict is a pickled "
                             f"{what.name or 'object'} (loaded inert, never executed), not a "
                             f"dict of tensors")
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"no state_dict in checkpoint (expected a dict with 'state_dict' or a "
                         f"bare state_dict; found {keys})")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        kinds = sorted({v.name if isinstance(v, OpaqueObject) and v.name else type(v).__name__
                        for k, v in state.items() if k in bad})
        raise ValueError(f"checkpoint state_dict holds {len(bad)} entries that are not tensors "
                         f"({_summary(bad)}: {', '.join(kinds)}); pickled objects are never "
                         f"executed, and weights must be tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP/DP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel,
                                              nn.parallel.DistributedDataParallel)) else model


def _summary(keys, n=4):
    keys = list(keys)
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _mismatch(model_state, state):
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
              for k in model_state if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(model_state[k].shape)]
    return missing, unexpected, shapes


def load_checkpoint(model, path, map_location="cpu", strict=True):
    """Load a fastunet or mmseg checkpoint into ``model``; returns the checkpoint's ``meta``.

    Accepts ``{'meta', 'state_dict', ...}`` files (mmseg 0.x/1.x, fastunet) and bare state_dicts,
    keys possibly prefixed ``module.``. With ``strict`` (default) every key and shape must match,
    else a ValueError lists the missing, unexpected and mis-shaped keys. With ``strict=False`` the
    matching tensors load and the rest is reported in a warning.
    """
    ckpt = read_checkpoint(path, map_location)
    state = extract_state_dict(ckpt)
    target = _unwrap(model)
    model_state = target.state_dict()
    missing, unexpected, shapes = _mismatch(model_state, state)
    if missing or unexpected or shapes:
        parts = [f"{len(l)} {what} ({_summary(l)})" for what, l in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("shape mismatches", shapes)) if l]
        msg = (f"checkpoint {os.fspath(path)} does not match the model: {'; '.join(parts)}")
        if strict:
            raise ValueError(msg + ". Is it for another config (head, base_channels)? Build the "
                             "model from the config it was trained with, or pass strict=False")
        warnings.warn(msg + "; loaded the matching tensors only", stacklevel=2)
        bad = set(unexpected) | {s.split(" ", 1)[0] for s in shapes}
        state = {k: v for k, v in state.items() if k not in bad}
    target.load_state_dict(state, strict=strict)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) and "state_dict" in ckpt else None
    return meta if isinstance(meta, dict) else {}


def save_checkpoint(path, model, meta=None, **extra):
    """Write ``{'meta', 'state_dict', **extra}`` atomically (mmseg's layout; loads in mmseg too).

    ``model`` is a module (a DataParallel/DDP wrapper is unwrapped) or a state_dict. The file is
    written to a temporary file in the same folder, fsynced, then renamed over ``path``, so a crash
    never leaves a truncated checkpoint.
    """
    path = os.fspath(path)
    state = model if isinstance(model, dict) else _unwrap(model).state_dict()
    state = {k: v.detach().cpu() for k, v in state.items()}
    from .. import __version__
    meta = dict(meta or {})
    meta.setdefault("fastunet_version", __version__)
    meta.setdefault("time", time.strftime("%Y%m%d_%H%M%S"))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # the writer's pid in the name: a file left by a killed writer can be told from a live one
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"meta": meta, "state_dict": state, **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path

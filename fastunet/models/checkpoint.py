"""Checkpoints: load fastunet and mmseg ``.pth`` files safely; save atomically in mmseg's layout.

Files are checked before anything is unpickled (:mod:`fastunet.models.checkpoint_scan`): only
an allowlist of globals may appear (tensors and storages, numpy arrays, scalars and dtypes, plain
containers; mmengine's ``HistoryBuffer``, the ``getattr`` calls its state pickles and an
``argparse.Namespace`` of training arguments as inert data), no pickled call may call the result
of another, numpy may not be asked for arrays larger than the file, zip members may not be
compressed and storages may not declare more bytes than the file holds. A file that breaks a
rule is refused with an :class:`UnsafeCheckpointError` (a RuntimeError) that names what it found;
nothing in it was executed. The rest is read with ``torch.load(weights_only=True)``, the inert
classes as :class:`OpaqueObject` s that keep their pickled arguments and state but run nothing.
Weights themselves must be tensors: a state_dict that holds anything else is refused with a
ValueError.

fastunet writes only tensors and plain Python values (dicts, lists, tuples, strings, numbers,
None; :func:`save_checkpoint` refuses anything else), so its files also load with plain
``torch.load(path, weights_only=True)`` in other tools. A checkpoint carries the config it was
trained with (:func:`checkpoint_config`): fastunet's in ``meta['config']`` as a dict, mmseg's as
the text of its Python config (``meta['config']`` in 0.x, ``meta['cfg']`` in 1.x), read like an
mmseg ``.py`` config file, never executed.
"""
import collections
import copy
import os
import tempfile
import time
import warnings
import zipfile

import torch
import torch.nn as nn

from .checkpoint_scan import (INERT, CheckpointRefused, numpy_dtype_classes, scan_checkpoint,
                              summary)

__all__ = ["load_checkpoint", "save_checkpoint", "read_checkpoint", "extract_state_dict",
           "load_state", "checkpoint_config", "OpaqueObject", "UnsafeCheckpointError"]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds something a weights file never needs (a call that could run code, a
    compressed or oversized payload); it was not loaded, and nothing in it was executed."""


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
    out.update(numpy_dtype_classes())
    return out


def _opaque_class(name):
    # a distinct subclass per name: torch's allowlist maps one object to one name
    return type("OpaqueObject", (OpaqueObject,), {"__module__": __name__, "_pickled_name": name})


def _safe_globals(names):
    """What torch.load may rebuild: all numpy pieces (a dtype instance is checked by its class,
    which the pickle never names, so it cannot be discovered from the file) and an inert
    stand-in for each inert name the file uses."""
    out = [(obj, name) for name, obj in _numpy_globals().items()]
    return out + [(_opaque_class(name), name) for name in sorted(names or ()) if name in INERT]


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
    """The checkpoint file's object, checked first and then read with ``weights_only=True``
    (never runs pickled code; see the module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a .pth file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        names = scan_checkpoint(path)
    except CheckpointRefused as e:
        raise UnsafeCheckpointError(
            f"refusing checkpoint {path}: {e}; nothing was executed. If you trust its source, "
            f"re-save only its weights: torch.save({{'state_dict': torch.load(path, "
            f"weights_only=False)['state_dict']}}, new_path)") from None
    except OSError as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    with torch.serialization.safe_globals(_safe_globals(names)):
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            if not zipfile.is_zipfile(path) and "Unsupported global" in str(e):
                raise RuntimeError(f"{path}: a legacy-format checkpoint holding objects that "
                                   f"cannot be read safely; re-save its state_dict with a recent "
                                   f"torch (torch.save(ckpt['state_dict'], new_path))") from e
            if isinstance(e, (PermissionError, IsADirectoryError)):
                raise RuntimeError(f"cannot read checkpoint {path}: {e.strerror}") from e
            hint = ("" if zipfile.is_zipfile(path) or os.path.getsize(path) > 0 else
                    " (the file is empty)")
            raise RuntimeError(f"cannot read checkpoint {path}: not a readable PyTorch "
                               f"checkpoint{hint}; is it truncated or corrupt? "
                               f"({_reason(e)})") from e
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
                         f"({summary(bad)}: {', '.join(kinds)}); pickled objects are never "
                         f"executed, and weights must be tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP/DP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _unwrap(model):
    return model.module if isinstance(model, (nn.DataParallel,
                                              nn.parallel.DistributedDataParallel)) else model


def _mismatch(model_state, state):
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
              for k in model_state if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(model_state[k].shape)]
    return missing, unexpected, shapes


def mismatch_summary(model, state):
    """How a state_dict differs from ``model``'s (missing, unexpected and mis-shaped keys) in one
    line; "" when every key and shape matches."""
    missing, unexpected, shapes = _mismatch(_unwrap(model).state_dict(), state)
    return "; ".join(f"{len(l)} {what} ({summary(l)})" for what, l in
                     (("missing keys", missing), ("unexpected keys", unexpected),
                      ("shape mismatches", shapes)) if l)


def load_checkpoint(model, path, map_location="cpu", strict=True):
    """Load a fastunet or mmseg checkpoint into ``model``; returns the checkpoint's ``meta``.

    Accepts ``{'meta', 'state_dict', ...}`` files (mmseg 0.x/1.x, fastunet) and bare state_dicts,
    keys possibly prefixed ``module.``. With ``strict`` (default) every key and shape must match,
    else a ValueError lists the missing, unexpected and mis-shaped keys. With ``strict=False`` the
    matching tensors load and the rest is reported in a warning.
    """
    return load_state(model, read_checkpoint(path, map_location), path, strict)


def load_state(model, ckpt, path="checkpoint", strict=True):
    """:func:`load_checkpoint` of a checkpoint already read (:func:`read_checkpoint`), e.g. to
    take its config first (:func:`checkpoint_config`); ``path`` names it in messages. Returns
    its ``meta``. Weights stored in another floating-point type (fp16) are converted to the
    model's."""
    state = extract_state_dict(ckpt)
    target = _unwrap(model)
    model_state = target.state_dict()
    missing, unexpected, shapes = _mismatch(model_state, state)
    if missing or unexpected or shapes:
        msg = (f"checkpoint {os.fspath(path)} does not match the model: "
               f"{mismatch_summary(target, state)}")
        if strict:
            raise ValueError(msg + ". Is it for another config (head, base_channels)? Build the "
                             "model from the config it was trained with, or pass strict=False")
        warnings.warn(msg + "; loaded the matching tensors only", stacklevel=3)
        bad = set(unexpected) | {s.split(" ", 1)[0] for s in shapes}
        state = {k: v for k, v in state.items() if k not in bad}
    target.load_state_dict(state, strict=strict)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) and "state_dict" in ckpt else None
    return meta if isinstance(meta, dict) else {}


# where a config may be stored in a checkpoint's meta: fastunet's dict, mmseg 0.x's and 1.x's text
_CONFIG_KEYS = ("config", "cfg")
NO_CONFIG_HINT = "name the config it was trained with (--config NAME or FILE; config= in Python)"


def checkpoint_config(ckpt, path="checkpoint"):
    """The config a checkpoint (as :func:`read_checkpoint` returns it) was trained with, a fresh
    dict: fastunet's ``meta['config']`` (a dict, or a config's name), or the config text of an mmseg checkpoint (0.x:
    ``meta['config']``, 1.x: ``meta['cfg']``) read as an mmseg ``.py`` config (parsed, never
    executed; named after the checkpoint file). A ValueError of one line when there is none or
    it cannot be read, saying to name the config."""
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    path = os.fspath(path)
    found = [(k, meta[k]) for k in _CONFIG_KEYS if isinstance(meta, dict) and k in meta]
    for key, value in found:
        if isinstance(value, dict) and isinstance(value.get("model"), dict):
            cfg = copy.deepcopy(value)
            cfg.setdefault("name", meta.get("config_name") or _stem(path))
            return cfg
        if isinstance(value, str) and "\n" not in value:  # a config's name
            from .configs import get_config

            try:
                return get_config(value)
            except KeyError:
                continue
        if isinstance(value, str) and "model" in value:
            return _mmseg_config_text(value, path, key)
    what = (f"its meta[{found[0][0]!r}] is not a config" if found else
            "it holds no config (only fastunet's and mmseg's training checkpoints do)")
    raise ValueError(f"checkpoint {path}: {what}; {NO_CONFIG_HINT}")


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0] or "checkpoint"


def _mmseg_config_text(text, path, key):
    """The config of an mmseg checkpoint's config text (mmengine's ``pretty_text``: one merged
    Python file), through the mmseg ``.py`` reader, which works on files: the text goes to a
    temporary file named after the checkpoint, removed at once."""
    from .config_files import ConfigFileError, load_config_file

    with tempfile.TemporaryDirectory(prefix="fastunet-cfg-") as folder:
        tmp = os.path.join(folder, _stem(path) + ".py")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            return load_config_file(tmp)
        except ConfigFileError as e:
            reason = str(e).replace(tmp, f"meta[{key!r}]")
            raise ValueError(f"checkpoint {path}: its mmseg config text cannot be read without "
                             f"running it ({reason}); {NO_CONFIG_HINT}") from None


# what torch.load(weights_only=True) rebuilds besides tensors and containers (by exact type: a
# subclass, an IntEnum say, would be pickled by its class)
_PLAIN_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device,
                torch.Size)


def _plain(value, where):
    """``value`` with numpy scalars and arrays as Python numbers and tensors; a TypeError naming
    ``where`` for anything that ``torch.load(weights_only=True)`` would not read."""
    if torch.is_tensor(value) or type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, dict):
        out = {_plain(k, f"{where} key {k!r}"): _plain(v, f"{where}[{k!r}]")
               for k, v in value.items()}
        return collections.OrderedDict(out) if isinstance(value, collections.OrderedDict) else out
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(value.copy())
    raise TypeError(f"cannot save {where}: a {type(value).__module__}.{type(value).__name__} "
                    f"(checkpoints hold tensors and plain Python values only, so that "
                    f"torch.load(weights_only=True) reads them)")


def save_checkpoint(path, model, meta=None, **extra):
    """Write ``{'meta', 'state_dict', **extra}`` atomically (mmseg's layout; loads in mmseg too).

    ``model`` is a module (a DataParallel/DDP wrapper is unwrapped) or a state_dict. ``meta``
    and ``extra`` may hold tensors and plain Python values (numpy scalars and arrays are stored as
    numbers and tensors; anything else is a TypeError), so the file loads with plain
    ``torch.load(weights_only=True)``. The file is written with :func:`fastunet.atomic.atomic_write` (temporary file beside it, fsync, rename),
    so a crash or a full disk never leaves a truncated checkpoint; a full disk raises
    :class:`fastunet.atomic.DiskFullError` naming ``path``.
    """
    from ..atomic import atomic_write

    path = os.fspath(path)
    state = model if isinstance(model, dict) else _unwrap(model).state_dict()
    state = {k: v.detach().cpu() for k, v in state.items()}
    from .. import __version__
    meta = dict(meta or {})
    meta.setdefault("fastunet_version", __version__)
    meta.setdefault("time", time.strftime("%Y%m%d_%H%M%S"))
    ckpt = _plain({"meta": meta, "state_dict": state, **extra}, "checkpoint")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        torch.save(ckpt, f)
    return path

"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is mmseg's layout (``{'meta', 'state_dict', ...}``, loadable by
``fastunet.load_checkpoint`` and by mmseg) plus the training state:

- ``meta``: ``config`` (the full config dict), ``config_name``, ``iteration`` (updates done),
  ``metrics`` (the last evaluation), ``best`` (best vessel Dice and its iteration), ``seed``,
  ``world_size``, ``total_batch_size``;
- ``optimizer`` (SGD momentum buffers), ``scaler`` (fp16 GradScaler, when used);
- ``rng``: per rank, the python, numpy, torch (CPU and CUDA) generator states and the DataLoader
  generator's, as tensors and plain Python values (see :func:`rng_state`).

Everything in a checkpoint is a tensor or a plain Python value (dict, list, tuple, str, number,
None), so other tools read it with plain ``torch.load(path, weights_only=True)``.

The data order needs no state: samples are a function of (seed, epoch, index) and the sampler
restarts at ``iteration x total batch``. The learning rate is a function of the iteration.

Files in the work dir: ``iter_<N>.pth`` every checkpoint interval, ``latest.pth`` (a copy of
the newest one: a file of its own, so damage to one never reaches the other),
``best_vessel_dice_iter_<N>.pth`` (a copy; only the best is kept). All are written atomically
(:mod:`fastunet.atomic`).

A resumed run first checks the whole state it reads (:func:`check_resumable`: meta's types and
ranges, the optimizer's momentum buffers against the model's parameters, the GradScaler's state),
so a damaged or crafted file is refused in one line before any step runs.
"""
import glob
import math
import os
import random
import re

import numpy as np
import torch

from ..atomic import atomic_copy, remove_stale_temp_files  # noqa: F401  (the work dir's too)
from ..models.checkpoint import (UnsafeCheckpointError, extract_state_dict, mismatch_summary,
                                 read_checkpoint, save_checkpoint)

__all__ = ["rng_state", "set_rng_state", "save_training_checkpoint", "latest_checkpoint",
           "load_training_checkpoint", "check_resumable", "remove_stale_temp_files",
           "BEST_PREFIX"]

BEST_PREFIX = "best_vessel_dice_iter_"


def rng_state(loader_generator=None):
    """The global generators' states (python, numpy, torch CPU, torch CUDA) and the loader's,
    as tensors and plain values only (``torch.load(weights_only=True)`` reads them): python's
    ``random.getstate()`` tuple as it is, numpy's MT19937 state as the dict
    ``np.random.get_state(legacy=False)`` gives with its key as an int64 tensor, torch's as
    uint8 tensors."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                            "pos": int(numpy_state["state"]["pos"])}
    numpy_state["has_gauss"] = int(numpy_state["has_gauss"])
    numpy_state["gauss"] = float(numpy_state["gauss"])
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state, loader_generator=None):
    """Restore what :func:`rng_state` captured (CUDA states only when the GPU count matches).
    Also takes the states of older checkpoints, which held numpy's legacy state tuple."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_as_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"].cpu())


def _as_python_state(state):
    # a checkpoint round trip may turn the inner tuple into a list; random.setstate wants tuples
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _as_numpy_state(state):
    """numpy's state for ``np.random.set_state``: the stored dict with its key back as uint32,
    or an older checkpoint's legacy tuple ('MT19937', key array, pos, has_gauss, gauss)."""
    if not isinstance(state, dict):
        return state
    key = state["state"]["key"]
    key = key.numpy() if torch.is_tensor(key) else np.asarray(key)
    if key.shape != (624,) or key.min() < 0 or key.max() > 0xFFFFFFFF:
        raise ValueError(f"numpy's MT19937 key has shape {tuple(key.shape)} or values outside "
                         f"uint32")
    return dict(state, state={"key": key.astype(np.uint32), "pos": int(state["state"]["pos"])})


def save_training_checkpoint(work_dir, model, optimizer, iteration, meta, rng, scaler=None,
                             best=False):
    """Write ``iter_<iteration>.pth``, point ``latest.pth`` at it, and (``best``) replace the best
    checkpoint. Returns the path of ``iter_<iteration>.pth``."""
    path = os.path.join(work_dir, f"iter_{iteration}.pth")
    extra = {"optimizer": optimizer.state_dict(), "rng": rng}
    if scaler is not None and scaler.is_enabled():
        extra["scaler"] = scaler.state_dict()
    save_checkpoint(path, model, dict(meta, iteration=iteration), **extra)
    atomic_copy(path, os.path.join(work_dir, "latest.pth"))
    if best:
        old = glob.glob(os.path.join(work_dir, BEST_PREFIX + "*.pth"))
        best_path = os.path.join(work_dir, f"{BEST_PREFIX}{iteration}.pth")
        atomic_copy(path, best_path)
        for p in old:
            if os.path.abspath(p) != os.path.abspath(best_path):
                os.remove(p)
    return path


def _iteration_files(work_dir):
    """[(N, path)] of the ``iter_<N>.pth`` files in work_dir, newest first."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(os.fspath(work_dir)), "iter_*.pth")):
        m = re.fullmatch(r"iter_(\d+)\.pth", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest_checkpoint(work_dir):
    """``latest.pth`` in work_dir, else the ``iter_<N>.pth`` with the largest N, else None."""
    latest = os.path.join(work_dir, "latest.pth")
    if os.path.isfile(latest):
        return latest
    found = _iteration_files(work_dir)
    return found[0][1] if found else None


def _intact_neighbour(path):
    """The newest ``iter_<N>.pth`` beside ``path`` (not ``path`` itself) that reads as a training
    checkpoint, or None."""
    for _, other in _iteration_files(os.path.dirname(os.path.abspath(path)))[:3]:
        if os.path.abspath(other) == os.path.abspath(path):
            continue
        try:
            ckpt = read_checkpoint(other)
        except Exception:  # damaged too: try an older one
            continue
        if isinstance(ckpt, dict) and "iteration" in (ckpt.get("meta") or {}):
            return other
    return None


def load_training_checkpoint(path):
    """The checkpoint dict of a training checkpoint (read safely); checks it can resume a run.
    A file that cannot be read names the intact ``iter_<N>.pth`` beside it, if there is one."""
    try:
        ckpt = read_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except RuntimeError as e:
        intact = _intact_neighbour(path)
        if intact is None:
            raise
        raise RuntimeError(f"{str(e).splitlines()[0]}; {intact} beside it is intact: continue "
                           f"with --resume {intact}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a fastunet training checkpoint (no state_dict)")
    meta = ckpt.get("meta") or {}
    if not isinstance(meta, dict) or "iteration" not in meta or "optimizer" not in ckpt:
        raise ValueError(f"{path} holds weights only (no iteration/optimizer state), so it cannot "
                         f"resume a run; start a new run from it with "
                         f"--load-from {path}")
    return ckpt


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta(meta, max_iters):
    it = meta.get("iteration")
    if not _is_int(it) or it < 0:
        raise ValueError(f"meta.iteration is {it!r}, not a number of iterations >= 0")
    if max_iters is not None and it > max_iters:
        raise ValueError(f"meta.iteration is {it}, beyond this run's {max_iters} iterations "
                         f"(raise --max-iters to continue it)")
    best = meta.get("best")
    if best is not None and not (isinstance(best, dict) and set(best) <= {"vessel_dice",
                                                                          "iteration"}
                                 and _is_number(best.get("vessel_dice", 0))
                                 and _is_int(best.get("iteration", 0))
                                 and 0 <= best.get("iteration", 0) <= it):
        raise ValueError(f"meta.best is {_short(best)}, not {{'vessel_dice': number, "
                         f"'iteration': 0..{it}}}")
    for key in ("metrics", "config"):  # only carried over into the next checkpoint's meta
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise ValueError(f"meta.{key} is a {type(meta[key]).__name__}, not a dict")


def _short(v):
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _dense(t):
    """Whether a tensor's elements are each stored once (no zero or overlapping strides)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_tensor(where, value, like):
    if not torch.is_tensor(value):
        raise ValueError(f"{where} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{where} has shape {tuple(value.shape)}, its parameter "
                         f"{tuple(like.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{where} has dtype {value.dtype}, not a floating-point type")
    if not _dense(value):
        raise ValueError(f"{where} has strides {value.stride()} that share elements (an "
                         f"expanded tensor cannot be updated in place)")
    if not torch.isfinite(value).all():
        raise ValueError(f"{where} holds NaN or infinite values")


# the SGD hyperparameters a checkpoint may carry, and their valid ranges
_GROUP_RANGES = {"lr": (0, math.inf), "momentum": (0, 1), "dampening": (0, 1),
                 "weight_decay": (0, math.inf)}


# a captured run holds the learning rate in a tensor and may choose fused/foreach differently;
# resuming keeps this run's own (schedule.load_optimizer_state), so the saved ones only need a
# sane type: a number (0-D or one-element tensor) and None/bool
_OWN_KIND_OF_STEP = {"lr": 0.0, "fused": None, "foreach": None}


def _check_optimizer(saved, optimizer):
    current = optimizer.state_dict()
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise ValueError("optimizer is not an optimizer state_dict (state, param_groups)")
    groups = saved["param_groups"]
    if len(groups) != len(current["param_groups"]) or not all(
            isinstance(g, dict) and g.get("params") == c["params"]
            for g, c in zip(groups, current["param_groups"])):
        raise ValueError("optimizer param_groups do not match the model's parameters (another "
                         "model or optimizer?)")
    for i, (g, c) in enumerate(zip(groups, current["param_groups"])):
        for key, value in g.items():
            want = c.get(key)
            if key in _OWN_KIND_OF_STEP:  # kept from this run's optimizer, not the checkpoint's
                want = _OWN_KIND_OF_STEP[key]
                value = value.item() if torch.is_tensor(value) and value.numel() == 1 else value
            lo, hi = _GROUP_RANGES.get(key, (-math.inf, math.inf))
            ok = (key == "params" or (isinstance(want, bool) and isinstance(value, bool))
                  or (want is None and (value is None or isinstance(value, bool)))
                  or (_is_number(want) and _is_number(value) and lo <= value <= hi)
                  or (key not in c and (value is None or isinstance(value, (bool, int, float,
                                                                             str)))))
            if not ok:
                raise ValueError(f"optimizer param_groups[{i}][{key!r}] is {_short(value)}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        if not (_is_int(index) and 0 <= index < len(params)) or not isinstance(entry, dict):
            raise ValueError(f"optimizer state entry {_short(index)} names no parameter")
        for key, value in entry.items():
            where = f"optimizer state[{index}][{key!r}]"
            if key == "momentum_buffer" and value is not None:
                _check_tensor(where, value, params[index])
            elif key != "momentum_buffer" and not (_is_number(value) or torch.is_tensor(value)
                                                   and value.numel() == 1):
                raise ValueError(f"{where} is {_short(value)}")


_SCALER_CHECKS = {"scale": lambda v: v > 0, "growth_factor": lambda v: v > 1,
                  "backoff_factor": lambda v: 0 < v < 1,
                  "growth_interval": lambda v: _is_int(v) and v >= 1,
                  "_growth_tracker": lambda v: _is_int(v) and v >= 0}


def _check_scaler(saved):
    if not isinstance(saved, dict):
        raise ValueError(f"scaler is a {type(saved).__name__}, not a GradScaler state_dict")
    for key, ok in _SCALER_CHECKS.items():
        value = saved.get(key)
        if not (_is_number(value) and ok(value)):
            raise ValueError(f"scaler[{key!r}] is {_short(value)}")


def check_resumable(ckpt, model, optimizer, scaler=None, max_iters=None):
    """ValueError (one line) unless ``ckpt`` (from :func:`load_training_checkpoint`) holds a
    training state this model, optimizer and scaler can continue from: meta's iteration, best
    and metrics of the right types and ranges, finite weights, momentum buffers of each
    parameter's shape as dense finite floating-point tensors, valid SGD and GradScaler settings.
    Nothing is loaded; run it before any step."""
    _check_meta(ckpt["meta"], max_iters)
    state = extract_state_dict(ckpt)
    differs = mismatch_summary(model, state)
    if differs:
        raise ValueError(f"its weights do not match the model: {differs} (a checkpoint of "
                         f"another config?)")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"state_dict[{key!r}] holds NaN or infinite values")
    _check_optimizer(ckpt["optimizer"], optimizer)
    if scaler is not None and scaler.is_enabled() and "scaler" in ckpt:
        _check_scaler(ckpt["scaler"])
    rng = ckpt.get("rng")
    if rng is not None and not (isinstance(rng, list) and all(isinstance(r, dict) for r in rng)):
        raise ValueError(f"rng is {_short(rng)}, not a list of per-process random states")

"""Command-line plumbing shared by ``fastunet.train`` and ``fastunet.test``: configs, errors."""
import os
import sys

from ..data.transforms import LABEL_RESIZE
from ..models.configs import ConfigKeyError, apply_overrides, get_config

__all__ = ["UserError", "load_config", "fail", "default_work_dir", "validate_training_config",
           "check_device", "data_error_message"]


class UserError(Exception):
    """A mistake in the command line or the files it names: printed as one line, exit code 2."""


def load_config(name, cfg_options=None):
    """The named config with ``--cfg-options`` applied; wrong names/keys become UserError."""
    try:
        cfg = get_config(name)
    except (ConfigKeyError, TypeError) as e:
        raise UserError(str(e)) from None
    try:
        apply_overrides(cfg, cfg_options)
    except (ConfigKeyError, ValueError) as e:
        raise UserError(f"--cfg-options: {e}") from None
    return cfg


def default_work_dir(cfg):
    """``work_dirs/<config name>`` (relative to the current folder), as mmseg."""
    return os.path.join("work_dirs", cfg["name"])


def fail(prog, message, code=2):
    """Print ``prog: error: message`` on stderr and return the exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(v, n=None):
    vals = v if isinstance(v, (list, tuple)) else (v,)
    return (n is None or len(vals) in (1, n)) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals)


# key -> (check, what it must be); applied to the config's train and data parts before any work,
# so that a bad --cfg-options value fails in one line instead of deep in a pipeline or optimizer
_TRAIN_CHECKS = {
    "max_iters": (lambda v: _ints(v), "a positive integer"),
    "batch_size": (lambda v: _ints(v), "a positive integer"),
    "lr": (lambda v: _number(v) and v > 0, "a positive number"),
    "momentum": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "min_lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "power": (lambda v: _number(v) and v > 0, "a positive number"),
    "eval_interval": (lambda v: _ints(v), "a positive integer"),
    "checkpoint_interval": (lambda v: _ints(v), "a positive integer"),
}
_DATA_CHECKS = {
    "crop_size": (lambda v: _ints(v, 2), "a positive integer or (h, w) pair"),
    "img_scale": (lambda v: _ints(v, 2), "a positive integer or (h, w) pair"),
    "image_size": (lambda v: _ints(v, 2), "a positive integer or (h, w) pair"),
    "ratio_range": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                    and all(_number(x) and x > 0 for x in v), "two positive numbers (lo, hi)"),
    "cat_max_ratio": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "flip_prob": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "num_train": (lambda v: _ints(v), "a positive integer"),
    "num_val": (lambda v: _ints(v), "a positive integer"),
    "mean": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3
             and all(_number(x) for x in v), "three numbers"),
    "std": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3
            and all(_number(x) and x > 0 for x in v), "three positive numbers"),
    "label_resize": (lambda v: v in LABEL_RESIZE, " or ".join(map(repr, LABEL_RESIZE))),
}


def validate_training_config(cfg):
    """UserError naming the config key when a training or data setting cannot work."""
    for part, checks in (("train", _TRAIN_CHECKS), ("data", _DATA_CHECKS)):
        section = cfg.get(part) or {}
        for key, (ok, what) in checks.items():
            if key in section and section[key] is not None and not ok(section[key]):
                raise UserError(f"config key '{part}.{key}' must be {what}, got "
                                f"{section[key]!r} (see --cfg-options)")


def check_device(spec):
    """UserError for a --device this machine does not have (cuda without CUDA, cuda:7 on a
    one-GPU machine, a misspelt name); torchrun's per-rank choice happens later."""
    from ..runtime import resolve_device

    try:
        resolve_device(spec)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None


def data_error_message(exc):
    """One line for a data error, also when it was raised in a DataLoader worker (whose message
    starts 'Caught ... in DataLoader worker process N' and ends with the original error)."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__

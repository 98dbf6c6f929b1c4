"""Command-line plumbing shared by ``fastunet.train`` and ``fastunet.test``: configs, errors."""
import math
import os
import sys

from .._cli import fail  # noqa: F401  (train and test import the one error printer from here)
from ..data.transforms import LABEL_RESIZE
from ..models.config_files import ConfigFileError
from ..models.configs import ConfigKeyError, apply_overrides, get_config

__all__ = ["UserError", "load_config", "print_config", "fail", "read_checkpoint", "build_model",
           "default_work_dir",
           "validate_training_config", "check_budget", "check_device", "data_error_message"]


class UserError(Exception):
    """A mistake in the command line or the files it names: printed as one line, exit code 2."""


def read_checkpoint(path):
    """The checkpoint file's object (fastunet.models.read_checkpoint); a missing file, a folder, a
    refused or unreadable file becomes a UserError of one line."""
    from ..models.checkpoint import read_checkpoint as read

    try:
        return read(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None


def build_model(cfg):
    """The config's segmentor; a config that cannot build one becomes a UserError."""
    from ..models import build_segmentor

    try:
        return build_segmentor(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot build the model of config {cfg['name']}: {e}") from None


def load_config(name, cfg_options=None):
    """The config of a name or file (YAML/JSON/mmseg .py) with ``--cfg-options`` applied; wrong
    names, unreadable files and wrong keys become UserError."""
    try:
        cfg = get_config(name)
    except (ConfigKeyError, ConfigFileError, TypeError) as e:
        raise UserError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {name}: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    try:
        apply_overrides(cfg, cfg_options)
    except (ConfigKeyError, ValueError) as e:
        raise UserError(f"--cfg-options: {e}") from None
    return cfg


def print_config(prog, name, cfg_options=None):
    """``--print-config``: the config (with ``--cfg-options``) as a YAML file on stdout, or JSON
    when PyYAML is missing (a .yaml file holding it still loads); returns the exit code."""
    from ..models.config_files import config_text

    try:
        cfg = load_config(name, cfg_options)
    except UserError as e:
        return fail(prog, e)
    try:
        import yaml  # noqa: F401
        fmt = "yaml"
    except ImportError:
        fmt = "json"
        print(f"{prog}: note: PyYAML is not installed (pip install pyyaml), so the config is "
              f"printed as JSON; it loads from a .json or .yaml file", file=sys.stderr)
    sys.stdout.write(config_text(cfg, fmt))
    return 0


def default_work_dir(cfg):
    """``work_dirs/<config name>`` (relative to the current folder), as mmseg."""
    return os.path.join("work_dirs", cfg["name"])


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
    """UserError naming the config key when a training or data setting cannot work: a value of
    the wrong type or range, a class count the data and loss cannot train, or sizes and image
    counts that cannot fit in memory or would take days to generate (see :func:`check_budget`)."""
    for part, checks in (("train", _TRAIN_CHECKS), ("data", _DATA_CHECKS)):
        section = cfg.get(part) or {}
        for key, (ok, what) in checks.items():
            if key in section and section[key] is not None and not ok(section[key]):
                raise UserError(f"config key '{part}.{key}' must be {what}, got "
                                f"{section[key]!r} (see --cfg-options)")
    model = cfg.get("model") or {}
    for head in ("decode_head", "auxiliary_head"):
        for i, part in enumerate(_as_list(model.get(head))):
            n = part.get("num_classes") if isinstance(part, dict) else None
            if _ints(n) and n < DATA_CLASSES:
                where = f"model.{head}" + (f"[{i}]" if isinstance(model[head], list) else "")
                raise UserError(f"config key '{where}.num_classes' is {n}, but the data has "
                                f"{DATA_CLASSES} classes (background, vessel) and the loss is a "
                                f"softmax cross-entropy over them: it must be at least "
                                f"{DATA_CLASSES}")
    check_budget(cfg)


def _as_list(v):
    return v if isinstance(v, list) else [] if v is None else [v]


# Every dataset here labels two classes (0 background, 1 vessel; 255 ignored).
DATA_CLASSES = 2
# Lower bounds of the memory and time a setting takes, about half of what was measured on the
# CPU (docs/robustness.md), so that only what certainly cannot fit is refused: the synthetic
# generator per image pixel; mmseg's training pipeline per pixel of the rescaled image (uint8
# image and label); a UNet-S5-D16 training step per crop pixel and base channel.
_GENERATOR_BYTES_PER_PIXEL = 64
_GENERATOR_SECONDS_PER_PIXEL = 1e-6
_PIPELINE_BYTES_PER_PIXEL = 4
_STEP_BYTES_PER_PIXEL_CHANNEL = 48
# the synthetic set is generated before training starts; refuse what takes longer than this
MAX_GENERATION_SECONDS = 24 * 3600


def _memory_bytes():
    """The largest memory a run here can use: RAM, or the biggest GPU's."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this OS: do not refuse anything
        return float("inf")
    import torch

    gpus = [torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return max([ram] + gpus)


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _gib(n):
    return f"{n / 2 ** 30:,.0f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:,.0f} MiB"


def check_budget(cfg):
    """UserError when the config's sizes cannot fit in this machine's memory (RAM or its largest
    GPU) or the synthetic set would take more than a day to generate, with the estimate."""
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    memory = _memory_bytes()
    batch = int((cfg.get("train") or {}).get("batch_size") or 1)
    per_process = max(1, batch // max(1, int(os.environ.get("WORLD_SIZE", 1))))
    width = (model.get("backbone") or {}).get("base_channels") or 64
    ratio = max(_pair(data.get("ratio_range") or (1, 1)))
    h, w = _pair(data.get("img_scale") or (1, 1))
    needs = [("data.crop_size", "a training step on",
              per_process * math.prod(_pair(data.get("crop_size") or 1)) * width
              * _STEP_BYTES_PER_PIXEL_CHANNEL),
             ("data.img_scale", "mmseg's pipeline rescaling images (ratio up to "
              f"{ratio:g}) to", h * w * ratio * ratio * _PIPELINE_BYTES_PER_PIXEL)]
    synthetic = str(data.get("dataset", "")).lower() == "synthetic"
    size = _pair(data.get("image_size") or (584, 565))
    if synthetic:
        needs.append(("data.image_size", "generating one synthetic image of",
                      math.prod(size) * _GENERATOR_BYTES_PER_PIXEL))
    for key, what, need in needs:
        if need > memory:
            raise UserError(f"config key '{key}' = {_short(data.get(key.split('.')[1]))}: "
                            f"{what} it needs at least {_gib(need)} of memory, more than this "
                            f"machine has ({_gib(memory)})")
    if synthetic:
        seconds = math.prod(size) * _GENERATOR_SECONDS_PER_PIXEL
        most = max(1, int(MAX_GENERATION_SECONDS / seconds))
        for key in ("num_train", "num_val"):
            n = data.get(key) or 0
            if n > most:
                raise UserError(
                    f"config key 'data.{key}' = {n}: the synthetic images are generated before "
                    f"training, at least {_duration(n * seconds)} for {n} images of "
                    f"{size[0]}x{size[1]}; use at most {most} (a day's generation)")


def _short(v):
    text = repr(tuple(v) if isinstance(v, list) else v)
    return text if len(text) <= 40 else text[:37] + "..."


def _duration(seconds):
    for unit, n in (("years", 365 * 86400), ("days", 86400), ("hours", 3600)):
        if seconds >= n:
            return f"{seconds / n:,.1f} {unit}"
    return f"{seconds:,.0f} s"


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

"""fastunet: the fastest faithful U-Net (mmseg UNet-S5-D16) for biomedical segmentation.

Public names load lazily, so ``import fastunet`` stays cheap and the CLIs start fast.
"""
import importlib
import os
import sys

if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    # How long an idle OpenMP thread spins before it sleeps. GNU OpenMP's default (300,000 spins)
    # makes 2-thread CPU work several times slower whenever another process shares the cores;
    # sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every small op wake its threads, which
    # slows a narrow model (the synthetic default) even on an idle machine. A short spin keeps
    # the threads awake between the consecutive ops of a step and costs a shared machine little
    # (docs/recipe.md, "Training speed on the CPU"). Set only when fastunet is imported before
    # torch (the CLIs); a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from . import _native  # loads the native extension (torch.ops.fastunet.*) or warns once
from . import ops

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "list_configs": "fastunet.models.configs",
    "get_config": "fastunet.models.configs",
    "build_segmentor": "fastunet.models.segmentor",
    "load_checkpoint": "fastunet.models.checkpoint",
    "fuse": "fastunet.nn.fuse",
    "Predictor": "fastunet.inference.predictor",
    "set_deterministic": "fastunet.runtime",
}
# (fastunet.export is also callable: fastunet.export(model, path, ...))
_SUBMODULES = {"conv_plan", "data", "defaults", "export", "inference", "metrics", "models", "nn",
               "ops", "runtime", "settings"}

__all__ = sorted(["__version__", *_LAZY, *_SUBMODULES])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fastunet.{name}")
    else:
        raise AttributeError(f"module 'fastunet' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__

"""fastunet: the fastest faithful U-Net (mmseg UNet-S5-D16) for biomedical segmentation.

Public names load lazily, so ``import fastunet`` stays cheap and the CLIs start fast.
"""
import importlib
import os
import sys

if "torch" not in sys.modules:
    # Busy-waiting OpenMP threads make 2-thread CPU training 3-20x slower whenever another process
    # shares the cores (measured on a shared 2-core machine); sleeping waits cost ~10-40% on an
    # idle one. Set only when fastunet is imported before torch (the CLIs); a user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

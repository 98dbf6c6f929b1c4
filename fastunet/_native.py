"""Loads the compiled extension ``fastunet._C`` and says once, clearly, when it cannot; hands it
the switches that fastunet/settings.py read from the environment (the library reads none)."""
import warnings

import torch

from . import settings


class FallbackWarning(RuntimeWarning):
    """The native kernels are unavailable; pure-PyTorch reference code runs instead."""


LOADED = False
LOAD_ERROR = None
BUILD_INFO = {}

if settings.current().disable_extension:
    LOAD_ERROR = "disabled by FASTUNET_DISABLE_EXTENSION=1"
else:
    try:
        from . import _C  # registers torch.ops.fastunet.* as a side effect

        BUILD_INFO = dict(_C.build_info())
        LOADED = True
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_ISA_CAP = {"base": 0, "avx2": 1, "avx512": 2, "": 2}


def _push_switches(switches):
    """Hand the switches the native code acts on to the library (before any kernel runs)."""
    if LOADED and hasattr(_C, "_set_switches"):
        _C._set_switches(_ISA_CAP[switches.cpu_isa], bool(switches.cudnn_fused_conv))


if LOADED:
    _push_switches(settings.current())
    settings.on_change(_push_switches)
    built = BUILD_INFO.get("torch_version", "")
    if built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        warnings.warn(f"fastunet: the native extension was built against torch {built} but torch "
                      f"{torch.__version__} is running; rebuild it (pip install --no-build-isolation "
                      f"-e .) if anything misbehaves", FallbackWarning, stacklevel=2)
else:
    warnings.warn(f"fastunet: native extension not loaded ({LOAD_ERROR}); using the pure-PyTorch "
                  f"reference implementations, which are correct but slower. Build it with "
                  f"`pip install --no-build-isolation -e .`", FallbackWarning, stacklevel=2)


def has_cuda_kernels():
    """True when the loaded extension was compiled with its CUDA kernels."""
    return LOADED and bool(BUILD_INFO.get("cuda", False))


def use_native(tensor):
    """Whether the native op can take this tensor (its device has compiled kernels)."""
    if not LOADED:
        return False
    kind = tensor.device.type
    return kind in ("cpu", "meta") or (kind == "cuda" and has_cuda_kernels())

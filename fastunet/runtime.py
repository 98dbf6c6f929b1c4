"""How fastunet runs on this machine: device selection and the deterministic mode.

    device = fastunet.runtime.resolve_device("cuda:1")   # ValueError if there is no such GPU
    restore = fastunet.set_deterministic(True)           # repeatable results run to run
    ...
    restore()                                            # the previous settings back

Deterministic mode (``--deterministic`` on train / test / predict) sets
``torch.use_deterministic_algorithms(True)``, cuDNN deterministic algorithms with autotuning off
(``cudnn.benchmark = False``) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (deterministic cuBLAS; it
takes effect if set before CUDA's first cuBLAS call, so the CLIs set it at start-up). While it
is on, the inference engine plans window batches and bands from fixed sizes instead of the
memory that happens to be free, so the same image is always cut and summed the same way. Where
CUDA is available, the backward kernels PyTorch only has with atomic adds (bilinear upsampling,
adaptive average pooling) are replaced by deterministic ones (``fastunet.training.determinism``).
This function is the one way into deterministic mode: the CLIs' ``--deterministic`` calls it.

fastunet's own kernels are deterministic with or without it: the tile ops are gathers (no
atomics) and the Conv-BN-ReLU statistics merge fixed partial sums in a fixed order (CPU chunks
depend only on the tensor size, not on the thread count; CUDA splits depend on the GPU's SM
count, so results are repeatable on one GPU model). CPU results are repeatable run to run for a
fixed number of threads; they may differ in the last bits between machines or thread counts.
"""
import os

import torch

__all__ = ["resolve_device", "set_deterministic", "is_deterministic", "pid_alive"]

_STATE = {"on": False}


def resolve_device(spec=None):
    """A ``torch.device`` for 'cpu', 'cuda', 'cuda:N' (or None: CUDA if available, else CPU);
    ValueError with a one-line explanation when the device does not exist here."""
    if spec is None or spec == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(spec, torch.device):
        device = spec
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA GPU")
            raise ValueError(f"device {spec!r} asked for, but {why}; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r} does not exist: {count} CUDA GPU(s) visible "
                             f"(cuda:0 .. cuda:{count - 1})")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"device {spec!r} is not supported here: use cpu, cuda or cuda:N")


def is_deterministic():
    """Whether :func:`set_deterministic` turned deterministic mode on."""
    return _STATE["on"]


def set_deterministic(enabled=True):
    """Turn deterministic mode on (or off) for the whole process; returns a function that
    restores the previous settings. See the module docstring for what it sets and costs."""
    from .training import determinism

    fill = getattr(torch.utils, "deterministic", None)
    kernels = torch.cuda.is_available() and determinism._LIBRARY is None
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, _STATE["on"],
              fill.fill_uninitialized_memory if fill is not None else None)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if fill is not None:
            # torch then fills every torch.empty with NaN, a debugging aid that costs a large
            # share of CPU inference time; no fastunet result reads such memory
            fill.fill_uninitialized_memory = False
        if kernels:
            determinism.register_cuda_kernels()
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    _STATE["on"] = bool(enabled)

    def restore():
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:4]
        _STATE["on"] = before[4]
        if fill is not None:
            fill.fill_uninitialized_memory = before[5]
        if kernels and enabled:
            determinism.unregister_cuda_kernels()
    return restore


def pid_alive(pid):
    """Whether a process with this id runs on this machine (True when it cannot be told):
    temporary files named after a dead writer's pid are leftovers of a killed run."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process; or cannot tell
        return True
    return True

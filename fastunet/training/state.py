"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is mmseg's layout (``{'meta', 'state_dict', ...}``, loadable by
``fastunet.load_checkpoint`` and by mmseg) plus the training state:

- ``meta``: ``config`` (the full config dict), ``config_name``, ``iteration`` (updates done),
  ``metrics`` (the last evaluation), ``best`` (best vessel Dice and its iteration), ``seed``,
  ``world_size``, ``total_batch_size``;
- ``optimizer`` (SGD momentum buffers), ``scaler`` (fp16 GradScaler, when used);
- ``rng``: per rank, the python, numpy, torch (CPU and CUDA) generator states and the DataLoader
  generator's.

The data order needs no state: samples are a function of (seed, epoch, index) and the sampler
restarts at ``iteration x total batch``. The learning rate is a function of the iteration.

Files in the work dir: ``iter_<N>.pth`` every checkpoint interval, ``latest.pth`` (a hard link
to the newest one, or a copy where links are not possible), ``best_vessel_dice_iter_<N>.pth``
(only the best is kept).
"""
import glob
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from ..models.checkpoint import read_checkpoint, save_checkpoint

__all__ = ["rng_state", "set_rng_state", "save_training_checkpoint", "latest_checkpoint",
           "link_or_copy", "load_training_checkpoint", "remove_stale_temp_files", "BEST_PREFIX"]

BEST_PREFIX = "best_vessel_dice_iter_"


def rng_state(loader_generator=None):
    """The global generators' states (python, numpy, torch CPU, torch CUDA) and the loader's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state, loader_generator=None):
    """Restore what :func:`rng_state` captured (CUDA states only when the GPU count matches)."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
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


def link_or_copy(src, dst):
    """Make ``dst`` the same file as ``src``, atomically (hard link, else copy), replacing it."""
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".pth", dir=folder)
    os.close(fd)
    os.remove(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def save_training_checkpoint(work_dir, model, optimizer, iteration, meta, rng, scaler=None,
                             best=False):
    """Write ``iter_<iteration>.pth``, point ``latest.pth`` at it, and (``best``) replace the best
    checkpoint. Returns the path of ``iter_<iteration>.pth``."""
    path = os.path.join(work_dir, f"iter_{iteration}.pth")
    extra = {"optimizer": optimizer.state_dict(), "rng": rng}
    if scaler is not None and scaler.is_enabled():
        extra["scaler"] = scaler.state_dict()
    save_checkpoint(path, model, dict(meta, iteration=iteration), **extra)
    link_or_copy(path, os.path.join(work_dir, "latest.pth"))
    if best:
        old = glob.glob(os.path.join(work_dir, BEST_PREFIX + "*.pth"))
        best_path = os.path.join(work_dir, f"{BEST_PREFIX}{iteration}.pth")
        link_or_copy(path, best_path)
        for p in old:
            if os.path.abspath(p) != os.path.abspath(best_path):
                os.remove(p)
    return path


def latest_checkpoint(work_dir):
    """``latest.pth`` in work_dir, else the ``iter_<N>.pth`` with the largest N, else None."""
    latest = os.path.join(work_dir, "latest.pth")
    if os.path.isfile(latest):
        return latest
    found = []
    for p in glob.glob(os.path.join(work_dir, "iter_*.pth")):
        m = re.fullmatch(r"iter_(\d+)\.pth", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def load_training_checkpoint(path):
    """The checkpoint dict of a training checkpoint (read safely); checks it can resume a run."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a fastunet training checkpoint (no state_dict)")
    meta = ckpt.get("meta") or {}
    if "iteration" not in meta or "optimizer" not in ckpt:
        raise ValueError(f"{path} holds weights only (no iteration/optimizer state), so it cannot "
                         f"resume a run; start a new run from it with "
                         f"--load-from {path}")
    return ckpt


def remove_stale_temp_files(work_dir):
    """Delete the temporary files a run killed while writing left in ``work_dir``: checkpoints
    (``.tmp-<pid>-*.pth``) and pictures (``.NAME.<pid>.<hex>.tmp``, curves and overlays); those
    of running processes stay. Returns their paths."""
    from ..data.io import remove_stale_temp_files as remove_png_temps
    from ..runtime import remove_files_of_dead_writers

    return remove_png_temps(work_dir) + remove_files_of_dead_writers(
        work_dir, r"\.tmp-(\d+)-.*\.pth", recursive=False)

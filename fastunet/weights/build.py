"""Write the shipped weights from a training checkpoint, with their record.

    python -m fastunet.train                       # the synthetic config: work_dirs/synthetic/
    python -m fastunet.weights.build work_dirs/synthetic/latest.pth --commit <the commit it ran>

writes ``fastunet/weights/synthetic.pt`` (the state_dict in fp16, ``meta`` with the config, the
validation metrics, the iteration and ``fov_diameter``) and ``synthetic.json`` (the record: the
training command, the commit, the config name, the metrics, the file's size and sha256).

``fov_diameter`` is the median field-of-view diameter of the config's training images, measured
by the same detector that measures photos (``fastunet.inference.fov.detect_fov``), so that a
photo rescaled to it shows vessels at the widths the model learned; it is measured for the
built-in synthetic data set, and must be given (``--fov-diameter``) for others.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch

from .._cli import ArgumentParser, fail
from ..atomic import atomic_write
from . import PRETRAINED, RECORD

__all__ = ["build_weights", "training_fov_diameter", "sha256"]

PROG = "python -m fastunet.weights.build"
TRAIN_COMMAND = "python -m fastunet.train"
METRICS = ("vessel_dice", "mDice", "mIoU", "aAcc")


def sha256(path):
    """The hex sha256 of a (weights-sized: a few MB) file."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def training_fov_diameter(cfg):
    """The median FOV diameter (pixels) of a synthetic config's training images."""
    from ..data.synthetic import generate
    from ..inference.fov import detect_fov

    data = cfg["data"]
    if data.get("dataset") != "synthetic":
        raise ValueError(f"the training images' field of view is measured for the synthetic data "
                         f"set only; give --fov-diameter for {data.get('dataset')!r}")
    size = tuple(data.get("image_size") or data["img_scale"])
    found = [detect_fov(generate(data.get("synthetic_seed", 0), "training", i, size)["img"])
             for i in range(data.get("num_train", 20))]
    return round(float(np.median([f.diameter for f in found if f is not None])), 1)


def build_weights(checkpoint, out=PRETRAINED, record=RECORD, commit=None, fov_diameter=None,
                  command=TRAIN_COMMAND):
    """Write the weights file ``out`` and its JSON ``record`` from a training checkpoint;
    returns the record."""
    from ..models.checkpoint import checkpoint_config, extract_state_dict, read_checkpoint
    from ..models.checkpoint import save_checkpoint

    ckpt = read_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, checkpoint)
    meta = ckpt.get("meta") or {}
    metrics = meta.get("metrics") or {}
    missing = [k for k in METRICS if k not in metrics]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} has no validation metrics {missing} (a "
                         f"training checkpoint written after an evaluation has them)")
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in extract_state_dict(ckpt).items()}
    diameter = float(fov_diameter) if fov_diameter else training_fov_diameter(cfg)
    summary = {k: round(float(metrics[k]), 2) for k in METRICS}
    save_checkpoint(out, state, {"config": cfg, "config_name": cfg["name"], "metrics": summary,
                                 "iteration": meta.get("iteration"), "fov_diameter": diameter,
                                 "commit": commit})
    info = {"file": os.path.basename(out), "sha256": sha256(out), "bytes": os.path.getsize(out),
            "dtype": "float16", "command": command, "commit": commit, "config": cfg["name"],
            "iterations": meta.get("iteration"),
            "validation": f"the config's synthetic validation images ({cfg['data'].get('num_val')})",
            "metrics": summary, "fov_diameter": diameter,
            "built_with": f"{PROG} {os.fspath(checkpoint)} --commit {commit}"}
    with atomic_write(record, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def main(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the training run's checkpoint (work_dirs/NAME/latest.pth)")
    p.add_argument("--commit", required=True,
                   help="the fastunet commit the training ran at (recorded with the weights)")
    p.add_argument("--out", default=PRETRAINED, help=f"weights file (default: {PRETRAINED})")
    p.add_argument("--record", default=RECORD, help=f"record JSON (default: {RECORD})")
    p.add_argument("--fov-diameter", type=float,
                   help="the training images' FOV diameter (default: measured, synthetic only)")
    args = p.parse_args(argv)
    try:
        info = build_weights(args.checkpoint, args.out, args.record, args.commit,
                             args.fov_diameter)
    except (OSError, ValueError, RuntimeError) as e:
        return fail(PROG, e)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

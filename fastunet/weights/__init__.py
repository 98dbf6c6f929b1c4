"""Trained weights that ship with fastunet (package data).

``PRETRAINED`` (``synthetic.pt``): the ``synthetic`` config's UNet-S5-D16 + FCN (base_channels
16) trained only on fastunet's built-in synthetic fundus images by the README's training command,
``python -m fastunet.train`` (no arguments), and written by ``python -m fastunet.weights.build``.
``RECORD`` (``synthetic.json``) says how: the command, the fastunet commit, the config, the
metrics on the synthetic validation set and the file's sha256 (docs/pretrained.md has the same).

The weights find the vessels of real colour fundus photographs plausibly, not accurately:
fine-tune them on annotated real images (``python -m fastunet.train --config ... --load-from``
this file) for accuracy. The file is a fastunet checkpoint that loads with plain
``torch.load(path, weights_only=True)``: its ``state_dict`` in fp16 (the model converts it back
on loading) and a ``meta`` with its ``config`` and ``fov_diameter``, the field-of-view diameter
of the training images, which ``fastunet.Predictor`` rescales photos to.

    predictor = fastunet.Predictor.pretrained()
"""
import json
import os

__all__ = ["PRETRAINED", "RECORD", "pretrained_path", "pretrained_record"]

_HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED = os.path.join(_HERE, "synthetic.pt")
RECORD = os.path.join(_HERE, "synthetic.json")


def pretrained_path():
    """The path of the shipped weights; FileNotFoundError (one line) when this installation lacks
    them (a build without its package data)."""
    if not os.path.isfile(PRETRAINED):
        raise FileNotFoundError(f"fastunet's pretrained weights are not installed ({PRETRAINED} "
                                f"is missing: reinstall fastunet, or give a --checkpoint)")
    return PRETRAINED


def pretrained_record():
    """The shipped weights' record (a dict: command, commit, config, metrics, sha256, ...)."""
    with open(RECORD, encoding="utf-8") as f:
        return json.load(f)

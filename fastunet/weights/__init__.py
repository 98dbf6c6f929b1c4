"""Trained weights that ship with fastunet (package data).

``PRETRAINED``: a UNet-S5-D16 + FCN (a quarter of the width, base_channels 16) trained only on
fastunet's built-in synthetic fundus images, by ``python tools/train_pretrained.py`` (the
command, its time and the validation metrics are in docs/pretrained.md). It finds the vessels of
real colour fundus photographs plausibly, not accurately: fine-tune it on annotated real images
(``python -m fastunet.train --config ... --load-from`` this file) for accuracy. The file is a
fastunet checkpoint: ``meta`` holds its ``config``, the metrics and ``fov_diameter`` (the
training images' field-of-view diameter, which ``fastunet.Predictor`` rescales photos to), and it
loads with plain ``torch.load(path, weights_only=True)``.

    predictor = fastunet.Predictor.pretrained()
"""
import os

__all__ = ["PRETRAINED", "pretrained_path"]

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_pretrained.pth")


def pretrained_path():
    """The path of the shipped weights; FileNotFoundError (one line) when this installation lacks
    them (a source tree whose weights were never generated, or a build without package data)."""
    if not os.path.isfile(PRETRAINED):
        raise FileNotFoundError(f"fastunet's pretrained weights are not installed ({PRETRAINED} "
                                f"is missing); generate them with python tools/train_pretrained.py "
                                f"or give a --checkpoint")
    return PRETRAINED

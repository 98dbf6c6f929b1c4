"""The field of view (FOV) of a fundus photograph, and segmenting a photo at the training scale.

A fundus photograph is a bright disc (the FOV) on a dark border. A model trained on DRIVE-sized
images (FOV about 540 pixels across) sees vessels of the widths it learned only when a photo's
FOV has about that diameter, so :class:`~fastunet.inference.Predictor` can rescale each photo to
the training images' FOV diameter, segment it, and bring the result back to the photo's size.

Detection (:func:`detect_fov`), on the red channel (the brightest in fundus photographs: inside
the FOV it stays well above the border even where green and blue are dark), of a copy strided to
at most ``DETECT_SIDE`` pixels on its long side:

- the threshold is ``lo + THRESHOLD_FRACTION * (hi - lo)``, with ``lo`` and ``hi`` the 1st and
  99th percentiles: a black or grey border, JPEG noise around it and a dim periphery inside the
  FOV stay on their sides of it;
- the FOV must have a border: at least two of the four corner patches are mostly below the
  threshold (a circular FOV leaves its corners dark, also when the camera clips it at the top
  and bottom), and it covers ``MIN_FOV_FRACTION`` to 99% of the image; otherwise there is no FOV
  to measure and the photo is segmented as it is;
- the diameter is the larger of the FOV's width and height, each the 98th percentile of the FOV
  pixel counts of the rows (columns): counts, not extents, so stray bright pixels in the border
  (a camera's text) barely count, and a percentile, so that a few rows do not decide it; the
  larger of the two, so that a FOV clipped at the top and bottom (or the sides) still measures
  its true diameter.

Rescaling (:func:`resize_image`, :func:`resize_logits`): the photo is resized with Pillow's
bilinear filter (antialiased when it shrinks: a smaller photo of the same eye, not a subsampled
one), and the logits come back to the photo's size by bilinear interpolation at pixel centres
(``F.interpolate(..., align_corners=False)``'s geometry), band by band; labels (argmax) and
probabilities (softmax) are taken at full size from them. Both resizes map pixel centres to
pixel centres, so a structure stays where it was (``tests/test_inference_fov.py`` checks that a
thin dark line comes out on the line).
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from .outputs import argmax_classes

__all__ = ["Fov", "FovWarning", "detect_fov", "fov_scale", "resize_image", "resize_logits"]

DETECT_SIDE = 1024
THRESHOLD_FRACTION = 0.1
MIN_FOV_FRACTION = 0.25
# rescale only when the FOV's diameter is off by more than this fraction: closer, resizing would
# only blur the photo
SCALE_TOLERANCE = 0.05
# output rows interpolated at a time when logits go back to the photo's size
BAND_ROWS = 256


class FovWarning(UserWarning):
    """A photo whose field of view could not be measured (segmented at its own scale)."""


class Fov(NamedTuple):
    """A detected field of view: its diameter in pixels of the photo and the threshold used on
    the red channel."""
    diameter: float
    threshold: float


def detect_fov(rgb):
    """The field of view of an HxWx3 uint8 fundus photograph (see the module docstring), or None
    when the photo has no dark border around a FOV to measure."""
    h, w = rgb.shape[:2]
    step = max(1, math.ceil(max(h, w) / DETECT_SIDE))
    red = np.asarray(rgb[::step, ::step, 0], dtype=np.float32)
    lo, hi = np.percentile(red, (1, 99))
    if hi - lo < 16:  # a flat image: no bright disc on a dark border
        return None
    threshold = float(lo + THRESHOLD_FRACTION * (hi - lo))
    mask = red > threshold
    corner = max(2, min(mask.shape) // 20)
    dark_corners = sum(mask[ys, xs].mean() < 0.5 for ys in (slice(0, corner), slice(-corner, None))
                       for xs in (slice(0, corner), slice(-corner, None)))
    if dark_corners < 2 or not MIN_FOV_FRACTION <= mask.mean() <= 0.99:
        return None
    width = np.percentile(mask.sum(1), 98) * step
    height = np.percentile(mask.sum(0), 98) * step
    return Fov(float(min(max(width, height), max(h, w))), threshold)


def fov_scale(rgb, diameter):
    """The factor that brings the photo's FOV to ``diameter`` pixels across: None when no FOV is
    found, 1.0 when it is within SCALE_TOLERANCE of it."""
    fov = detect_fov(rgb)
    if fov is None:
        return None
    scale = diameter / fov.diameter
    return 1.0 if abs(scale - 1) <= SCALE_TOLERANCE else scale


def scaled_size(height, width, scale):
    """(height, width) of an image resized by ``scale``: rounded, at least 1."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(rgb, height, width):
    """An HxWx3 uint8 image resized to height x width with Pillow's bilinear filter (pixel
    centres kept; antialiased when shrinking)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (width, height), Image.BILINEAR))


def _centre_taps(n_in, n_out, device):
    """For each output index along an axis: the two input indices and the second's weight of
    bilinear interpolation at pixel centres (as F.interpolate with align_corners=False)."""
    pos = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * (n_in / n_out) - 0.5
    pos = pos.clamp(0, n_in - 1)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, (pos - i0).float()


def resize_logits(logits, height, width, probs_class=None):
    """Logits (C, h, w) of a resized image -> uint8 labels (height, width) and, with
    ``probs_class``, that class's float32 softmax probability (height, width), interpolated at
    pixel centres band by band (no full-size float copy of all classes)."""
    logits = logits.float()
    ys0, ys1, wy = _centre_taps(logits.shape[1], height, logits.device)
    xs0, xs1, wx = _centre_taps(logits.shape[2], width, logits.device)
    labels = torch.empty((height, width), dtype=torch.uint8, device=logits.device)
    probs = (torch.empty((height, width), dtype=torch.float32, device=logits.device)
             if probs_class is not None else None)
    for r0 in range(0, height, BAND_ROWS):
        rows = slice(r0, min(height, r0 + BAND_ROWS))
        a, b, f = logits[:, ys0[rows]], logits[:, ys1[rows]], wy[rows].view(1, -1, 1)
        band = torch.lerp(a, b, f)  # (C, rows, w)
        band = torch.lerp(band[:, :, xs0], band[:, :, xs1], wx.view(1, 1, -1))  # (C, rows, W)
        labels[rows] = argmax_classes(band[None])[0]
        if probs is not None:
            probs[rows] = torch.softmax(band, 0)[probs_class]
    return labels, probs

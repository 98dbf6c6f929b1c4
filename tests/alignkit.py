"""Pixel-alignment checks for every resize and pad in the pipelines (not a test file).

A label is aligned with its image when, among the shifts of -1..1 pixel in y and x, the label
agrees best with the image's dark pixels at shift (0, 0). ``line_image`` draws an image whose
label is exactly its dark pixels (thin lines down to 1 pixel, thick ones, blobs), so any
half-pixel offset a resize introduces shows up as a better agreement at a non-zero shift.
"""
import numpy as np

SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
DARK, BRIGHT = 40, 220


def line_image(h, w, rng, lines=12, blobs=3):
    """(img HxWx3 uint8, label HxW uint8): dark vessels (label 1) on a bright background."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    label = np.zeros((h, w), bool)
    for _ in range(lines):
        # a straight segment of half-width 0.5..3 px (1 to 6 pixels wide), any direction
        y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.3, 1.0) * max(h, w)
        dy, dx = np.sin(ang), np.cos(ang)
        t = np.clip((yy - y0) * dy + (xx - x0) * dx, -length / 2, length / 2)
        dist = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        label |= dist < rng.choice([0.5, 0.5, 1.0, 1.5, 2.0, 3.0])
    for _ in range(blobs):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 6)
        label |= np.hypot(yy - cy, xx - cx) < r
    img = np.where(label[..., None], DARK, BRIGHT).astype(np.uint8).repeat(3, axis=2)
    return img, label.astype(np.uint8)


def is_dark(gray):
    """The pixels darker than the midpoint of the two levels line_image uses."""
    return np.asarray(gray) < (DARK + BRIGHT) / 2


def shift_scores(label, dark, valid=None):
    """{(dy, dx): pixels where label shifted by (dy, dx) agrees with dark}, over the interior
    (a 1-pixel border left out, so every shift scores the same pixels); valid masks the pixels
    that count (e.g. not padding), at both ends of the comparison."""
    label, dark = np.asarray(label).astype(bool), np.asarray(dark).astype(bool)
    valid = np.ones(label.shape, bool) if valid is None else np.asarray(valid, bool)
    h, w = label.shape
    core, core_ok = dark[1:h - 1, 1:w - 1], valid[1:h - 1, 1:w - 1]
    scores = {}
    for dy, dx in SHIFTS:
        lab = label[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
        ok = valid[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] & core_ok
        scores[(dy, dx)] = int(((lab == core) & ok).sum())
    return scores


def aligned(label, dark, valid=None):
    """Whether the label agrees with the dark pixels strictly best at zero shift."""
    scores = shift_scores(label, dark, valid)
    zero = scores.pop((0, 0))
    return zero > max(scores.values())


def has_structure(label, valid=None, least=20):
    """Enough vessel and background pixels for a shift to show (a crop of background alone
    agrees equally at every shift)."""
    label = np.asarray(label)
    valid = np.ones(label.shape, bool) if valid is None else np.asarray(valid, bool)
    vessel = int(((label == 1) & valid).sum())
    return least <= vessel <= int(valid.sum()) - least

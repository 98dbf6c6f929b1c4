"""Synthetic retinal-vessel images: fastunet's built-in data set (numpy only, deterministic).

Each image is a procedurally generated fundus photograph with an exact vessel mask and a
field-of-view (FOV) mask, DRIVE-like by default (584 x 565):

- geometry: a circular FOV; an optic disc left or right of centre; the fovea about 2.5 disc
  diameters temporal of it; vessel trees grown from the disc as tortuous random walks (arcades
  steered around the fovea, nasal trunks outward), branching with Murray's law
  (r^3 = r1^3 + r2^3) so vessels thin at every branch, from ~8 px wide trunks down to 1 px;
- appearance: reddish fundus colours, uneven illumination (off-centre vignetting and a random
  low-frequency field), choroidal texture and faint unlabelled choroidal vessels, a bright disc,
  a dark macula, dark (haemorrhages, microaneurysms) and bright (exudates) lesions, vessels that
  absorb most in green and least in red with contrast growing with width (thin vessels are faint),
  arterial light reflex, optical blur and sensor noise.

Labels are {0, 1} (1 = vessel: pixel centre within the vessel radius of its centre line), only
inside the FOV, as in DRIVE. Every image depends only on (seed, split, index), so items can be
generated lazily, in any order, in any worker.

``SyntheticVessels`` serves the images as a dataset, either generated on the fly or from a cache
written once in the converted layout (``write_synthetic``) under
``$FASTUNET_CACHE/synthetic/<params-hash>/`` (default ``~/.cache/fastunet``), which the DRIVE
loader also reads. ``green_channel_baseline`` scores the classic thresholding baseline.
"""
import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import torch

__all__ = ["GENERATOR_VERSION", "generate", "SyntheticVessels", "write_synthetic",
           "synthetic_root", "green_channel_baseline", "default_cache_dir"]

GENERATOR_VERSION = 1
_SPLIT_CODE = {"training": 0, "validation": 1}
IMG_SUFFIX, SEG_SUFFIX = ".png", "_manual1.png"  # DRIVE's naming, so the DRIVE loader reads it


# ---------------------------------------------------------------- smooth random fields

def _interp_matrix(n_out, n_in):
    """(n_out, n_in) linear-interpolation matrix from a coarse grid spanning the full axis."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)  # n_in >= 2
    f = pos - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - f
    m[np.arange(n_out), i0 + 1] += f
    return m


def _smooth_field(rng, h, w, cell):
    """Zero-mean, unit-std random field varying on a length scale of `cell` pixels."""
    gh, gw = max(2, int(round(h / cell)) + 2), max(2, int(round(w / cell)) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = _interp_matrix(h, gh) @ grid @ _interp_matrix(w, gw).T
    return (field - field.mean()) / (field.std() + 1e-6)


def _fractal(rng, h, w, cells, gains):
    """Sum of smooth fields over several scales (value noise)."""
    out = np.zeros((h, w), np.float32)
    for cell, gain in zip(cells, gains):
        out += gain * _smooth_field(rng, h, w, cell)
    return out


def _blur(img, sigma):
    """Separable Gaussian blur (reflect padding) of an HxW or HxWxC float array."""
    if sigma <= 0:
        return img
    rad = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (rad, rad)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, wk in enumerate(k):
            sl = [slice(None)] * img.ndim
            sl[axis] = slice(i, i + n)
            acc += wk * p[tuple(sl)]
        out = acc
    return out


# ---------------------------------------------------------------- vessel trees

@dataclasses.dataclass
class _Vessel:
    points: np.ndarray  # (N, 2) x, y centre line, densified
    radii: np.ndarray   # (N,)
    contrast: float     # peak green absorption of this vessel (before width scaling)
    artery: bool


def _angle_diff(a, b):
    return (a - b + math.pi) % (2 * math.pi) - math.pi


def _catmull_rom(p, sub):
    """Densify a polyline (N, 2) with a Catmull-Rom spline, `sub` samples per segment."""
    if len(p) < 2:
        return p.copy()
    ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    t = (np.arange(sub) / sub)[None, :, None]
    p0, p1, p2, p3 = (ext[i:i + len(p) - 1][:, None, :] for i in range(4))
    seg = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                 + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3)
    return np.concatenate([seg.reshape(-1, 2), p[-1:]])


class _TreeGrower:
    """Grows the vessel network of one image (sequential random walks, a few thousand steps)."""

    STEP = 3.0        # px between control points
    R_MIN = 0.5       # px: thinnest vessel is 1 px wide
    MAX_DEPTH = 7

    def __init__(self, rng, geom, scale):
        self.rng, self.g, self.s = rng, geom, scale
        self.vessels = []

    def inside(self, x, y, margin=0.0):
        g = self.g
        return (x - g["cx"]) ** 2 + (y - g["cy"]) ** 2 < (g["R"] + margin) ** 2

    def grow(self, x, y, heading, r, depth, mode, artery, contrast, rot=0):
        rng, g, s = self.rng, self.g, self.s
        pts, rads = [(x, y)], [r]
        length = 0.0
        next_branch = rng.exponential((20 + 16 * r) * s)
        max_len = g["R"] * (rng.uniform(1.3, 1.7) if depth == 0 else rng.uniform(0.4, 1.5))
        tort = rng.uniform(0.05, 0.12) * (1.0 + 0.6 / max(r, 0.5))
        children = []
        fx, fy, faz = g["fx"], g["fy"], g["faz"]
        while True:
            if mode == "arcade":
                ux, uy = x - fx, y - fy
                norm = math.hypot(ux, uy) + 1e-6
                tx, ty = -rot * uy / norm, rot * ux / norm  # tangent around the fovea
                # pulled onto a circle of radius ~2 disc diameters around the fovea
                pull = max(-0.8, min(0.8, (g["arc"] - norm) / g["arc"]))
                tx, ty = tx + (pull + 0.1) * ux / norm, ty + (pull + 0.1) * uy / norm
                target = math.atan2(ty, tx)
                heading += 0.12 * _angle_diff(target, heading)
            elif mode == "radial":
                target = math.atan2(y - g["dy"], x - g["dx"])
                heading += 0.04 * _angle_diff(target, heading)
            heading += rng.normal(0.0, tort)
            x += self.STEP * s * math.cos(heading)
            y += self.STEP * s * math.sin(heading)
            length += self.STEP * s
            r *= 1.0 - 0.0015 * self.STEP
            if (not self.inside(x, y, margin=2 * r) or r < self.R_MIN or length > max_len
                    or (x - fx) ** 2 + (y - fy) ** 2 < faz ** 2):
                break
            pts.append((x, y))
            rads.append(r)
            if length >= next_branch and depth < self.MAX_DEPTH:
                rc = r * rng.uniform(0.45, 0.85)
                if rc >= self.R_MIN:
                    r = max((r ** 3 - rc ** 3) ** (1.0 / 3.0), self.R_MIN)  # Murray's law
                    side = 1 if rng.random() < 0.5 else -1
                    angle = heading + side * rng.uniform(0.55, 1.25)
                    children.append((x, y, angle, rc, depth + 1))
                    heading -= side * rng.uniform(0.05, 0.25)  # the parent veers away a little
                next_branch = length + rng.exponential((20 + 16 * r) * s)
        if len(pts) >= 2:
            # centre-line samples every <= 0.5 px, so the union of discs is a smooth tube
            p = _catmull_rom(np.asarray(pts, np.float64), max(2, math.ceil(self.STEP * s / 0.5)))
            rr = np.interp(np.linspace(0, len(rads) - 1, len(p)), np.arange(len(rads)), rads)
            self.vessels.append(_Vessel(p, rr, contrast, artery))
        for cx, cy, ang, rc, d in children:
            self.grow(cx, cy, ang, rc, d, "free" if mode != "arcade" or d > 1 else "radial",
                      artery, contrast * rng.uniform(0.9, 1.05))


# ---------------------------------------------------------------- rendering

def _splat(vessels, h, w, fov, every=1):
    """Vessel mask (exact: centre within radius) and absorption field (chord profile).

    every: use every n-th centre-line sample (for wide, blurred, unlabelled vessels only).
    """
    mask = np.zeros(h * w, bool)
    absorb = np.zeros(h * w, np.float32)
    reflex = np.zeros(h * w, np.float32)
    if not vessels:
        return mask.reshape(h, w), absorb.reshape(h, w), reflex.reshape(h, w)
    P = np.concatenate([v.points for v in vessels])[::every]
    R = np.concatenate([v.radii for v in vessels])[::every]
    C = np.concatenate([np.full(len(v.radii), v.contrast, np.float32) for v in vessels])[::every]
    A = np.concatenate([np.full(len(v.radii), v.artery) for v in vessels])[::every]
    half = np.ceil(R + 1.0).astype(np.int64)
    for k in np.unique(half):
        sel = half == k
        p, r, c, art = P[sel], R[sel], C[sel], A[sel]
        off = np.arange(-k, k + 1)
        oy, ox = np.meshgrid(off, off, indexing="ij")
        base = np.rint(p).astype(np.int64)
        px = base[:, 0:1] + ox.reshape(1, -1)
        py = base[:, 1:2] + oy.reshape(1, -1)
        d = np.hypot(px - p[:, 0:1], py - p[:, 1:2]).astype(np.float32)
        r = r.astype(np.float32)
        ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        idx = np.where(ok, py * w + px, 0)
        inside = (d < r[:, None]) & ok
        mask[idx[inside]] = True
        # absorption ~ chord length through a cylinder, widened by half a pixel (partial cover)
        rr = r[:, None] + 0.5
        chord = np.sqrt(np.clip(1.0 - (d / rr) ** 2, 0.0, 1.0))
        # contrast grows with calibre: thin vessels are faint
        strength = c * (1.0 - np.exp(-(2.0 * r) / 2.0))
        val = (strength[:, None] * chord).astype(np.float32)
        np.maximum.at(absorb, idx[ok], val[ok])
        # arterial central light reflex on wider arteries
        wide = art & (r > 1.6)
        if wide.any():
            refl = 0.45 * np.exp(-(d[wide] / (0.35 * r[wide, None])) ** 2)
            okw = ok[wide]
            np.maximum.at(reflex, idx[wide][okw], refl[okw].astype(np.float32))
    mask = mask.reshape(h, w) & fov
    return mask, absorb.reshape(h, w), reflex.reshape(h, w)


def _blobs(rng, n, h, w, geom, rmin, rmax, s):
    """Random roundish blobs inside the FOV: a soft field in [0, 1]."""
    field = np.zeros((h, w), np.float32)
    for _ in range(n):
        ang, rad = rng.uniform(0, 2 * np.pi), geom["R"] * np.sqrt(rng.uniform(0.0, 0.85))
        x0, y0 = geom["cx"] + rad * np.cos(ang), geom["cy"] + rad * np.sin(ang)
        r = rng.uniform(rmin, rmax) * s
        ax = rng.uniform(0.6, 1.4)
        k = int(np.ceil(2.5 * r * max(ax, 1 / ax))) + 1
        x1, x2 = max(int(x0) - k, 0), min(int(x0) + k + 1, w)
        y1, y2 = max(int(y0) - k, 0), min(int(y0) + k + 1, h)
        if x1 >= x2 or y1 >= y2:
            continue
        yy, xx = np.mgrid[y1:y2, x1:x2]
        d = np.hypot((xx - x0) * ax, (yy - y0) / ax) / r
        blob = np.clip(1.2 - d, 0, 1) ** 1.5 * rng.uniform(0.5, 1.0)
        field[y1:y2, x1:x2] = np.maximum(field[y1:y2, x1:x2], blob)
    return field


def generate(seed=0, split="training", index=0, size=(584, 565), return_vessels=False):
    """One synthetic fundus: dict(img=HxWx3 uint8 RGB, label=HxW uint8 {0,1}, fov=HxW bool).

    Deterministic in (seed, split, index, size). With return_vessels, 'vessels' lists the centre
    lines as (points (N, 2) x/y, radii (N,)) for tests and inspection.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32:
        raise ValueError(f"synthetic images need at least 32x32 pixels, got {h}x{w}")
    rng = np.random.default_rng([GENERATOR_VERSION, int(seed), _SPLIT_CODE[split], int(index)])
    s = min(h, w) / 565.0  # DRIVE scale = 1: vessel widths and lesion sizes scale with the image
    # the steps draw from one generator in this order: changing it changes every image
    geom = _geometry(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rho = np.hypot(xx - geom["cx"], yy - geom["cy"])
    fov = rho < geom["R"]
    vessels = _vessel_tree(rng, geom, s)
    label, absorb, reflex = _splat(vessels, h, w, fov)
    chor = _choroid(rng, geom, s, h, w)
    img = _background(rng, geom, s, xx, yy, chor)
    # vessels: absorption strongest in green, weakest in red; light reflex on arteries
    vessel_abs = absorb * (1.0 - reflex)
    img *= 1.0 - vessel_abs[..., None] * np.array([0.22, 1.0, 0.75], np.float32)
    img = _camera(rng, geom, s, img, xx, yy, rho)
    out = dict(img=np.clip(np.rint(img), 0, 255).astype(np.uint8),
               label=label.astype(np.uint8), fov=fov)
    if return_vessels:
        out["vessels"] = [(v.points, v.radii) for v in vessels]
    return out


def _geometry(rng, h, w):
    """FOV circle (centre cx, cy, radius R), optic disc (dx, dy, radius rd), fovea (fx, fy)."""
    cx, cy = w / 2 + rng.normal(0, 0.01 * w), h / 2 + rng.normal(0, 0.01 * h)
    R = 0.5 * min(h, w) * rng.uniform(0.93, 0.97)
    side = 1 if rng.random() < 0.5 else -1  # disc on the right (+1) or left (-1)
    rd = R * rng.uniform(0.13, 0.16)       # disc radius (DRIVE: ~40 px)
    dx = cx + side * R * rng.uniform(0.45, 0.6)
    dy = cy + R * rng.normal(0, 0.06)
    fx = dx - side * 5.0 * rd * rng.uniform(0.9, 1.1)
    fy = dy + R * rng.normal(0.05, 0.04)
    return dict(cx=cx, cy=cy, R=R, dx=dx, dy=dy, rd=rd, fx=fx, fy=fy, faz=0.55 * rd,
                arc=rd * rng.uniform(3.6, 4.4))


def _vessel_tree(rng, geom, s):
    """The labelled network: arcades (temporal, around the fovea) and nasal trunks, artery and
    vein each, plus small vessels leaving the disc in any direction."""
    dx, dy, rd = geom["dx"], geom["dy"], geom["rd"]
    grower = _TreeGrower(rng, geom, s)
    temporal = math.atan2(geom["fy"] - dy, geom["fx"] - dx)
    for up in (-1, 1):
        for artery in (False, True):
            r0 = (rng.uniform(3.5, 4.0) if not artery else rng.uniform(2.6, 3.1)) * s
            ang = temporal + up * rng.uniform(1.2, 1.6)  # leave the disc up/down, then curve
            x0, y0 = dx + rng.normal(0, 0.2 * rd), dy + up * rd * rng.uniform(0.0, 0.3)
            grower.grow(x0, y0, ang, r0, 0, "arcade", artery,
                        rng.uniform(0.42, 0.52) * (0.8 if artery else 1.0), rot=-up)
            ang = temporal + math.pi + up * rng.uniform(0.4, 1.0)
            grower.grow(x0, y0, ang, r0 * rng.uniform(0.6, 0.8), 1, "radial", artery,
                        rng.uniform(0.42, 0.52) * (0.8 if artery else 1.0))
    for _ in range(rng.integers(2, 5)):
        ang = rng.uniform(0, 2 * math.pi)
        grower.grow(dx + 0.5 * rd * math.cos(ang), dy + 0.5 * rd * math.sin(ang), ang,
                    rng.uniform(1.0, 1.8) * s, 2, "radial", bool(rng.random() < 0.5),
                    rng.uniform(0.35, 0.5))
    return grower.vessels


def _choroid(rng, geom, s, h, w):
    """Unlabelled choroidal vessels: wide, blurry, low contrast (their absorption map)."""
    cx, cy, R = geom["cx"], geom["cy"], geom["R"]
    chor_grower = _TreeGrower(rng, geom, s)
    for _ in range(rng.integers(4, 10)):
        ang, rad = rng.uniform(0, 2 * np.pi), R * np.sqrt(rng.uniform(0, 0.8))
        chor_grower.grow(cx + rad * math.cos(ang), cy + rad * math.sin(ang),
                         rng.uniform(0, 2 * math.pi), rng.uniform(3.0, 6.0) * s, 4, "free",
                         False, rng.uniform(0.05, 0.14))
    _, chor, _ = _splat(chor_grower.vessels, h, w, np.ones((h, w), bool), every=3)
    return _blur(chor, 2.5 * s)


def _background(rng, geom, s, xx, yy, chor):
    """The float RGB fundus without its vessels: colour, pigment texture, macula, disc,
    choroid (mostly in red), lesions."""
    h, w = xx.shape
    rd = geom["rd"]
    base = np.array([rng.uniform(170, 220), rng.uniform(80, 115), rng.uniform(20, 45)], np.float32)
    texture = _fractal(rng, h, w, [90 * s, 40 * s, 16 * s, 6 * s], [0.05, 0.04, 0.03, 0.02])
    img = base[None, None, :] * (1.0 + texture[..., None] * np.array([0.8, 1.0, 1.2], np.float32))
    df = np.hypot(xx - geom["fx"], yy - geom["fy"]) / rd
    macula = np.exp(-0.5 * (df / rng.uniform(1.1, 1.6)) ** 2) * rng.uniform(0.18, 0.35)
    img *= 1.0 - macula[..., None] * np.array([0.5, 1.0, 0.8], np.float32)
    dd = np.hypot(xx - geom["dx"], yy - geom["dy"]) / rd
    disc = np.clip((1.05 - dd) / 0.2, 0, 1) ** 1.5 + 0.6 * np.exp(-0.5 * (dd / 0.35) ** 2)
    img += disc[..., None] * np.array([rng.uniform(25, 50), rng.uniform(70, 110),
                                       rng.uniform(35, 60)], np.float32)
    img *= 1.0 - chor[..., None] * np.array([1.0, 0.45, 0.3], np.float32)
    dark = _blobs(rng, rng.poisson(7), h, w, geom, 1.5, 9.0, s)      # haemorrhages, MAs
    dark = _blur(dark, 0.8 * s)
    img *= 1.0 - dark[..., None] * np.array([0.25, rng.uniform(0.35, 0.6), 0.45], np.float32)
    bright = _blobs(rng, rng.poisson(5), h, w, geom, 1.5, 6.0, s)    # exudates, drusen
    bright = _blur(bright, 0.7 * s)
    img += bright[..., None] * np.array([35, rng.uniform(30, 60), 10], np.float32)
    return img


def _camera(rng, geom, s, img, xx, yy, rho):
    """Illumination (off-centre vignetting times a low-frequency field), then optics and
    sensor: blur, noise, the FOV's soft rim with black outside."""
    h, w = xx.shape
    cx, cy, R = geom["cx"], geom["cy"], geom["R"]
    vx, vy = cx + rng.normal(0, 0.15 * R), cy + rng.normal(0, 0.15 * R)
    vig = 1.0 - rng.uniform(0.3, 0.55) * (np.hypot(xx - vx, yy - vy) / R) ** rng.uniform(1.8, 3.0)
    illum = np.clip(vig, 0.15, None) * np.exp(0.2 * _smooth_field(rng, h, w, 220 * s))
    img *= illum[..., None] * rng.uniform(0.85, 1.15)
    img = _blur(img, rng.uniform(0.6, 0.9) * s)
    img += rng.uniform(1.5, 3.5) * rng.standard_normal(img.shape, dtype=np.float32)
    edge = np.clip((R - rho) / 3.0, 0, 1)
    outside = 3 * rng.random(img.shape, dtype=np.float32)
    return img * edge[..., None] + outside * (1 - edge[..., None])


# ---------------------------------------------------------------- green-channel baseline

def green_channel_baseline(train_items, val_items):
    """The classic baseline: vessel = green <= t inside the FOV, t the best global threshold.

    t maximises the pooled vessel Dice over the FOV pixels of ``train_items``; it is then applied
    to ``val_items`` and scored with SegMetric (FOV-restricted, as papers score). Items are dicts
    with 'img' (RGB uint8), 'label' ({0,1}, 255 ignored) and optionally 'fov' (bool).
    Returns dict(threshold, train_dice, metrics) with metrics from ``SegMetric.compute()``.
    """
    from ..metrics import SegMetric

    hist = np.zeros((2, 256), np.int64)  # [background, vessel] x green value
    for item in train_items:
        g, lab = item["img"][..., 1], item["label"]
        keep = lab != 255
        if item.get("fov") is not None:
            keep &= item["fov"]
        for c in (0, 1):
            hist[c] += np.bincount(g[keep & (lab == c)], minlength=256)
    tp = np.cumsum(hist[1])          # vessels at or below t
    fp = np.cumsum(hist[0])
    fn = hist[1].sum() - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    t = int(np.argmax(dice))
    metric = SegMetric(num_classes=2)
    for item in val_items:
        fov = item.get("fov")
        pred = (item["img"][..., 1] <= t).astype(np.uint8)
        if fov is not None:
            pred &= fov.astype(np.uint8)
        metric.update(pred, item["label"], fov=fov)
    return dict(threshold=t, train_dice=float(dice[t] * 100), metrics=metric.compute())


# ---------------------------------------------------------------- cache, layout, dataset

def default_cache_dir():
    """$FASTUNET_CACHE, else ~/.cache/fastunet (fastunet.settings.cache_dir)."""
    from ..settings import cache_dir

    return cache_dir()


def _params_key(seed, size):
    blob = json.dumps({"generator": GENERATOR_VERSION, "seed": int(seed),
                       "size": [int(size[0]), int(size[1])]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def synthetic_root(seed=0, size=(584, 565), cache_dir=None):
    """The cache folder of one generator setting: <cache_dir>/synthetic/<params-hash>."""
    return os.path.join(cache_dir or default_cache_dir(), "synthetic", _params_key(seed, size))


def _paths(root, split, index):
    name = f"{index:04d}"
    return (name, os.path.join(root, "images", split, name + IMG_SUFFIX),
            os.path.join(root, "annotations", split, name + SEG_SUFFIX),
            os.path.join(root, "fov", split, name + IMG_SUFFIX))


def _write_item(root, split, index, item):
    """Write one item; the image goes last, so its presence means the triple is complete."""
    from .io import write_png

    _, img_p, seg_p, fov_p = _paths(root, split, index)
    write_png(seg_p, item["label"], compress_level=3)
    write_png(fov_p, item["fov"].astype(np.uint8), compress_level=3)
    write_png(img_p, item["img"], compress_level=3)


def _ensure(root, split, count, seed, size, progress):
    """Generate whichever of items 0..count-1 are missing under root (each file atomic)."""
    for kind in ("images", "annotations", "fov"):
        os.makedirs(os.path.join(root, kind, split), exist_ok=True)
    missing = [i for i in range(count)
               if not all(os.path.isfile(p) for p in _paths(root, split, i)[1:])]
    if not missing:
        return
    from ..atomic import remove_stale_temp_files

    remove_stale_temp_files(root)  # of a writer killed mid-file
    iterator = missing
    if progress:
        import sys
        from tqdm import tqdm
        iterator = tqdm(missing, desc=f"generating synthetic {split} images", unit="img",
                        file=sys.stderr, leave=False)
    for i in iterator:
        _write_item(root, split, i, generate(seed, split, i, size))


def write_synthetic(root, num_training=20, num_validation=20, size=(584, 565), seed=0,
                    progress=False):
    """Write a synthetic data set in the converted layout (DRIVE naming), readable by
    ``build_dataset('drive', root, split)``. Built beside root, then renamed into place."""
    root = os.path.abspath(os.fspath(root))
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(f"{root} exists and is not empty; choose a new folder")
    from ..atomic import atomic_directory, atomic_write

    os.makedirs(os.path.dirname(root), exist_ok=True)
    with atomic_directory(root) as tmp:
        for split, n in (("training", num_training), ("validation", num_validation)):
            _ensure(tmp, split, n, seed, size, progress)
        with atomic_write(os.path.join(tmp, "synthetic.json"), "w") as f:
            json.dump({"generator": GENERATOR_VERSION, "seed": seed, "size": list(size),
                       "num_training": num_training, "num_validation": num_validation}, f)
    return root


class SyntheticVessels(torch.utils.data.Dataset):
    """The synthetic retinal-vessel data set as a dataset of dict(img, label, name, fov) items.

    split: 'training' or 'validation'; num_images: items in this split (default 20, as DRIVE);
    size: (h, w); seed: selects the whole data set (train and validation differ for one seed).
    cache=True generates missing images once into ``synthetic_root(seed, size, root)`` (root:
    the cache directory, default $FASTUNET_CACHE or ~/.cache/fastunet) and reads the PNGs;
    cache=False generates every item on the fly (deterministic, nothing written).
    """

    CLASSES = ("background", "vessel")

    def __init__(self, split="training", num_images=20, size=(584, 565), seed=0, root=None,
                 cache=True, progress=True):
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
        if int(num_images) <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.split, self.num_images = split, int(num_images)
        self.size, self.seed, self.cache = (int(size[0]), int(size[1])), int(seed), cache
        self.root = synthetic_root(self.seed, self.size, root) if cache else None
        if cache:
            _ensure(self.root, split, self.num_images, self.seed, self.size, progress)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} items")
        if not self.cache:
            item = generate(self.seed, self.split, index, self.size)
            return dict(img=item["img"], label=item["label"], name=f"{index:04d}",
                        fov=item["fov"])
        from .io import read_image, read_label

        name, img_p, seg_p, fov_p = _paths(self.root, self.split, index)
        return dict(img=read_image(img_p), label=read_label(seg_p), name=name,
                    fov=read_label(fov_p) > 0)


def main(argv=None):
    """``python -m fastunet.data {write ROOT | baseline}`` (see fastunet/data/__main__.py)."""
    import sys

    from .._cli import ArgumentParser, fail

    p = ArgumentParser(prog="python -m fastunet.data",
                                description="Write the synthetic vessel data set, or score the "
                                            "green-channel baseline on it.")
    p.add_argument("action", choices=["write", "baseline"])
    p.add_argument("root", nargs="?", help="folder to create (write)")
    p.add_argument("--num-training", type=int, default=20)
    p.add_argument("--num-validation", type=int, default=20)
    p.add_argument("--size", type=int, nargs=2, default=(584, 565), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("num_training", "num_validation"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.size) < 32:
        p.error(f"--size must be at least 32 32, got {args.size[0]} {args.size[1]}")
    try:
        if args.action == "write":
            if not args.root:
                p.error("write needs ROOT")
            write_synthetic(args.root, args.num_training, args.num_validation,
                            tuple(args.size), args.seed, progress=True)
            print(f"{args.root}: {args.num_training} training and {args.num_validation} "
                  "validation images (read it with build_dataset('drive', ROOT, split))")
            return 0
        kw = dict(size=tuple(args.size), seed=args.seed, cache=False)
        train = SyntheticVessels("training", args.num_training, **kw)
        val = SyntheticVessels("validation", args.num_validation, **kw)
        res = green_channel_baseline(train, val)
    except (OSError, ValueError) as exc:
        return fail(p.prog, exc, code=1)
    print(f"green-channel baseline: threshold {res['threshold']} (training Dice "
          f"{res['train_dice']:.2f}); validation vessel Dice {res['metrics']['vessel_dice']:.2f}")
    return 0

"""numpy re-implementations of the OpenCV uint8 operations mmseg's training pipeline runs.

mmcv resizes with ``cv2.resize`` (INTER_LINEAR for images, INTER_NEAREST for labels) and
PhotoMetricDistortion converts with ``cv2.cvtColor`` BGR<->HSV on uint8. fastunet must not
depend on OpenCV, so the integer arithmetic is reproduced here: the coordinate maps and
fixed-point weights of ``resizeGeneric_`` (11-bit coefficients, the SSE2 rounding of the
vertical pass for the bulk of each row and the scalar rounding for the row's tail) and the
table-driven RGB->HSV / float HSV->RGB conversions. Tests compare these with OpenCV when it is
installed (it is not a dependency).

Resizes are computed for a window of the output only (rows y0:y1, cols x0:x1), which equals
resizing the whole image and cropping, at the cost of the window.

Pixel grids. INTER_LINEAR maps output pixel x to source position (x + 0.5) * scale - 0.5: pixel
centres onto pixel centres. INTER_NEAREST does not: it takes source pixel floor(x * scale), the
pixel under output x's left edge, so a label resized with it sits up to half a source pixel off
the image resized with INTER_LINEAR (mmseg's pipeline pairs exactly these two). The
``centre=True`` nearest map takes floor((x + 0.5) * scale), the source pixel under output x's
centre, on the image's grid (PIL's NEAREST and OpenCV's INTER_NEAREST_EXACT do the same).
"""
import numpy as np

__all__ = ["rescale_size", "nearest_index", "linear_coeffs", "resize_linear_window",
           "resize_nearest_window", "rgb2hsv", "hsv2rgb"]

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS
# cv2's HSV->RGB converts each row in blocks of 4 float vectors (AVX2: 4 x 8 = 32 pixels),
# truncating; the row's remaining pixels go through the scalar code, which rounds.
_HSV_BLOCK = 32


def rescale_size(w, h, scale):
    """mmcv.rescale_size((w, h), scale) for a tuple scale: (new_w, new_h), scale_factor."""
    max_long, max_short = max(scale), min(scale)
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5), factor


def nearest_index(src, dst, centre=False):
    """Source index of every output index of a nearest-neighbour resize from src to dst pixels.

    centre=False: cv2 INTER_NEAREST, floor(x * src/dst) as OpenCV rounds it (mmseg's labels);
    centre=True: floor((x + 0.5) * src/dst), the pixel under the output pixel's centre, computed
    exactly in integers (see the module docstring).
    """
    x = np.arange(dst, dtype=np.int64)
    if centre:
        return np.minimum((2 * x + 1) * src // (2 * dst), src - 1)
    inv_scale = dst / src  # cv2 keeps fx = dsize/ssize and multiplies by 1/fx
    idx = np.floor(x * (1.0 / inv_scale)).astype(np.int64)
    return np.minimum(idx, src - 1)


def linear_coeffs(src, dst, lo=0, hi=None):
    """cv2 INTER_LINEAR map for one axis: (index0, index1, weight0, weight1) as int arrays, for
    output indices lo..hi-1 (default all dst).

    Weights are 11-bit fixed point (sum 2048); borders clamp as resizeGeneric_ does.
    """
    scale = 1.0 / (dst / src)
    x = np.arange(lo, dst if hi is None else hi, dtype=np.float64)
    f = ((x + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    low = s < 0
    f[low], s[low] = 0, 0
    high = s >= src - 1
    f[high], s[high] = 0, src - 1
    s1 = np.minimum(s + 1, src - 1)
    w0 = _round_half_even((np.float32(1) - f) * np.float32(_COEF_SCALE))
    w1 = _round_half_even(f * np.float32(_COEF_SCALE))
    return s, s1, w0, w1


def _round_half_even(x):
    return np.rint(x).astype(np.int64)


def resize_linear_window(img, new_w, new_h, y0, y1, x0, x1):
    """Rows y0:y1, cols x0:x1 of cv2.resize(img, (new_w, new_h), INTER_LINEAR), uint8 HxW[xC]."""
    h, w = img.shape[:2]
    cn = img.shape[2] if img.ndim == 3 else 1
    src = img.reshape(h, w, cn)
    if 2 * new_w == w and 2 * new_h == h:
        # cv2 turns an exact 2x linear downscale into INTER_AREA's 2x2 mean
        block = src[2 * y0:2 * y1, 2 * x0:2 * x1].astype(np.int32)
        s = block[0::2, 0::2] + block[0::2, 1::2] + block[1::2, 0::2] + block[1::2, 1::2]
        out = ((s + 2) >> 2).astype(np.uint8)
        return out if img.ndim == 3 else out[..., 0]
    ys0, ys1, b0, b1 = linear_coeffs(h, new_h, y0, y1)
    xs0, xs1, a0, a1 = linear_coeffs(w, new_w, x0, x1)
    # horizontal pass (exact integers) on the source rows the window needs
    rows = np.unique(np.concatenate([ys0, ys1]))
    sub = src[rows]
    hor = sub[:, xs0].astype(np.int32) * a0[None, :, None].astype(np.int32) + \
        sub[:, xs1].astype(np.int32) * a1[None, :, None].astype(np.int32)
    S0 = hor[np.searchsorted(rows, ys0)]
    S1 = hor[np.searchsorted(rows, ys1)]
    # vertical pass with the rounding of OpenCV's vectorised loop (VResizeLinearVec_32s8u):
    # sat16(S >> 4), high half of the 16x16 product with the weight, then (sum + 2) >> 2
    t0 = (np.minimum(S0 >> 4, 32767) * b0[:, None, None].astype(np.int32)) >> 16
    t1 = (np.minimum(S1 >> 4, 32767) * b1[:, None, None].astype(np.int32)) >> 16
    out = np.clip((t0 + t1 + 2) >> 2, 0, 255).astype(np.uint8)
    return out if img.ndim == 3 else out[..., 0]


def resize_nearest_window(label, new_w, new_h, y0, y1, x0, x1, centre=False):
    """Rows y0:y1, cols x0:x1 of a nearest resize of label to (new_w, new_h): cv2.resize's
    INTER_NEAREST, or with ``centre`` on the pixel grid of the linear resize (nearest_index)."""
    h, w = label.shape[:2]
    ry = nearest_index(h, new_h, centre)[y0:y1]
    rx = nearest_index(w, new_w, centre)[x0:x1]
    return label[ry[:, None], rx[None, :]]


# --- colour: cv2.cvtColor(..., COLOR_RGB2HSV / COLOR_HSV2RGB) on uint8 (H in [0, 180)) ---

_HSV_SHIFT = 12
_i = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    _SDIV = np.where(_i > 0, np.rint((255 << _HSV_SHIFT) / np.maximum(_i, 1)), 0).astype(np.int64)
    _HDIV180 = np.where(_i > 0, np.rint((180 << _HSV_SHIFT) / (6.0 * np.maximum(_i, 1))),
                        0).astype(np.int64)
del _i


def rgb2hsv(img):
    """uint8 RGB HxWx3 -> uint8 HSV as cv2 (H = degrees / 2, S and V in 0..255)."""
    r, g, b = (img[..., k].astype(np.int64) for k in range(3))
    v = np.maximum(np.maximum(b, g), r)
    vmin = np.minimum(np.minimum(b, g), r)
    diff = v - vmin
    vr = v == r
    vg = v == g
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(vr, g - b, np.where(vg, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([np.clip(h, 0, 255), s, v], axis=-1).astype(np.uint8)


_SECTOR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv2rgb(hsv):
    """uint8 HSV (cv2 convention) -> uint8 RGB, in float32 as cv2's HSV2RGB_b."""
    f32 = np.float32
    h = hsv[..., 0].astype(f32)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    h = h * f32(6.0 / 180.0)
    h = np.fmod(h, f32(6.0))
    sector = np.floor(h).astype(np.int64)
    h = h - sector.astype(f32)
    bad = (sector < 0) | (sector >= 6)
    sector[bad] = 0
    h[bad] = 0
    tab = np.stack([v, v * (f32(1) - s), v * (f32(1) - s * h), v * (f32(1) - s * (f32(1) - h))])
    tab = tab.reshape(4, -1)
    flat = np.arange(tab.shape[1])
    idx = _SECTOR[sector.reshape(-1)]  # per pixel: positions of b, g, r in tab
    b, g, r = (tab[idx[:, k], flat].reshape(v.shape) for k in range(3))
    gray = s == 0
    rgb = np.stack([np.where(gray, v, r), np.where(gray, v, g), np.where(gray, v, b)], axis=-1)
    rgb = rgb * f32(255.0)
    width = rgb.shape[-2]
    bulk = (width // _HSV_BLOCK) * _HSV_BLOCK
    out = np.empty(rgb.shape, np.uint8)
    out[..., :bulk, :] = np.clip(np.trunc(rgb[..., :bulk, :]), 0, 255)
    out[..., bulk:, :] = np.clip(np.rint(rgb[..., bulk:, :]), 0, 255)
    return out

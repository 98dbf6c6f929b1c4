"""Window geometry of the inference modes: where windows go along each axis, how the input is
padded for them, and what the aggregation covers (see ``InferenceEngine.plan``)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.tile_reference import window_count


def pair(value, name):
    if isinstance(value, int):
        value = (value, value)
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return a, b


def ceil_to(value, divisor):
    return -(-value // divisor) * divisor


@dataclass(frozen=True)
class AxisPlan:
    """Geometry along one image axis (all in pixels)."""

    size: int        # image extent
    pad_before: int  # input padding (top / left)
    pad_after: int   # input padding (bottom / right)
    window: int      # model input window extent
    stride: int      # step between windows
    margin: int      # window outputs are cropped to [margin, margin + tile)
    tile: int        # extent of each window's aggregated part
    canvas: int      # aggregation extent; the image is canvas[:size]
    count: int       # windows along the axis

    def start(self, i):
        """Start of window i in padded-input coordinates = of its tile in canvas coordinates."""
        return min(i * self.stride, self.canvas - self.tile)


@dataclass(frozen=True)
class TilePlan:
    """Where the windows of one image size go (see ``InferenceEngine.plan``)."""

    mode: str
    y: AxisPlan
    x: AxisPlan
    pad_mode: str  # "constant" (0, the mean colour after normalisation) or "reflect"

    @property
    def windows_per_image(self):
        return self.y.count * self.x.count


def slide_axis(size, crop, stride, divisor):
    if size >= crop:
        canvas, window = size, crop
    else:  # mmseg clips the window to the image; pad it to what the model takes
        canvas = ceil_to(size, divisor)
        window = canvas
    return AxisPlan(size, 0, canvas - size, window, stride, 0, window, canvas,
                    window_count(canvas, window, stride))


def whole_axis(size, divisor):
    canvas = ceil_to(size, divisor)
    return AxisPlan(size, 0, canvas - size, canvas, canvas, 0, canvas, canvas, 1)


def overlap_axis(size, tile_size, margin, divisor):
    if size + 2 * margin <= tile_size:  # one tile: just large enough, padded to the divisor
        window = ceil_to(size + 2 * margin, divisor)
        tile = window - 2 * margin
        return AxisPlan(size, margin, window - margin - size, window, tile, margin, tile, tile, 1)
    tile = tile_size - 2 * margin
    return AxisPlan(size, margin, margin, tile_size, tile, margin, tile, size,
                    window_count(size, tile, tile))


def pad(x, plan):
    top, bottom = plan.y.pad_before, plan.y.pad_after
    left, right = plan.x.pad_before, plan.x.pad_after
    if top == bottom == left == right == 0:
        return x
    if plan.pad_mode == "constant":
        return F.pad(x, (left, right, top, bottom))
    # Reflection needs the pad to be smaller than the extent: mirror repeatedly for small images.
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        if h == 1 or w == 1:
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        t, b, l_, r = min(top, h - 1), min(bottom, h - 1), min(left, w - 1), min(right, w - 1)
        x = F.pad(x, (l_, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - l_, right - r
    return x


def pad_index(axis, mode, replicate, p0, p1, device):
    """Source positions of the padded positions [p0, p1) along one axis, as ``pad`` fills
    them: -1 for constant padding, mirrored (repeatedly, for pads longer than the image) for
    reflect, clamped where ``pad`` replicates (an image 1 pixel high or wide)."""
    i = torch.arange(p0, p1, device=device) - axis.pad_before
    n = axis.size
    if mode == "constant":
        return torch.where((i >= 0) & (i < n), i, torch.full_like(i, -1))
    if replicate or n == 1:
        return i.clamp(0, n - 1)
    period = 2 * (n - 1)
    i = i.remainder(period)  # non-negative (sign of the divisor)
    return torch.where(i < n, i, period - i)


def input_rows(src, plan, p0, p1, prep):
    """Rows [p0, p1) of the padded, normalised input, (N, C, p1 - p0, padded width): the same
    values as ``pad(prep(src), plan)[:, :, p0:p1]`` without materialising the whole image."""
    y, x = plan.y, plan.x
    if plan.pad_mode == "constant":
        s0, s1 = max(p0 - y.pad_before, 0), min(p1 - y.pad_before, y.size)
        band = prep(src[:, :, s0:max(s0, s1)])
        top = max(y.pad_before - p0, 0)
        bottom = (p1 - p0) - top - max(s1 - s0, 0)
        if top or bottom or x.pad_before or x.pad_after:
            band = F.pad(band, (x.pad_before, x.pad_after, top, bottom))
        return band
    replicate = y.size == 1 or x.size == 1
    rows = pad_index(y, "reflect", replicate, p0, p1, src.device)
    band = src.index_select(2, rows)
    if x.pad_before or x.pad_after:
        cols = pad_index(x, "reflect", replicate, 0, x.size + x.pad_before + x.pad_after,
                          src.device)
        band = band.index_select(3, cols)
    return prep(band)


def band_bytes(plan, n, channels, classes):
    """(bytes per window row, fixed bytes per band): an upper estimate of what one band of
    ``_streamed`` holds at once: its input rows (raw index copy, normalised copy, padded copy),
    its windows and their float32 logits, and the float32 sums of its rows (the band's own, the
    ones carried from the band above, and the temporaries that turn them into outputs)."""
    padded_w = plan.x.size + plan.x.pad_before + plan.x.pad_after
    y = plan.y
    per_row = n * (plan.x.count * (channels * y.window * plan.x.window
                                   + classes * y.tile * plan.x.tile) * 4
                   + y.stride * (12 * channels * padded_w + 12 * classes * plan.x.canvas))
    overhang = n * (max(y.window - y.stride, 0) * 12 * channels * padded_w
                    + max(y.tile - y.stride, 0) * 12 * classes * plan.x.canvas)
    return per_row, overhang


def axis_coverage(axis, device):
    """(canvas,) float32: how many windows cover each position along one axis (unweighted
    coverage of a pixel is the product of its row's and its column's)."""
    cover = torch.zeros(axis.canvas, device=device)
    for i in range(axis.count):
        cover[axis.start(i):axis.start(i) + axis.tile] += 1
    return cover

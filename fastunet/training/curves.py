"""Training curves as a PNG drawn with Pillow (no plotting library): loss, learning rate, Dice."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.io import write_png

__all__ = ["draw_curves"]

_W, _H = 460, 310             # one panel; the panels sit side by side with a gap
_GAP = 24
_L, _R, _T, _B = 78, 14, 36, 36  # plot margins inside a panel (y tick labels and title left)
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
_FEW = 12  # series with at most this many points get large markers and value labels


def _nice_ticks(lo, hi, n=5):
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v):
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v / 1000:g}k"
    if a < 0.01:
        return f"{v:.0e}"
    return f"{v:.3g}"


def _vertical_text(img, text, x, y_centre, font):
    """Paste ``text`` rotated to read bottom-up, its centre at height ``y_centre``."""
    probe = ImageDraw.Draw(img)
    w = int(probe.textlength(text, font=font)) + 2
    label = Image.new("RGB", (w, 14), "white")
    ImageDraw.Draw(label).text((1, 1), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (x, int(y_centre - label.size[1] / 2)))


def _panel(title, series, xmax, ylabel):
    """One line chart: series = [(name, [(x, y), ...]), ...]. Its y tick labels stand right-aligned
    against its own axis and its y label beside them, so that neither reads as belonging to the
    panel on the left; series with few points get large markers labelled with their values."""
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((_L, 4), title, fill="black", font=font)
    ys = [y for _, pts in series for _, y in pts if y is not None and math.isfinite(y)]
    x0, x1, y0, y1 = _L, _W - _R, _T, _H - _B
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    _vertical_text(img, ylabel, 2, (y0 + y1) / 2, font)
    if not ys:
        d.text((x0 + 10, (y0 + y1) // 2), "no data yet", fill=(120, 120, 120), font=font)
        return img
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.05 + 1e-3), hi + (abs(hi) * 0.05 + 1e-3)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    xmax = max(xmax, 1)
    px = lambda x: x0 + (x1 - x0) * x / xmax
    py = lambda y: y1 - (y1 - y0) * (y - lo) / (hi - lo)
    for t in _nice_ticks(lo, hi):
        if lo <= t <= hi:
            d.line([x0, py(t), x1, py(t)], fill=(230, 230, 230))
            d.line([x0 - 4, py(t), x0, py(t)], fill="black")
            text = _fmt(t)
            d.text((x0 - 7 - d.textlength(text, font=font), py(t) - 6), text, fill="black",
                   font=font)
    for t in _nice_ticks(0, xmax, 4):
        d.line([px(t), y1, px(t), y1 + 4], fill="black")
        d.text((px(t) - d.textlength(_fmt(t), font=font) / 2, y1 + 8), _fmt(t), fill="black",
               font=font)
    d.text(((x0 + x1) // 2 - 20, _H - 14), "iteration", fill="black", font=font)
    for k, (name, pts) in enumerate(series):
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        color = _COLORS[k % len(_COLORS)]
        xy = [(px(x), py(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        few = len(xy) <= _FEW
        r = 4 if few else 2
        for (x, y), (_, value) in zip(xy, pts) if few else zip(xy[-1:], pts[-1:]):
            d.ellipse([x - r, y - r, x + r, y + r], fill=color)
            if few:
                text = f"{value:.1f}" if abs(value) >= 10 else _fmt(value)
                tx = min(max(x - d.textlength(text, font=font) / 2, x0 + 2),
                         x1 - d.textlength(text, font=font) - 2)
                d.text((tx, y - 17 if y - 17 > y0 else y + 6), text, fill=color, font=font)
        if len(series) > 1:  # legend: a row between the title and the plot
            lx = x0 + sum(d.textlength(n, font=font) + 24 for n, _ in series[:k])
            d.rectangle([lx, 20, lx + 8, 28], fill=color)
            d.text((lx + 11, 19), name, fill="black", font=font)
    return img


def draw_curves(records, path, max_iters):
    """Write a PNG with the training loss, learning rate and validation Dice from log records.

    records: dicts as written to log.jsonl; those with ``mode == 'train'`` carry ``iter``,
    ``loss``, ``lr`` (and per-term losses), those with ``mode == 'val'`` carry ``iter`` and
    ``vessel_dice`` / ``mDice``.
    """
    train = [r for r in records if r.get("mode") == "train"]
    val = [r for r in records if r.get("mode") == "val"]
    terms = sorted({k for r in train for k in r if k.startswith(("decode.", "aux"))})
    loss_series = [("total", [(r["iter"], r.get("loss")) for r in train])]
    loss_series += [(t, [(r["iter"], r.get(t)) for r in train]) for t in terms]
    panels = [
        _panel("training loss", loss_series, max_iters, "loss"),
        _panel("learning rate", [("lr", [(r["iter"], r.get("lr")) for r in train])], max_iters,
               "learning rate"),
        _panel("validation Dice (%)",
               [("vessel Dice", [(r["iter"], r.get("vessel_dice")) for r in val]),
                ("mDice", [(r["iter"], r.get("mDice")) for r in val])], max_iters, "Dice (%)"),
    ]
    out = Image.new("RGB", (_W * len(panels) + _GAP * (len(panels) - 1), _H), "white")
    for i, p in enumerate(panels):
        out.paste(p, (i * (_W + _GAP), 0))
    write_png(path, np.asarray(out))
    return path

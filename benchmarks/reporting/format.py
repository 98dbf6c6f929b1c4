"""Number and table formatting shared by the report's tables."""

DERIVED = "†"  # figures derived from a measured subset of windows


def num(value, digits=3):
    """Significant digits without scientific notation for the ranges we print."""
    if value is None:
        return ""
    if value == 0:
        return "0"
    magnitude = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    if magnitude >= digits:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.{digits - magnitude}f}"
    return f"{value:.{digits}g}" if abs(value) >= 1e-4 else f"{value:.1e}"


def speed_ratio(ratio):
    """A speedup (reference time / ours) as '2.50x faster' or '1.10x slower'."""
    if ratio is None:
        return ""
    return f"{num(ratio)}x faster" if ratio >= 1 else f"{num(1 / ratio)}x slower"


def span(values, fmt=num):
    """'a - b' over values (one value when they print the same)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return ""
    lo, hi = fmt(values[0]), fmt(values[-1])
    return lo if lo == hi else f"{lo} - {hi}"


def speed_span(ratios):
    """Speedups as '1.09-1.13x slower', '2.0-8.8x faster' or a mixed 'a - b'."""
    ratios = sorted(r for r in ratios if r is not None)
    if not ratios:
        return ""
    if ratios[-1] < 1:
        lo, hi = num(1 / ratios[-1]), num(1 / ratios[0])
        return f"{lo}x slower" if lo == hi else f"{lo}-{hi}x slower"
    if ratios[0] >= 1:
        lo, hi = num(ratios[0]), num(ratios[-1])
        return f"{lo}x faster" if lo == hi else f"{lo}-{hi}x faster"
    return span(ratios, speed_ratio)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fps_cell(fig):
    if not fig:
        return ""
    return num(fig["images_per_s"]) + (DERIVED if fig.get("derived") else "")


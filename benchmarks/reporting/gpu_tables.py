"""Tables and ratios from a benchmarks/gpu_run.py results file (gpu_run.json): layer variants,
training steps, tile ops, the HRF memory snapshot and the CUDA tests."""
import math

from .format import num, speed_ratio, span, table

COMMAND = "`bash benchmarks/run_gpu.sh`"
# Block variants in the order the tables show them: (key in the JSON, column title)
VARIANTS = [("conv", "conv alone"), ("conv_cin8", "conv, input padded to 8 channels"),
            ("conv_bias", "conv + bias"),
            ("fastunet_op", "fastunet's conv_bias_relu op"),
            ("cudnn_relu", "cuDNN conv-bias-ReLU"), ("epilogue", "conv, then _bias_relu_"),
            ("eager", "eager conv -> BN -> ReLU"), ("module", "ConvBNReLU module")]
FUSED_CANDIDATES = ("fastunet_op", "cudnn_relu", "epilogue", "module")


def _gpu_us(case):
    """A case's GPU microseconds per call: the CUDA-graph time, else the eager loop's."""
    return case.get("gpu_us") or case.get("loop_us")


def _shape_name(shape):
    cin, cout, k, stride, _, _, _, h, w = shape
    return f"{cin}->{cout}, {k}x{k}{'/' + str(stride) if stride > 1 else ''}, {h}x{w}"


def block_cases(run):
    """{(precision, shape tuple): {variant: case}} of the finished block cases."""
    found = {}
    for case in run.section("blocks").get("cases", []):
        if "error" in case or not _gpu_us(case):
            continue
        found.setdefault((case["precision"], tuple(case["shape"])), {})[case["variant"]] = case
    return found


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def block_ratios(run, precision, variant):
    """[variant's GPU time / conv alone's] over the shapes measured in a precision."""
    out = []
    for (p, _), cases in block_cases(run).items():
        if p == precision and variant in cases and "conv" in cases:
            out.append(_gpu_us(cases[variant]) / _gpu_us(cases["conv"]))
    return out


def block_tables(run):
    """Markdown: per precision, every layer shape's GPU time of each variant relative to the
    convolution alone, and the host time per call."""
    section = run.section("blocks")
    cases = block_cases(run)
    if not cases:
        return []
    out = [f"Batch {section.get('batch')} of {section.get('window')}x{section.get('window')} "
           f"windows, {section.get('layout')}; GPU time of a CUDA graph of "
           "calls, per call, relative to the convolution alone (its microseconds in the first "
           "column); last row: geometric mean over the shapes.", ""]
    present = [(k, t) for k, t in VARIANTS if any(k in c for c in cases.values())]
    for precision in sorted({p for p, _ in cases}, key=lambda p: (p != "bf16", p)):
        rows = []
        for (p, shape), by_variant in cases.items():
            if p != precision or "conv" not in by_variant:
                continue
            conv = _gpu_us(by_variant["conv"])
            rows.append([_shape_name(shape), num(conv)] + [
                f"{num(_gpu_us(by_variant[k]) / conv)}x" if k in by_variant else ""
                for k, _ in present if k != "conv"])
        rows.append(["geometric mean", ""] + [
            f"{num(_geomean(block_ratios(run, precision, k)))}x"
            if block_ratios(run, precision, k) else "" for k, _ in present if k != "conv"])
        out += [f"**{precision}**", "", table(
            ["Layer (in->out, kernel, map)", "conv alone (us)"]
            + [t for k, t in present if k != "conv"], rows), ""]
    host = []
    for key, title in present:
        per = [c[key] for c in cases.values() if key in c]
        kernels = section.get("kernels_per_call", {}).get(key)
        host.append([title, span([c.get("host_us") for c in per]),
                     span([_gpu_us(c) for c in per]),
                     "" if not kernels else " / ".join("" if k is None else str(k)
                                                       for k in kernels)])
    out += ["Host time to issue one call eagerly against its GPU time (ranges over the shapes "
            "and precisions), and the GPU kernels / ATen ops of one call "
            f"(layer {_shape_name(section.get('kernels_shape', [0] * 9))}):", "",
            table(["Variant", "host us / call", "GPU us / call", "kernels / ATen ops"], host), ""]
    return out


def training_cases(run):
    return [c for c in run.section("training").get("cases", []) if "step_ms" in c]


def _train_label(case):
    return f"{'fused' if case['fused'] else 'eager'}, {'CUDA graph' if case['captured'] else 'plain'}"


def training_table(run):
    section = run.section("training")
    rows = []
    for case in run.section("training").get("cases", []):
        label = _train_label(case)
        if "step_ms" not in case:
            reason = case.get("error") or case.get("skipped") or "not finished"
            rows.append([case["batch"], label, "", "", "", "", reason[:120]])
            continue
        eager = next((c for c in training_cases(run) if c["batch"] == case["batch"]
                      and not c["fused"] and c["captured"] == case["captured"]), None)
        vs = (f"{num(case['step_ms'] / eager['step_ms'])}x time"
              if eager and case["fused"] else "")
        mem = case.get("activation_peak_MiB")
        rows.append([case["batch"], label, num(case["step_ms"]), case.get("kernels") or "",
                     num(mem) if mem else "", vs, ""])
    if not rows:
        return []
    precision = section.get("precision")
    return [f"FCN, {'AMP ' if precision != 'fp32' else ''}{precision}, "
            f"{section.get('layout')}, {section.get('size')}x"
            f"{section.get('size')} crops, SGD (momentum 0.9, weight decay 5e-4). Step: CUDA "
            "events around a loop of steps. Activation peak: one forward+backward above what "
            "is allocated before it (weights, gradients, optimizer state); the optimizer "
            "step is not in it.", "",
            table(["Batch", "Variant", "Step (ms)", "Kernels / step", "Activation peak (MiB)",
                   "Fused vs eager, same mode", "Note"], rows), ""]


def tile_table(run):
    rows = []
    for case in run.section("tiles").get("cases", []):
        bound = case.get("bound_us")
        for op in ("aggregate", "aggregate_out", "softmax", "argmax", "extract", "copy"):
            timing = case.get(op)
            if not timing:
                continue
            us = _gpu_us(timing)
            rows.append([f"{case['grid'].upper()} ({case['windows']} windows)", op, num(us),
                         num(timing.get("host_us")),
                         f"{num(us / bound)}x" if bound and op != "copy" else ""])
    if not rows:
        return []
    return ["GPU time per call (CUDA graph of calls); the bound reads the windows and writes "
            "the output once at the bandwidth of a device copy of the windows.", "",
            table(["Grid", "Op", "GPU us", "host us", "vs bound"], rows), ""]


def memory_lines(run):
    section = run.section("memory")
    summary = section.get("summary")
    if not summary:
        return []
    rows = [[g["where"], num(g["bytes"] / 2**20), g["blocks"]]
            for g in summary.get("largest_at_peak", [])]
    return [f"One HRF window batch ({section['window_batch']} windows of "
            f"{section['window']}x{section['window']}, {section['precision']}, inference "
            f"mode): {num(section['peak_bytes_above_weights'] / 2**20)} MiB above the weights at "
            f"the peak, {num(section['peak_MiB_per_window'])} MiB per window. Live at the peak, "
            "by the line that allocated it:", "",
            table(["Allocated at", "MiB", "Blocks"], rows), ""]


def tests_line(run):
    record = (run.gpu_run or {}).get("sections", {}).get("tests", {})
    result = record.get("result") or {}
    if not result:
        return []
    line = f"CUDA tests (`pytest tests -m cuda`): {result.get('summary') or record.get('status')}"
    failures = result.get("failures") or []
    return [line + (":" if failures else "."), ""] + [f"- `{f}`" for f in failures] + (
        [""] if failures else [])


def gpu_ratio_rows(run):
    """Key ratios of a gpu_run.json: (comparison, value, detail, command)."""
    rows = []
    for precision in ("bf16", "fp16"):
        cands = {k: block_ratios(run, precision, k) for k in FUSED_CANDIDATES}
        cands = {k: v for k, v in cands.items() if v}
        if not cands:
            continue
        eager = block_ratios(run, precision, "eager")
        rows.append((f"Conv-BN-ReLU layer variants vs the convolution alone, GPU time, "
                     f"{precision}, {len(cands[next(iter(cands))])} UNet shapes",
                     ", ".join(f"{k} {num(_geomean(v))}x" for k, v in cands.items()),
                     "geometric means; worst shape: " + ", ".join(
                         f"{k} {num(max(v))}x" for k, v in cands.items())
                     + (f"; eager conv -> BN -> ReLU {num(_geomean(eager))}x" if eager else ""),
                     COMMAND))
    for case in training_cases(run):
        if not case["fused"]:
            continue
        eager = next((c for c in training_cases(run) if c["batch"] == case["batch"]
                      and not c["fused"] and c["captured"] == case["captured"]), None)
        if not eager:
            continue
        mem = (case.get("activation_peak_MiB"), eager.get("activation_peak_MiB"))
        rows.append((f"Fused vs eager training step, AMP bf16, batch {case['batch']}, "
                     f"{'CUDA graph' if case['captured'] else 'plain'}",
                     speed_ratio(eager["step_ms"] / case["step_ms"]),
                     f"{num(case['step_ms'])} vs {num(eager['step_ms'])} ms"
                     + (f"; kernels {case['kernels']} vs {eager['kernels']}"
                        if case.get("kernels") else "")
                     + (f"; activation peak {num(mem[0] / mem[1])}x ({num(mem[0])} vs "
                        f"{num(mem[1])} MiB)" if all(mem) else ""), COMMAND))
    inference = [c for c in run.section("inference").get("cases", []) if "images_per_s" in c]
    for case in inference:
        if case.get("kernels") != "fastunet":
            continue
        plain = next((c for c in inference if c.get("kernels", "default") == "default" and all(
            c[k] == case[k] for k in ("dataset", "mode", "precision"))), None)
        if plain:
            rows.append((f"Inference engine with fastunet's conv kernels vs the device default, "
                         f"{case['dataset'].upper()} {case['mode']} {case['precision']}",
                         speed_ratio(case["images_per_s"] / plain["images_per_s"]),
                         f"{num(case['images_per_s'])} vs {num(plain['images_per_s'])} img/s",
                         COMMAND))
    for case in run.section("tiles").get("cases", []):
        timing = case.get("aggregate_out") or {}
        if _gpu_us(timing) and case.get("bound_us"):
            rows.append((f"Tile aggregation into a reused output vs the bandwidth bound, "
                         f"{case['grid'].upper()} ({case['windows']} windows)",
                         f"{num(_gpu_us(timing) / case['bound_us'])}x the bound",
                         f"{num(_gpu_us(timing))} us, bound {num(case['bound_us'])} us at "
                         f"{num(case['bandwidth_GBps'])} GB/s", COMMAND))
    return rows

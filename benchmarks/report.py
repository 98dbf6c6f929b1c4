"""Performance tables from benchmark results: every number comes from a results file.

    python benchmarks/report.py                  # print the README's performance section
    python benchmarks/report.py --write-readme   # rewrite it between <!-- perf:begin/end -->
    python benchmarks/report.py --check          # exit 1 if README.md's section is stale
    python benchmarks/report.py --summary DIR    # one results folder's summary (run_gpu.sh)

Reads ``benchmarks/results/<folder>/*.json``: pytest-benchmark JSON files (``--benchmark-json``)
and, where present, ``device.json`` (written by run_gpu.sh). Each folder is one run on one
machine; for each device the newest folder (by date, then name) wins. A figure that was not
measured on a device is left blank, never filled from another device or estimated; figures
derived from a measured subset of windows are marked with a dagger.
"""
import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
DERIVED = "†"

DATASETS = [("drive", "DRIVE", "64x64", 42), ("stare", "STARE", "128x128", 85),
            ("chase_db1", "CHASE_DB1", "128x128", 85), ("hrf", "HRF", "256x256", 170)]
HEADS = [("fcn", "FCN"), ("pspnet", "PSPNet"), ("deeplabv3", "DeepLabV3")]
# SPEC §1 "Published results" (mmseg, V100): vessel Dice for CE and CE + Dice loss, and the
# training memory published for the FCN rows
PUBLISHED_DICE = {
    "drive": {"fcn": (78.67, 79.32), "pspnet": (78.62, 79.42), "deeplabv3": (78.69, 79.56)},
    "stare": {"fcn": (81.02, 82.70), "pspnet": (81.22, 82.84), "deeplabv3": (80.93, 82.71)},
    "chase_db1": {"fcn": (80.24, 80.40), "pspnet": (80.36, 80.28), "deeplabv3": (80.47, 80.37)},
    "hrf": {"fcn": (79.45, 80.87), "pspnet": (80.07, 80.96), "deeplabv3": (80.21, 80.71)},
}
PUBLISHED_MEM_FCN = {"drive": 0.680, "stare": 0.968, "chase_db1": 0.968, "hrf": 2.525}
MODES = ("slide", "overlap-tile", "whole")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
# Targets set by the project's issues, shown next to what was measured
# The issues' speed and memory targets (issues 4, 5 and 7)
TARGET_DRIVE_FP32_SPEEDUP = 50.0     # GPU, slide fp32 vs the eager reference loop
TARGET_HRF_BF16_MEMORY_GB = 4.0
TARGET_DRIVE_BF16_IMAGES = 200.0
TARGET_HRF_BF16_IMAGES = 5.0
TARGET_TRAIN_MEMORY_RATIO = 0.6      # GPU fused training step vs unfused, activation memory
TARGET_BLOCK_VS_CONV = 1.10          # GPU fp16/bf16 fused inference block vs cuDNN conv alone
TARGET_CPU_SLIDE_SPEEDUP = 1.7
TARGET_CPU_FAST_SPEEDUP = 3.5        # overlap-tile and whole
TARGET_CPU_FUSED_VS_CONV = 1.15
TARGET_CPU_TRAIN_SPEEDUP = 1.3
TARGET_AGG_SPEEDUP = 5.0
TARGET_AGG_OVER_BOUND = 2.0


# ------------------------------------------------------------------------------------- input
class Run:
    """One results folder: its benchmarks, and the device, date and software they ran with."""

    def __init__(self, folder):
        self.folder = folder
        self.name = os.path.basename(os.path.normpath(folder))
        self.benchmarks, self.machines, self.peaks = [], {}, {}
        self.device_json = {}
        path = os.path.join(folder, "device.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.device_json = json.load(f)
        self.files, self.load = [], None
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or "benchmarks" not in data:
                continue
            self.files.append(os.path.relpath(path, ROOT))
            block = data.get("fastunet", {})
            self.machines.update(block.get("machines", {}))
            if block.get("load_average_start") and not self.load:
                self.load = (block["load_average_start"][0], block["load_average_end"][0])
            for kind, peaks in block.get("peaks", {}).items():
                self.peaks.setdefault(kind, peaks)
            for b in data["benchmarks"]:
                b = dict(b, _datetime=data.get("datetime", ""))
                self.benchmarks.append(b)

    def peak(self, kind, precision):
        """The run's measured peak TFLOP/s for a precision on a device: the highest of the
        session probe (benchmarks/conftest.py) and the matmul rates its benchmarks recorded
        (one peak per run keeps every fraction on the same scale)."""
        rates = [self.peaks.get(kind, {}).get(f"peak_{precision}_tflops")]
        for b in self.benchmarks:
            if device_kind(b) != kind:
                continue
            info = b.get("extra_info", {})
            rates.append(info.get(f"matmul_{precision}_tflops"))
            if precision == "fp32":
                rates.append(info.get("matmul_tflops"))
            if info.get("peak_dtype") == precision:
                rates.append(info.get("peak_tflops"))
        rates = [r for r in rates if isinstance(r, (int, float))]
        return max(rates) if rates else None

    def device(self, kind):
        """The name of the device of this kind that the run measured."""
        if kind in self.machines:
            return self.machines[kind]["device"]
        if kind == "cuda" and self.device_json.get("device"):
            return self.device_json["device"]
        for b in self.benchmarks:
            if device_kind(b) == kind and b.get("extra_info", {}).get("device"):
                return b["extra_info"]["device"]
        return None

    def date(self, kind=None):
        for source in (self.machines.get(kind or "", {}), self.device_json):
            if source.get("date"):
                return source["date"]
        dates = sorted(b["_datetime"][:10] for b in self.benchmarks if b["_datetime"])
        return dates[-1] if dates else ""

    def software(self, kind):
        info = self.machines.get(kind) or (self.device_json if kind == "cuda" else {})
        parts = [f"torch {info['torch']}"] if info.get("torch") else []
        if kind == "cuda" and info.get("cuda"):
            parts.append(f"CUDA {info['cuda']}")
        if kind == "cpu" and info.get("threads"):
            parts.append(f"{info['threads']} threads")
        if kind == "cpu" and self.load:
            parts.append(f"load average {self.load[0]:.1f} -> {self.load[1]:.1f}")
        return ", ".join(parts)


def device_kind(bench):
    return "cuda" if "cuda" in bench["name"] else "cpu"


def short_name(device):
    """'NVIDIA H100 80GB HBM3' -> 'H100'; CPUs keep their model name."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", device or "")
    if device and device.startswith("NVIDIA") and m:
        return m.group(1)
    return device or "?"


def load_runs(results=RESULTS):
    runs = [Run(d) for d in sorted(glob.glob(os.path.join(results, "*", "")))]
    return [r for r in runs if r.benchmarks]


def latest_by_device(runs):
    """{(kind, device name): newest Run that measured it}, GPUs first, then CPUs."""
    best = {}
    for run in runs:
        for kind in ("cuda", "cpu"):
            if not any(device_kind(b) == kind for b in run.benchmarks):
                continue
            key = (kind, run.device(kind))
            if key not in best or (run.date(kind), run.name) > (best[key].date(kind),
                                                                best[key].name):
                best[key] = run
    return dict(sorted(best.items(), key=lambda kv: (kv[0][0] != "cuda", str(kv[0][1]))))


def _func(bench):
    return bench["name"].split("[")[0]


def _file(bench):
    return bench["fullname"].split("::")[0]


def command(bench, whole_function=False):
    """The pytest command that reruns a benchmark (or all cases of its function)."""
    target = bench["fullname"]
    if whole_function:
        target = target.split("[")[0]
    return f"pytest '{target}' --benchmark-only -s"


# ------------------------------------------------------------------------ inference figures
def inference_figures(run, kind):
    """{(dataset, head, mode, precision): figure dict} of a run's inference results on a device.

    bench_configs.py results are used as they are; bench_inference.py's (DRIVE and HRF, FCN)
    fill keys that bench_configs.py did not measure."""
    found, fallback = {}, {}
    for b in run.benchmarks:
        if device_kind(b) != kind:
            continue
        info, func = b.get("extra_info", {}), _func(b)
        if _file(b).endswith("bench_configs.py") and func == "test_inference":
            key = (info["dataset"], info["head"], info["mode"], info["precision"])
            found[key] = dict(
                images_per_s=info["images_per_s"], derived=bool(info.get("derived")),
                speedup=info.get("speedup_vs_reference"),
                reference_images_per_s=info.get("reference_images_per_s"),
                reference_derived=bool(info.get("reference_derived")),
                gflop=info.get("gflop"), tflops=info.get("tflops"),
                peak_tflops=info.get("peak_tflops"), peak_dtype=info.get("peak_dtype"),
                memory_GiB=info.get("peak_memory_GiB", info.get("peak_rss_GiB")), bench=b,
                reference_s=info.get("reference_s"), reference_gflop=info.get("reference_gflop"))
        elif _file(b).endswith("bench_inference.py"):
            fig = _inference_py_figure(b, func, info)
            if fig:
                fallback.setdefault(fig.pop("key"), fig)
    for key, fig in fallback.items():
        found.setdefault(key, fig)
    for (_, _, _, precision), fig in found.items():
        precision = "bf16" if precision == "fp16" else precision
        fig["peak_tflops"] = run.peak(kind, precision)
        fig["peak_dtype"] = precision if fig["peak_tflops"] else None
    return found


def _inference_py_figure(b, func, info):
    param = b.get("param") or ""
    if func == "test_cpu_drive":
        return dict(key=("drive", "fcn", param, "fp32"), images_per_s=1 / info["ours_s"],
                    derived=False, speedup=info.get("speedup"),
                    reference_images_per_s=1 / info["reference_s"], gflop=info.get("gflop"),
                    tflops=info["gflop"] / 1e3 / info["ours_s"] if "gflop" in info else None,
                    peak_tflops=info.get("matmul_tflops"), peak_dtype="fp32",
                    memory_GiB=None, bench=b, reference_s=info.get("reference_s"),
                    reference_gflop=None,
                    # runs before the reference was made unfused timed it on fused blocks
                    reference_modules=info.get("reference_modules", "fused"))
    if func == "test_cuda_drive_slide_fp32_vs_reference":
        seconds = min(info["eager_s"], info["graphs_s"])
        return dict(key=("drive", "fcn", "slide", "fp32"), images_per_s=1 / seconds,
                    derived=False, speedup=info.get("speedup"),
                    reference_images_per_s=1 / info["reference_s"], tflops=info.get("tflops"),
                    gflop=info["tflops"] * 1e3 * seconds if "tflops" in info else None,
                    peak_tflops=info.get("matmul_fp32_tflops"), peak_dtype="fp32",
                    memory_GiB=None, bench=b, reference_s=info["reference_s"],
                    reference_gflop=info["tflops"] * 1e3 * seconds if "tflops" in info else None,
                    reference_modules=info.get("reference_modules", "fused"))
    if func == "test_cuda_drive_bf16_images_per_second":
        return dict(key=("drive", "fcn", param, "bf16"), images_per_s=info["images_per_s"],
                    derived=False, speedup=None, reference_images_per_s=None,
                    tflops=info.get("tflops"), peak_tflops=info.get("matmul_bf16_tflops"),
                    peak_dtype="bf16", gflop=info["tflops"] * 1e3 / info["images_per_s"]
                    if "tflops" in info else None, memory_GiB=None, bench=b)
    if func == "test_cuda_hrf_images_per_second_and_memory":
        precision = "tf32" if param == "fp32" and info.get("cudnn_tf32") else param
        return dict(key=("hrf", "fcn", "slide", precision), images_per_s=info["images_per_s"],
                    derived=False, speedup=None, reference_images_per_s=None,
                    tflops=info.get("tflops"), peak_tflops=None, peak_dtype=None,
                    gflop=info["tflops"] * 1e3 / info["images_per_s"] if "tflops" in info
                    else None, memory_GiB=info.get("peak_memory_GiB"), bench=b)
    return None


# ------------------------------------------------------------------------------- formatting
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


# ----------------------------------------------------------------------------------- tables
def _columns(figures):
    """(mode, precision) pairs measured, in a fixed order."""
    pairs = {(k[2], k[3]) for k in figures}
    return [(m, p) for m in MODES for p in PRECISIONS if (m, p) in pairs]


def published_table(devices):
    """The published table's rows with our fps per GPU, mode and precision."""
    gpu = [(key, run, inference_figures(run, "cuda")) for key, run in devices.items()
           if key[0] == "cuda"]
    header = ["Dataset", "Head", "Crop / stride", "Dice (CE)", "Dice (CE+Dice)",
              "Train mem (GB), FCN"]
    columns = []
    for (kind, name), run, figs in gpu:
        for mode, precision in _columns(figs):
            header.append(f"{short_name(name)} {mode} {precision} (img/s)")
            columns.append((figs, mode, precision))
    rows = []
    for ds, ds_name, crop, stride in DATASETS:
        for head, head_name in HEADS:
            ce, ce_dice = PUBLISHED_DICE[ds][head]
            row = [ds_name, head_name, f"{crop} / {stride}", f"{ce:.2f}", f"{ce_dice:.2f}",
                   f"{PUBLISHED_MEM_FCN[ds]:.3f}" if head == "fcn" else ""]
            row += [fps_cell(figs.get((ds, head, mode, precision)))
                    for figs, mode, precision in columns]
            rows.append(row)
    notes = []
    for (kind, name), run, figs in gpu:
        notes.append(f"{name}: {run.software('cuda')}, {run.date('cuda')}, "
                     f"`{_source(run)}`; reproduce with `bash benchmarks/run_gpu.sh`.")
    return table(header, rows), notes


def _source(run):
    return os.path.relpath(run.folder, ROOT).rstrip("/") + "/"


def device_table(run, kind):
    """Per config: our images/s per mode and precision, the reference's, the speedup, FLOPs,
    achieved TFLOP/s and the fraction of the measured peak, memory."""
    figs = inference_figures(run, kind)
    if not figs:
        return None
    header = ["Dataset", "Head", "Mode", "Precision", "img/s", "Reference img/s",
              "vs reference", "GFLOP / img", "TFLOP/s", "of peak", "Peak mem (GiB)"]
    rows = []
    for ds, ds_name, _, _ in DATASETS:
        for head, head_name in HEADS:
            for mode in MODES:
                for precision in PRECISIONS:
                    fig = figs.get((ds, head, mode, precision))
                    if not fig:
                        continue
                    ref = fig.get("reference_images_per_s")
                    frac = (fig["tflops"] / fig["peak_tflops"] if fig.get("tflops") and
                            fig.get("peak_tflops") else None)
                    rows.append([ds_name, head_name, mode, precision, fps_cell(fig),
                                 num(ref) + (DERIVED if ref and fig.get("reference_derived")
                                             else ""),
                                 speed_ratio(fig.get("speedup")), num(fig.get("gflop")),
                                 num(fig.get("tflops")),
                                 f"{frac:.0%}" if frac is not None else "",
                                 num(fig.get("memory_GiB"))])
    return table(header, rows)


def ratio_rows(run, kind):
    """Key ratios measured in one run on one device: (comparison, value, detail, command)."""
    rows = []

    def infos(file, func):
        return _benches(run, kind, file, func)

    for b, i in infos("bench_conv_bn_relu.py", "test_cpu_inference_unet"):
        rows.append((f"Fused vs unfused Conv-BN-ReLU, UNet inference ({i.get('layout')}, "
                     f"batch {i.get('batch')} x 64x64, fp32)",
                     speed_ratio(1 / i["fused_vs_unfused"]),
                     f"fused {num(i['fused_s'] * 1e3)} ms, unfused {num(i['unfused_s'] * 1e3)} "
                     f"ms, convolutions alone {num(i['conv_only_s'] * 1e3)} ms", command(b)))
    block = infos("bench_conv_bn_relu.py", "test_cuda_inference_block_vs_cudnn_conv")
    if block:
        rows.append(("Fused Conv-BN-ReLU block vs unfused, inference (64->64 ch, 16 x 64x64, "
                     f"fp16/bf16 x NCHW/NHWC: {len(block)} cases)",
                     speed_span([1 / i["fused_vs_unfused"] for _, i in block]),
                     "vs cuDNN convolution alone: "
                     + speed_span([1 / i["fused_vs_conv_only"] for _, i in block]),
                     command(block[0][0], True)))
    for b, i in infos("bench_conv_bn_relu.py", "test_cuda_train_step_amp_bf16"):
        rows.append((f"Fused vs unfused training step, AMP bf16, batch {i['batch']} x 64x64",
                     speed_ratio(1 / i["step_time_ratio"]),
                     f"activation memory {num(i['peak_activation_ratio'])}x the unfused "
                     f"({num(i['peak_activation_mib_fused'])} vs "
                     f"{num(i['peak_activation_mib_unfused'])} MiB)", command(b)))
    for b, i in infos("bench_train.py", "test_cpu_iteration"):
        rss = f"; process peak RSS {num(i['peak_rss_GiB'])} GiB" if "peak_rss_GiB" in i else ""
        for key, layout in (("fused_speedup", "NCHW"), ("fused_channels_last_speedup",
                                                        "fused channels-last vs unfused NCHW")):
            if key in i:
                conv = (f"; the unfused step's convolutions alone take "
                        f"{num(100 * i['conv_share_of_reference'])}% of it"
                        if "conv_share_of_reference" in i else "")
                rows.append((f"Fused vs unfused training iteration (FCN, batch 4 x 64x64, fp32, "
                             f"{layout})", speed_ratio(i[key]),
                             f"unfused {num(i['unfused_s'])} s per iteration" + conv + rss,
                             command(b)))
    for b, i in infos("bench_train.py", "test_cpu_fused_auto"):
        rows.append(("Fused vs plain modules, training iteration as the CLI runs on CPU "
                     "(channels_last, fp32): synthetic default / full-width FCN",
                     f"{speed_ratio(i['synthetic_fused_speedup'])} / "
                     f"{speed_ratio(i['fcn_fused_speedup'])}",
                     f"synthetic {num(i['synthetic_fused_s'] * 1e3)} vs "
                     f"{num(i['synthetic_unfused_s'] * 1e3)} ms, FCN "
                     f"{num(i['fcn_fused_s'])} vs {num(i['fcn_unfused_s'])} s; --fused auto "
                     "picks plain for the narrow synthetic model, fused for full width",
                     command(b)))
    for b, i in infos("bench_train.py", "test_cpu_data_vs_model"):
        if "pipeline_over_fcn_model" in i:
            rows.append(("Training data pipeline vs what the FCN model consumes (one process)",
                         f"{num(i['pipeline_over_fcn_model'])}x",
                         f"{num(i['pipeline_samples_per_s'])} vs "
                         f"{num(i['fcn_model_samples_per_s'])} samples/s", command(b)))
    for b, i in infos("bench_train.py", "test_cuda_recipe"):
        if "recipe_peak_gb" in i and "reference_peak_gb" in i:
            rows.append(("Training recipe (bf16, channels-last, fused) vs fp32 eager unfused, "
                         "batch 16 x 64x64", speed_ratio(i.get("speedup")),
                         f"peak memory {num(i['recipe_peak_gb'])} vs "
                         f"{num(i['reference_peak_gb'])} GiB "
                         f"({num(i['recipe_peak_gb'] / i['reference_peak_gb'])}x)"
                         + (f"; 40k DRIVE iterations in {num(i['drive_40k_hours_recipe'])} h"
                            if "drive_40k_hours_recipe" in i else ""), command(b)))
    for b, i in infos("bench_train.py", "test_cuda_deterministic"):
        if "deterministic_cost" in i:
            rows.append(("Cost of --deterministic training (batch 16, bf16 recipe)",
                         f"{num(i['deterministic_cost'])}x the time",
                         f"{num(i['default_it_per_s'])} vs {num(i['deterministic_it_per_s'])} "
                         "it/s", command(b)))
    figs = inference_figures(run, kind)
    slide = [(k, f) for k, f in figs.items() if k[2] == "slide" and k[3] == "fp32"
             and f.get("speedup")]
    configs = [f for k, f in slide if _file(f["bench"]).endswith("bench_configs.py")]
    if configs:
        rows.append((f"Inference engine (slide, exact) vs mmseg's loop, fp32, "
                     f"{len(configs)} config{'s' if len(configs) > 1 else ''}", speed_span([f["speedup"] for f in configs]),
                     "reference: one window per forward, unfused modules"
                     + ("; some figures derived" + DERIVED if any(
                         f["derived"] or f["reference_derived"] for f in configs) else ""),
                     command(configs[0]["bench"], True)))
    for (ds, head, mode, precision), fig in sorted(figs.items()):
        if _file(fig["bench"]).endswith("bench_inference.py") and fig.get("speedup"):
            rows.append((f"Inference engine ({mode}) vs the one-window-per-forward loop, "
                         f"DRIVE, FCN, {precision}", speed_ratio(fig["speedup"]),
                         f"{num(fig['images_per_s'])} vs {num(fig['reference_images_per_s'])} "
                         f"img/s (reference: {fig.get('reference_modules', 'fused')} "
                         "modules)",
                         command(fig["bench"])))
    for b, i in infos("bench_tile.py", "test_tile_aggregate"):
        case = (b.get("param") or "").split("-")[0].upper()
        rows.append((f"Tile aggregation vs mmseg's pad-and-add, {case} "
                     f"({i['windows']} windows)", speed_ratio(i["speedup_vs_pad_and_add"]),
                     f"{num(i['op_ms'])} ms; {num(i['op_over_bound'])}x the bandwidth bound "
                     f"({num(i['bound_ms'])} ms at {num(i['bandwidth_GBps'])} GB/s)",
                     command(b)))
    return rows


def roofline_rows(run, kind):
    """(case, precision, achieved TFLOP/s, peak TFLOP/s (dtype), fraction) for inference."""
    rows = []
    for (ds, head, mode, precision), fig in sorted(inference_figures(run, kind).items()):
        if not fig.get("tflops"):
            continue
        peak = fig.get("peak_tflops")
        rows.append([f"{ds.upper() if ds != 'chase_db1' else 'CHASE_DB1'} {head} {mode}"
                     + (DERIVED if fig.get("derived") else ""), precision, num(fig["tflops"]),
                     f"{num(peak)} ({fig.get('peak_dtype')})" if peak else "not measured",
                     f"{fig['tflops'] / peak:.0%}" if peak else ""])
    return rows


def roofline_summary(run, kind, device):
    """Per precision: the measured peak and the range of achieved rates and fractions."""
    rows = []
    figs = inference_figures(run, kind)
    for precision in PRECISIONS:
        cases = [f for k, f in figs.items() if k[3] == precision and f.get("tflops")]
        if not cases:
            continue
        peaks = sorted({f["peak_tflops"] for f in cases if f.get("peak_tflops")})
        rows.append([device, precision, span(peaks) or "not measured",
                     span([f["tflops"] for f in cases]),
                     span([f["tflops"] / f["peak_tflops"] for f in cases if f.get("peak_tflops")],
                          lambda v: f"{v:.0%}"), str(len(cases))])
    return rows


def _roofline_note(fig, target):
    """'; Nx needs T TFLOP/s, Fx the measured peak': what a speedup target asks of the hardware
    (the case's own FLOPs in reference_s / target)."""
    if not (fig.get("reference_s") and fig.get("gflop")):
        return ""
    needed = target * fig["gflop"] / 1e3 / fig["reference_s"]
    peak = fig.get("peak_tflops")
    return (f"; {target:g}x needs {num(needed)} TFLOP/s"
            + (f", {num(needed / peak)}x the measured {fig.get('peak_dtype') or ''} peak "
               f"({num(peak)})".replace("  ", " ") if peak else ""))


def _benches(run, kind, file, func):
    """[(benchmark, its extra_info)] of test function `func` in benchmarks/`file` on a device."""
    return [(b, b.get("extra_info", {})) for b in run.benchmarks
            if device_kind(b) == kind and _file(b).split("/")[-1] == file and _func(b) == func]


def _infos(run, kind, file, func):
    return [i for _, i in _benches(run, kind, file, func)]


def target_rows(devices):
    """The issue targets that have a measured counterpart: (target, device, measured, verdict)."""
    rows = []

    def add(target, name, measured, ok):
        rows.append([target, short_name(name), measured, "met" if ok else "missed"])

    for (kind, name), run in devices.items():
        figs = inference_figures(run, kind)
        speed_targets = ([(("drive", "fcn", "slide", "fp32"), TARGET_DRIVE_FP32_SPEEDUP)]
                         if kind == "cuda" else
                         [(("drive", "fcn", "slide", "fp32"), TARGET_CPU_SLIDE_SPEEDUP),
                          (("drive", "fcn", "overlap-tile", "fp32"), TARGET_CPU_FAST_SPEEDUP),
                          (("drive", "fcn", "whole", "fp32"), TARGET_CPU_FAST_SPEEDUP)])
        for key, target in speed_targets:
            fig = figs.get(key)
            if fig and fig.get("speedup"):
                add(f"DRIVE {key[2]} fp32 >= {target:g}x the eager reference loop", name,
                    f"{num(fig['speedup'])}x" + _roofline_note(fig, target),
                    fig["speedup"] >= target)
        if kind == "cuda":
            drive = {m: figs[("drive", "fcn", m, "bf16")]["images_per_s"]
                     for m in ("slide", "overlap-tile", "whole")
                     if ("drive", "fcn", m, "bf16") in figs}
            if drive:
                add(f"DRIVE bf16 >= {TARGET_DRIVE_BF16_IMAGES:g} images/s", name,
                    ", ".join(f"{m} {num(v)}" for m, v in drive.items()),
                    max(drive.values()) >= TARGET_DRIVE_BF16_IMAGES)
            fig = figs.get(("hrf", "fcn", "slide", "bf16"))
            if fig:
                add(f"HRF slide bf16 >= {TARGET_HRF_BF16_IMAGES:g} images/s", name,
                    num(fig["images_per_s"]), fig["images_per_s"] >= TARGET_HRF_BF16_IMAGES)
            if fig and fig.get("memory_GiB") is not None:
                gb = fig["memory_GiB"] * 2**30 / 1e9
                add(f"HRF slide bf16 peak memory <= {TARGET_HRF_BF16_MEMORY_GB:g} GB", name,
                    f"{num(gb)} GB ({num(fig['memory_GiB'])} GiB)",
                    gb <= TARGET_HRF_BF16_MEMORY_GB)
            for i in _infos(run, kind, "bench_conv_bn_relu.py", "test_cuda_train_step_amp_bf16"):
                add(f"Fused training step, AMP bf16, batch {i['batch']}: activation memory <= "
                    f"{TARGET_TRAIN_MEMORY_RATIO:g}x unfused, time no slower", name,
                    f"{num(i['peak_activation_ratio'])}x memory, "
                    f"{num(i['step_time_ratio'])}x time",
                    i["peak_activation_ratio"] <= TARGET_TRAIN_MEMORY_RATIO
                    and i["step_time_ratio"] <= 1.0)
            block = _infos(run, kind, "bench_conv_bn_relu.py",
                           "test_cuda_inference_block_vs_cudnn_conv")
            if block:
                worst = max(i["fused_vs_conv_only"] for i in block)
                add(f"fp16/bf16 fused inference blocks within {TARGET_BLOCK_VS_CONV - 1:.0%} of "
                    "cuDNN convolution alone", name, f"up to {num(worst)}x its time",
                    worst <= TARGET_BLOCK_VS_CONV)
        else:
            for i in _infos(run, kind, "bench_conv_bn_relu.py", "test_cpu_inference_unet"):
                if i.get("layout") != "contiguous":
                    continue
                add("Fused UNet inference (NCHW input) no slower than unfused and within "
                    f"{TARGET_CPU_FUSED_VS_CONV - 1:.0%} of the convolutions alone", name,
                    f"{num(i['fused_vs_unfused'])}x unfused, {num(i['fused_vs_conv_only'])}x "
                    "conv-only time", i["fused_vs_unfused"] <= 1.0
                    and i["fused_vs_conv_only"] <= TARGET_CPU_FUSED_VS_CONV)
            for i in _infos(run, kind, "bench_train.py", "test_cpu_iteration"):
                if "cli_cpu_recipe_speedup" in i:
                    cap = (f"; convolutions alone are {num(100 * i['conv_share_of_reference'])}%"
                           f" of the reference step, so fusing the rest gives at most "
                           f"{num(1 / i['conv_share_of_reference'])}x"
                           if i.get("conv_share_of_reference") else "")
                    add(f"Training iteration (FCN, batch 4) >= {TARGET_CPU_TRAIN_SPEEDUP:g}x the "
                        "eager unfused reference", name,
                        f"{num(i['cli_cpu_recipe_speedup'])}x" + cap,
                        i["cli_cpu_recipe_speedup"] >= TARGET_CPU_TRAIN_SPEEDUP)
        for i in _infos(run, kind, "bench_tile.py", "test_tile_aggregate"):
            if i.get("windows") == 294:  # the HRF case the target names
                add(f"HRF aggregation >= {TARGET_AGG_SPEEDUP:g}x pad-and-add and within "
                    f"{TARGET_AGG_OVER_BOUND:g}x the bandwidth bound", name,
                    f"{num(i['speedup_vs_pad_and_add'])}x, {num(i['op_over_bound'])}x the bound",
                    i["speedup_vs_pad_and_add"] >= TARGET_AGG_SPEEDUP
                    and i["op_over_bound"] <= TARGET_AGG_OVER_BOUND)
    return rows


# ------------------------------------------------------------------------------------ output
def readme_section(results=RESULTS):
    """The README's performance section (between the markers), from the results folders."""
    runs = load_runs(results)
    devices = latest_by_device(runs)
    out = ["Generated by `python benchmarks/report.py --write-readme` from "
           "`benchmarks/results/`; do not edit by hand. Every speed is measured in one run "
           "against a reference in the same run; blank: not measured on that device. "
           f"{DERIVED}: derived from a measured subset of windows and the image's exact window "
           "count (see the CPU notes).", ""]
    published, notes = published_table(devices)
    out += ["### Published configs: accuracy (mmseg, published) and inference speed "
            "(fastunet, measured)", "", published, ""]
    out += [f"- {n}" for n in notes]
    out += ["- Images/s of one image at a time, random weights, after warm-up; `slide` is "
            "mmseg's exact algorithm, `overlap-tile` and `whole` the fast modes "
            "(`python -m fastunet.predict --mode`). fp32 runs with TF32 off unless marked tf32.",
            ""]
    for (kind, name), run in devices.items():
        body = device_table(run, kind)
        if body is None:
            continue
        out += [f"### Inference per config on {name}", "",
                f"{run.software(kind)}, {run.date(kind)}, `{_source(run)}`. "
                "Reproduce: `pytest benchmarks/bench_configs.py benchmarks/bench_inference.py "
                f"--benchmark-only -s{' -m cuda' if kind == 'cuda' else ''}`.", "", body, ""]
        if kind == "cpu":
            out += [f"{DERIVED} CPU: whole images are timed for DRIVE; elsewhere images/s = "
                    "windows/s of one engine batch (the batch size the engine uses on the "
                    "whole image) / the image's window count, and the reference's per-window "
                    "time is measured on 1-4 windows (best of 2). On a CPU shared with other "
                    "jobs (see the load average) single timings vary by up to 2x and the "
                    "matmul/conv probe that sets the peak does too: a fraction of peak above "
                    "100% means the case ran while the machine was less loaded than during "
                    "the probe. Peak mem on a CPU is the process's peak RSS. DRIVE FCN "
                    "overlap-tile / whole come from bench_inference.py.", ""]
    rows = []
    for (kind, name), run in devices.items():
        rows += [[c, short_name(name), run.date(kind), v, d, f"`{cmd}`"]
                 for c, v, d, cmd in ratio_rows(run, kind)]
    if rows:
        out += ["### Key ratios", "", table(["Comparison", "Device", "Date", "Measured",
                                             "Detail", "Command"], rows), ""]
    rows = []
    for (kind, name), run in devices.items():
        rows += roofline_summary(run, kind, short_name(name))
    if rows:
        out += ["### Roofline: achieved vs measured peak", "",
                "Model FLOPs per image (counted with torch.utils.flop_counter: 6.32 GFLOP per "
                "64x64 FCN window) over the measured time, against the highest matrix-multiply / "
                "convolution throughput measured in the same run in that precision (per-case "
                "figures in the tables above and in each results folder's summary.md).", "",
                table(["Device", "Precision", "Measured peak TFLOP/s", "Achieved TFLOP/s",
                       "Fraction of peak", "Cases"], rows), ""]
    rows = target_rows(devices)
    if rows:
        out += ["### Targets", "", table(["Target", "Device", "Measured", "Status"], rows), ""]
    return "\n".join(out).rstrip() + "\n"


def summary(folder):
    """Markdown summary of one results folder (what run_gpu.sh prints and saves)."""
    run = Run(folder)
    out = []
    kinds = [k for k in ("cuda", "cpu") if any(device_kind(b) == k for b in run.benchmarks)]
    if not run.benchmarks:
        name = run.device_json.get("device", "?")
        return f"# Results: {name}\n\nno benchmark JSON (benchmarks did not finish)\n"
    for kind in kinds:
        name = run.device(kind)
        out += [f"# Results: {name} ({run.software(kind)}, {run.date(kind)})", ""]
        peaks = run.peaks.get(kind)
        if peaks:
            out += ["Measured peaks: " + ", ".join(f"{k}={num(v)}" for k, v in peaks.items()),
                    ""]
        body = device_table(run, kind)
        if body:
            out += ["## Inference per config and mode", "", body, ""]
        rows = [[c, v, d] for c, v, d, _ in ratio_rows(run, kind)]
        if rows:
            out += ["## Key ratios", "", table(["Comparison", "Measured", "Detail"], rows), ""]
        rows = roofline_rows(run, kind)
        if rows:
            out += ["## Roofline", "", table(["Case", "Precision", "TFLOP/s", "Peak", "Fraction"],
                                             rows), ""]
        if kind == "cuda":
            rows = target_rows({("cuda", name): run})
            if rows:
                out += ["## Targets", "", table(["Target", "Device", "Measured", "Status"], rows),
                        ""]
    out += ["## Every benchmark", "", table(
        ["benchmark", "min ms", "details"],
        [[b["name"], f"{b['stats']['min'] * 1e3:.3f}",
          ", ".join(f"{k}={num(v) if isinstance(v, float) else v}"
                    for k, v in b.get("extra_info", {}).items() if k != "device")]
         for b in run.benchmarks])]
    return "\n".join(out).rstrip() + "\n"


def replace_section(text, section):
    """text with the part between the perf markers replaced by section."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the lines {BEGIN} and {END} (in this order)")
    return text[:start + len(BEGIN)] + "\n" + section + text[end:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=RESULTS, help="results root (default: %(default)s)")
    parser.add_argument("--readme", default=README, help="README to check or rewrite")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write-readme", action="store_true", help="rewrite the README section")
    group.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    group.add_argument("--summary", metavar="DIR", help="summarise one results folder")
    args = parser.parse_args(argv)
    if args.summary:
        sys.stdout.write(summary(args.summary))
        return 0
    section = readme_section(args.results)
    if not (args.write_readme or args.check):
        sys.stdout.write(section)
        return 0
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    new = replace_section(text, section)
    if args.check:
        if new != text:
            print(f"{args.readme}: the performance section differs from the results; run "
                  "python benchmarks/report.py --write-readme", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"wrote the performance section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

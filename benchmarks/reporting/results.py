"""Results folders: their benchmarks, device, date and software, and the inference figures
(images/s, speedups, FLOPs) read from them.

A folder holds pytest-benchmark JSON files (``--benchmark-json``; CPU runs and GPU runs before
benchmarks/gpu_run.py) and/or one ``gpu_run.json`` written by benchmarks/gpu_run.py."""
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
GPU_RUN_SCHEMA = "fastunet-gpu-run/1"


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
        self.gpu_run = None  # benchmarks/gpu_run.py's JSON (its dry runs are not results)
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if (isinstance(data, dict) and data.get("schema") == GPU_RUN_SCHEMA
                    and not data.get("dry_run") and data.get("device_type") == "cuda"):
                self.gpu_run = data
                self.files.append(os.path.relpath(path, ROOT))
                continue
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

    def section(self, name):
        """A gpu_run.json section's results ({} when absent; a section that ran out of time
        keeps the cases it finished)."""
        if not self.gpu_run:
            return {}
        return self.gpu_run.get("sections", {}).get(name, {}).get("result") or {}

    def kinds(self):
        """The device kinds ("cuda", "cpu") this run measured."""
        found = {device_kind(b) for b in self.benchmarks}
        if self.gpu_run:
            found.add("cuda")
        return found

    def peak(self, kind, precision):
        """The run's measured peak TFLOP/s for a precision on a device: the highest of the
        session probe (benchmarks/conftest.py) and the matmul rates its benchmarks recorded
        (one peak per run keeps every fraction on the same scale)."""
        rates = [self.peaks.get(kind, {}).get(f"peak_{precision}_tflops")]
        if kind == "cuda":
            rates.append(self.section("environment").get(f"matmul_{precision}_tflops"))
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
        if kind == "cuda" and self.section("environment").get("device"):
            return self.section("environment")["device"]
        if kind == "cuda" and self.device_json.get("device"):
            return self.device_json["device"]
        for b in self.benchmarks:
            if device_kind(b) == kind and b.get("extra_info", {}).get("device"):
                return b["extra_info"]["device"]
        return None

    def date(self, kind=None):
        for source in (self.machines.get(kind or "", {}), self.section("environment"),
                       self.device_json):
            if source.get("date"):
                return source["date"]
        dates = sorted(b["_datetime"][:10] for b in self.benchmarks if b["_datetime"])
        return dates[-1] if dates else ""

    def software(self, kind):
        info = self.machines.get(kind) or (
            (self.section("environment") or self.device_json) if kind == "cuda" else {})
        parts = [f"torch {info['torch']}"] if info.get("torch") else []
        if kind == "cuda" and info.get("cuda"):
            parts.append(f"CUDA {info['cuda']}")
        if kind == "cuda" and info.get("cudnn"):
            parts.append(f"cuDNN {info['cudnn']}")
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
    return [r for r in runs if r.benchmarks or r.gpu_run]


def latest_by_device(runs):
    """{(kind, device name): newest Run that measured it}, GPUs first, then CPUs."""
    best = {}
    for run in runs:
        for kind in ("cuda", "cpu"):
            if kind not in run.kinds():
                continue
            key = (kind, run.device(kind))
            if key not in best or (run.date(kind), run.name) > (best[key].date(kind),
                                                                best[key].name):
                best[key] = run
    return dict(sorted(best.items(), key=lambda kv: (kv[0][0] != "cuda", str(kv[0][1]))))


def bench_func(bench):
    return bench["name"].split("[")[0]


def bench_file(bench):
    return bench["fullname"].split("::")[0]


def command(bench, whole_function=False):
    """The pytest command that reruns a benchmark (or all cases of its function)."""
    target = bench["fullname"]
    if whole_function:
        target = target.split("[")[0]
    return f"pytest '{target}' --benchmark-only -s"


def benches(run, kind, file, func):
    """[(benchmark, its extra_info)] of test function `func` in benchmarks/`file` on a device."""
    return [(b, b.get("extra_info", {})) for b in run.benchmarks
            if device_kind(b) == kind and bench_file(b).split("/")[-1] == file
            and bench_func(b) == func]


def infos_of(run, kind, file, func):
    return [i for _, i in benches(run, kind, file, func)]


# ------------------------------------------------------------------------ inference figures
def inference_figures(run, kind):
    """{(dataset, head, mode, precision): figure dict} of a run's inference results on a device.

    bench_configs.py results are used as they are; bench_inference.py's (DRIVE and HRF, FCN)
    fill keys that bench_configs.py did not measure."""
    found, fallback = {}, {}
    for b in run.benchmarks:
        if device_kind(b) != kind:
            continue
        info, func = b.get("extra_info", {}), bench_func(b)
        if bench_file(b).endswith("bench_configs.py") and func == "test_inference":
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
        elif bench_file(b).endswith("bench_inference.py"):
            fig = _inference_py_figure(b, func, info)
            if fig:
                fallback.setdefault(fig.pop("key"), fig)
    for key, fig in fallback.items():
        found.setdefault(key, fig)
    if kind == "cuda":
        for key, fig in gpu_run_inference_figures(run).items():
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



def gpu_run_inference_figures(run):
    """inference_figures' entries from a gpu_run.json (FCN, DRIVE and HRF, every mode)."""
    section = run.section("inference")
    reference = section.get("reference") or {}
    found = {}
    for case in section.get("cases", []):
        if "images_per_s" not in case or case.get("kernels", "default") != "default":
            continue  # the tables show what a user gets; forced-kernel cases are key ratios
        key = (case["dataset"], "fcn", case["mode"], case["precision"])
        ips = case["images_per_s"]
        is_reference_case = (key[0], key[2], key[3]) == (reference.get("dataset"),
                                                         reference.get("mode"),
                                                         reference.get("precision"))
        ref_ips = reference.get("images_per_s") if is_reference_case else None
        gflop = case.get("gflop")
        found[key] = dict(
            images_per_s=ips, derived=False, speedup=ips / ref_ips if ref_ips else None,
            reference_images_per_s=ref_ips, reference_derived=False, gflop=gflop,
            tflops=gflop * ips / 1e3 if gflop else None, peak_tflops=None, peak_dtype=None,
            memory_GiB=case.get("peak_memory_GiB"), bench=None,
            reference_s=1 / ref_ips if ref_ips else None, reference_gflop=gflop,
            reference_modules=reference.get("modules"), window_batch=case.get("window_batch"))
    return found

"""The README's tables: published configs with our speed, inference per config on a device,
key ratios and the roofline."""
import os

from .format import DERIVED, num, span, speed_ratio, speed_span, table, fps_cell
from .gpu_tables import COMMAND as GPU_RUN_COMMAND, gpu_ratio_rows
from .results import ROOT, bench_file, benches, command, inference_figures, short_name

DATASETS = [("drive", "DRIVE", "64x64", 42), ("stare", "STARE", "128x128", 85),
            ("chase_db1", "CHASE_DB1", "128x128", 85), ("hrf", "HRF", "256x256", 170)]
HEADS = [("fcn", "FCN"), ("pspnet", "PSPNet"), ("deeplabv3", "DeepLabV3")]
# mmseg's published results (V100; docs of its UNet configs): vessel Dice for CE and CE + Dice
# loss, and the training memory published for the FCN rows
PUBLISHED_DICE = {
    "drive": {"fcn": (78.67, 79.32), "pspnet": (78.62, 79.42), "deeplabv3": (78.69, 79.56)},
    "stare": {"fcn": (81.02, 82.70), "pspnet": (81.22, 82.84), "deeplabv3": (80.93, 82.71)},
    "chase_db1": {"fcn": (80.24, 80.40), "pspnet": (80.36, 80.28), "deeplabv3": (80.47, 80.37)},
    "hrf": {"fcn": (79.45, 80.87), "pspnet": (80.07, 80.96), "deeplabv3": (80.21, 80.71)},
}
PUBLISHED_MEM_FCN = {"drive": 0.680, "stare": 0.968, "chase_db1": 0.968, "hrf": 2.525}
MODES = ("slide", "overlap-tile", "whole")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


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
                     f"`{source(run)}`; reproduce with `bash benchmarks/run_gpu.sh`.")
    return table(header, rows), notes


def source(run):
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
        return benches(run, kind, file, func)

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
    configs = [f for k, f in slide if f["bench"] and
               bench_file(f["bench"]).endswith("bench_configs.py")]
    if configs:
        rows.append((f"Inference engine (slide, exact) vs mmseg's loop, fp32, "
                     f"{len(configs)} config{'s' if len(configs) > 1 else ''}",
                     speed_span([f["speedup"] for f in configs]),
                     "reference: one window per forward, unfused modules"
                     + ("; some figures derived" + DERIVED if any(
                         f["derived"] or f["reference_derived"] for f in configs) else ""),
                     command(configs[0]["bench"], True)))
    for (ds, head, mode, precision), fig in sorted(figs.items()):
        if not fig["bench"] and fig.get("speedup"):  # benchmarks/gpu_run.py
            rows.append((f"Inference engine ({mode}) vs the one-window-per-forward loop, "
                         f"{ds.upper()}, FCN, {precision}", speed_ratio(fig["speedup"]),
                         f"{num(fig['images_per_s'])} vs {num(fig['reference_images_per_s'])} "
                         f"img/s (reference: {fig.get('reference_modules')} modules)",
                         GPU_RUN_COMMAND))
        elif fig["bench"] and bench_file(fig["bench"]).endswith("bench_inference.py") \
                and fig.get("speedup"):
            rows.append((f"Inference engine ({mode}) vs the one-window-per-forward loop, "
                         f"DRIVE, FCN, {precision}", speed_ratio(fig["speedup"]),
                         f"{num(fig['images_per_s'])} vs {num(fig['reference_images_per_s'])} "
                         f"img/s (reference: {fig.get('reference_modules', 'fused')} "
                         "modules)",
                         command(fig["bench"])))
    rows += _peer_rows(infos)
    for b, i in infos("bench_tile.py", "test_tile_aggregate"):
        case = (b.get("param") or "").split("-")[0].upper()
        rows.append((f"Tile aggregation vs mmseg's pad-and-add, {case} "
                     f"({i['windows']} windows)", speed_ratio(i["speedup_vs_pad_and_add"]),
                     f"{num(i['op_ms'])} ms; {num(i['op_over_bound'])}x the bandwidth bound "
                     f"({num(i['bound_ms'])} ms at {num(i['bandwidth_GBps'])} GB/s)"
                     + (f"; into a reused output {num(i['op_out_ms'])} ms, "
                        f"{num(i['op_out_over_bound'])}x the bound" if "op_out_ms" in i else ""),
                     command(b)))
    if kind == "cuda":
        rows += gpu_ratio_rows(run)
    return rows


def _peer_rows(infos):
    """What a user could assemble from peers: MONAI's sliding_window_inference over the same fused
    network, and the engine in bf16 against mmseg's fp32 loop."""
    rows = []
    for b, i in infos("bench_inference.py", "test_cpu_drive_slide_vs_peers"):
        rows.append(("Inference engine (slide, exact) vs MONAI's sliding_window_inference over "
                     "the same fused network (batch 32), DRIVE, FCN, fp32",
                     speed_ratio(i["speedup_vs_monai32"]),
                     f"engine {num(i['engine_s'])} s, MONAI {num(i['monai32_s'])} s; at the "
                     f"engine's batch {speed_ratio(i['speedup_vs_monai_same_batch'])}; outputs "
                     f"agree to {num(i['monai_max_rel_difference'])} relative", command(b)))
        if "bf16_speedup_vs_reference" in i:
            rows.append(("Inference engine in bf16 (slide) vs mmseg's fp32 loop, DRIVE, FCN",
                         speed_ratio(i["bf16_speedup_vs_reference"]),
                         f"{speed_ratio(i['bf16_speedup_vs_fp32'])} than the fp32 engine; "
                         f"labels agree with fp32 on {num(100 * i['bf16_label_agreement'])}% "
                         "of pixels", command(b)))
    for b, i in infos("bench_inference.py", "test_cpu_hrf_slide_vs_monai"):
        rows.append(("Inference engine (slide, exact) vs MONAI's loop at the same batch, HRF "
                     "(quarter-width model), fp32", speed_ratio(i["speedup_vs_monai"]),
                     f"peak RSS growth {num(i['engine_peak_rss_growth_GiB'])} vs "
                     f"{num(i['monai_peak_rss_growth_GiB'])} GiB (the engine holds all "
                     "windows for one aggregation)", command(b)))
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


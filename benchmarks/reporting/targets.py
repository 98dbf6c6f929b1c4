"""The issues' speed and memory targets (issues 4, 5 and 7) next to what was measured."""
from .format import num
from .results import infos_of, inference_figures, short_name

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
                met = fig["speedup"] >= target  # a missed target says what it would take
                add(f"DRIVE {key[2]} fp32 >= {target:g}x the eager reference loop", name,
                    f"{num(fig['speedup'])}x" + ("" if met else _roofline_note(fig, target)),
                    met)
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
            for i in infos_of(run, kind, "bench_conv_bn_relu.py", "test_cuda_train_step_amp_bf16"):
                add(f"Fused training step, AMP bf16, batch {i['batch']}: activation memory <= "
                    f"{TARGET_TRAIN_MEMORY_RATIO:g}x unfused, time no slower", name,
                    f"{num(i['peak_activation_ratio'])}x memory, "
                    f"{num(i['step_time_ratio'])}x time",
                    i["peak_activation_ratio"] <= TARGET_TRAIN_MEMORY_RATIO
                    and i["step_time_ratio"] <= 1.0)
            block = infos_of(run, kind, "bench_conv_bn_relu.py",
                           "test_cuda_inference_block_vs_cudnn_conv")
            if block:
                worst = max(i["fused_vs_conv_only"] for i in block)
                add(f"fp16/bf16 fused inference blocks within {TARGET_BLOCK_VS_CONV - 1:.0%} of "
                    "cuDNN convolution alone", name, f"up to {num(worst)}x its time",
                    worst <= TARGET_BLOCK_VS_CONV)
        else:
            for i in infos_of(run, kind, "bench_conv_bn_relu.py", "test_cpu_inference_unet"):
                if i.get("layout") != "contiguous":
                    continue
                add("Fused UNet inference (NCHW input) no slower than unfused and within "
                    f"{TARGET_CPU_FUSED_VS_CONV - 1:.0%} of the convolutions alone", name,
                    f"{num(i['fused_vs_unfused'])}x unfused, {num(i['fused_vs_conv_only'])}x "
                    "conv-only time", i["fused_vs_unfused"] <= 1.0
                    and i["fused_vs_conv_only"] <= TARGET_CPU_FUSED_VS_CONV)
            for i in infos_of(run, kind, "bench_train.py", "test_cpu_iteration"):
                if "cli_cpu_recipe_speedup" in i:
                    share = i.get("conv_share_of_reference")
                    cap = (f"; convolutions alone are {num(100 * share)}% of the reference "
                           f"step, so fusing the rest gives at most {num(1 / share)}x"
                           if share else "")
                    if "cli_cpu_recipe_speedup_no_winograd" in i:  # convolutions made faster
                        cap = (f" ({num(i['cli_cpu_recipe_speedup_no_winograd'])}x with "
                               "FASTUNET_WINOGRAD=0" + cap.replace(";", ":", 1) + ")")
                    add(f"Training iteration (FCN, batch 4) >= {TARGET_CPU_TRAIN_SPEEDUP:g}x the "
                        "eager unfused reference", name,
                        f"{num(i['cli_cpu_recipe_speedup'])}x" + cap,
                        i["cli_cpu_recipe_speedup"] >= TARGET_CPU_TRAIN_SPEEDUP)
        for i in infos_of(run, kind, "bench_tile.py", "test_tile_aggregate"):
            if i.get("windows") == 294:  # the HRF case the target names
                # The bound's copy writes into a preallocated buffer; so does the op with out=
                # (as the engine reuses its aggregate), where the run measured it.
                reused = "op_out_over_bound" in i
                over = i["op_out_over_bound" if reused else "op_over_bound"]
                add(f"HRF aggregation >= {TARGET_AGG_SPEEDUP:g}x pad-and-add and within "
                    f"{TARGET_AGG_OVER_BOUND:g}x the bandwidth bound", name,
                    f"{num(i['speedup_vs_pad_and_add'])}x, {num(over)}x the bound"
                    + (f" into a reused output ({num(i['op_over_bound'])}x into a fresh one)"
                       if reused else ""),
                    i["speedup_vs_pad_and_add"] >= TARGET_AGG_SPEEDUP
                    and over <= TARGET_AGG_OVER_BOUND)
    return rows


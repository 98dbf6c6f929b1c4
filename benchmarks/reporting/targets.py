"""The project's speed and memory targets next to what was measured."""
from .format import num
from .gpu_tables import _geomean, block_ratios, training_cases
from .results import infos_of, inference_figures, short_name

# GPU targets (one H100 or H200; ratios within one run)
TARGET_DRIVE_FP32_SPEEDUP = 50.0     # slide fp32 vs the eager reference loop
TARGET_HRF_BF16_MEMORY_GIB = 4.0     # HRF slide bf16 peak memory
TARGET_DRIVE_BF16_IMAGES = 300.0     # DRIVE slide (exact) bf16
TARGET_HRF_BF16_IMAGES = 12.0        # HRF slide bf16
TARGET_TRAIN_MEMORY_RATIO = 0.5      # fused training step vs eager: activation memory ...
TARGET_TRAIN_TIME_RATIO = 0.8        # ... and time, in the same mode (plain or captured)
TARGET_BLOCK_VS_CONV = 1.10          # bf16 inference block vs the cuDNN convolution alone
TARGET_DRIVE_RECIPE_MINUTES = 10.0   # 40k DRIVE iterations (batch 4) of training
# CPU targets
TARGET_CPU_SLIDE_SPEEDUP = 1.7
TARGET_CPU_FAST_SPEEDUP = 3.5        # overlap-tile and whole
TARGET_CPU_FUSED_VS_CONV = 1.15
TARGET_CPU_TRAIN_SPEEDUP = 1.3
TARGET_CPU_VS_MONAI = 1.2            # exact slide fp32 vs MONAI over the same fused network ...
TARGET_CPU_PEER_VS_MMSEG = 3.0       # ... and vs mmseg's loop, in the same run
TARGET_CPU_BF16_VS_MMSEG = 8.0       # bf16 slide vs mmseg's fp32 loop (CPUs with native bf16)
TARGET_AGG_SPEEDUP = 5.0             # aggregation vs mmseg's pad-and-add (both devices)
TARGET_AGG_OVER_BOUND = 2.0          # aggregation vs the device-copy bandwidth bound


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
    """The targets that have a measured counterpart: (target, device, measured, verdict)."""
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
            _gpu_targets(run, figs, name, add)
        else:
            for i in infos_of(run, kind, "bench_conv_bn_relu.py", "test_cpu_inference_unet"):
                if i.get("layout") != "contiguous":
                    continue
                add("Fused UNet inference (NCHW input) no slower than unfused and within "
                    f"{TARGET_CPU_FUSED_VS_CONV - 1:.0%} of the convolutions alone", name,
                    f"{num(i['fused_vs_unfused'])}x unfused, {num(i['fused_vs_conv_only'])}x "
                    "conv-only time", i["fused_vs_unfused"] <= 1.0
                    and i["fused_vs_conv_only"] <= TARGET_CPU_FUSED_VS_CONV)
            _cpu_peer_targets(run, kind, name, add)
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
        for i in infos_of(run, kind, "bench_tile.py", "test_tile_aggregate"):  # runs before gpu_run
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



def _cpu_peer_targets(run, kind, name, add):
    for i in infos_of(run, kind, "bench_inference.py", "test_cpu_drive_slide_vs_peers"):
        vs_monai, vs_mmseg = i["speedup_vs_monai32"], i["speedup_vs_reference"]
        # the engine's time is its forwards' (window cutting and averaging are within noise),
        # so beating MONAI over the same network needs a faster network, not a faster loop
        note = (f"; the forwards alone take {num(i['forwards_only_s'])} s, the whole engine "
                f"{num(i['engine_s'])} s: the loop around them costs nothing measurable"
                if "forwards_only_s" in i else "")
        ok = vs_monai >= TARGET_CPU_VS_MONAI and vs_mmseg >= TARGET_CPU_PEER_VS_MMSEG
        add(f"DRIVE exact slide fp32 >= {TARGET_CPU_VS_MONAI:g}x MONAI over the same fused "
            f"network and >= {TARGET_CPU_PEER_VS_MMSEG:g}x mmseg's loop", name,
            f"{num(vs_monai)}x MONAI, {num(vs_mmseg)}x mmseg" + ("" if ok else note), ok)
        if "bf16_speedup_vs_reference" in i:
            bf16 = i["bf16_speedup_vs_reference"]
            add(f"DRIVE slide bf16 >= {TARGET_CPU_BF16_VS_MMSEG:g}x mmseg's fp32 loop", name,
                f"{num(bf16)}x (bf16 is {num(i['bf16_speedup_vs_fp32'])}x the fp32 engine "
                "here)", bf16 >= TARGET_CPU_BF16_VS_MMSEG)


def _gpu_targets(run, figs, name, add):
    """The GPU targets, from a gpu_run.json or from the pytest-benchmark GPU runs before it."""
    fig = figs.get(("drive", "fcn", "slide", "bf16"))
    if fig:
        add(f"DRIVE slide bf16 >= {TARGET_DRIVE_BF16_IMAGES:g} images/s", name,
            num(fig["images_per_s"]), fig["images_per_s"] >= TARGET_DRIVE_BF16_IMAGES)
    fig = figs.get(("hrf", "fcn", "slide", "bf16"))
    if fig:
        gib = fig.get("memory_GiB")
        ok = fig["images_per_s"] >= TARGET_HRF_BF16_IMAGES and (
            gib is not None and gib <= TARGET_HRF_BF16_MEMORY_GIB)
        add(f"HRF slide bf16 >= {TARGET_HRF_BF16_IMAGES:g} images/s under "
            f"{TARGET_HRF_BF16_MEMORY_GIB:g} GiB peak memory", name,
            f"{num(fig['images_per_s'])} images/s, "
            + (f"{num(gib)} GiB" if gib is not None else "memory not measured"), ok)
    ratios = block_ratios(run, "bf16", "module")
    if ratios:
        best = {k: _geomean(block_ratios(run, "bf16", k))
                for k in ("fastunet_op", "cudnn_relu", "epilogue") if block_ratios(run, "bf16", k)}
        add(f"ConvBNReLU inference block (bf16, channels-last) within "
            f"{TARGET_BLOCK_VS_CONV:g}x the convolution alone (GPU time, geometric mean over "
            "the UNet's shapes)", name, f"{num(_geomean(ratios))}x (worst shape "
            f"{num(max(ratios))}x); candidates: "
            + ", ".join(f"{k} {num(v)}x" for k, v in best.items()),
            _geomean(ratios) <= TARGET_BLOCK_VS_CONV)
    block = infos_of(run, "cuda", "bench_conv_bn_relu.py",
                     "test_cuda_inference_block_vs_cudnn_conv")
    if block:
        worst = max(b["fused_vs_conv_only"] for b in block)
        add(f"fp16/bf16 fused inference blocks within {TARGET_BLOCK_VS_CONV - 1:.0%} of "
            "cuDNN convolution alone", name, f"up to {num(worst)}x its time",
            worst <= TARGET_BLOCK_VS_CONV)
    _training_targets(run, name, add)
    for case in run.section("tiles").get("cases", []):
        us = (case.get("aggregate_out") or {}).get("gpu_us")
        if case["grid"] == "hrf" and us and case.get("bound_us"):
            add(f"HRF aggregation within {TARGET_AGG_OVER_BOUND:g}x the bandwidth bound "
                "(into a reused output)", name, f"{num(us / case['bound_us'])}x the bound",
                us / case["bound_us"] <= TARGET_AGG_OVER_BOUND)


def _training_targets(run, name, add):
    target = (f"activation memory <= {TARGET_TRAIN_MEMORY_RATIO:g}x and time <= "
              f"{TARGET_TRAIN_TIME_RATIO:g}x the eager step")
    cases = training_cases(run)
    for case in cases:
        eager = next((c for c in cases if c["batch"] == case["batch"] and not c["fused"]
                      and c["captured"] == case["captured"]), None)
        if not case["fused"] or case["batch"] != 16 or not eager:
            continue
        time_ratio = case["step_ms"] / eager["step_ms"]
        mem = (case.get("activation_peak_MiB"), eager.get("activation_peak_MiB"))
        mem_ratio = mem[0] / mem[1] if all(mem) else None
        add(f"Fused training step (FCN, AMP bf16, batch 16, "
            f"{'CUDA graph' if case['captured'] else 'plain'}): {target}", name,
            f"{num(mem_ratio)}x memory, {num(time_ratio)}x time" if mem_ratio else
            f"{num(time_ratio)}x time",
            time_ratio <= TARGET_TRAIN_TIME_RATIO
            and (mem_ratio or 1) <= TARGET_TRAIN_MEMORY_RATIO)
    if cases:
        best = min((c for c in cases if c["batch"] == 4), key=lambda c: c["step_ms"],
                   default=None)
        if best:
            minutes = best["step_ms"] * 40000 / 6e4
            add(f"40k DRIVE iterations (batch 4) in under {TARGET_DRIVE_RECIPE_MINUTES:g} minutes "
                "of training steps", name, f"{num(minutes)} min at the fastest step measured "
                f"({num(best['step_ms'])} ms, {'fused' if best['fused'] else 'eager'}, "
                f"{'CUDA graph' if best['captured'] else 'plain'}; data and evaluation "
                "excluded)", minutes <= TARGET_DRIVE_RECIPE_MINUTES)
    for i in infos_of(run, "cuda", "bench_conv_bn_relu.py", "test_cuda_train_step_amp_bf16"):
        add(f"Fused training step, AMP bf16, batch {i['batch']}: activation memory <= "
            f"{TARGET_TRAIN_MEMORY_RATIO:g}x unfused, time <= {TARGET_TRAIN_TIME_RATIO:g}x", name,
            f"{num(i['peak_activation_ratio'])}x memory, {num(i['step_time_ratio'])}x time",
            i["peak_activation_ratio"] <= TARGET_TRAIN_MEMORY_RATIO
            and i["step_time_ratio"] <= TARGET_TRAIN_TIME_RATIO)

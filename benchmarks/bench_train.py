"""Training speed: fused vs unfused iterations, data pipeline vs model, the GPU recipe.

    pytest benchmarks/bench_train.py --benchmark-only                 # CPU cases
    pytest benchmarks/bench_train.py --benchmark-only -k cuda         # GPU cases (H100 etc.)

Every case times one full training update (forward, losses, backward, SGD step) through
``fastunet.training.step.train_step``, the loop body of ``python -m fastunet.train``, on random
tensors (no dataset needed). Ratios are measured inside one test with the variants interleaved
round by round, so a busy machine slows all of them alike; they are in ``extra_info``:

- ``test_cpu_iteration``: UNet-S5-D16 + FCN at full width, batch 4 x 64x64, fused
  Conv-BN-ReLU (the default) vs the eager unfused modules (``fused=False``, = FASTUNET_FUSED=0),
  each in NCHW and channels_last, the fused channels_last step with FASTUNET_WINOGRAD=0 (its
  Winograd convolutions off: ``winograd_speedup``), and the reference's convolutions alone
  (forward + backward): the floor no fusion of the rest can go under;
- ``test_cpu_fused_auto``: fused vs plain modules as the CLI trains on CPU (channels_last), on
  the default synthetic config and the full-width FCN: the figures behind ``--fused auto``;
- ``test_cpu_data_vs_model``: samples/s of mmseg's training pipeline (one process, DRIVE-size
  synthetic images, 64x64 crops) vs samples/s the models consume in training (the synthetic
  default config, and the full-width FCN);
- ``test_cpu_cli_vs_plain_loop``: the iteration of ``python -m fastunet.train`` on its default
  model (the narrow synthetic config at batch 4: data, update, bookkeeping) against the plain
  PyTorch loop a user would write for the same model, batch and recipe (``plain_loop``: PIL for
  the resizes, one process, torch's own settings), each in its own process, alternating;
- ``test_cuda_captured_update``: the update as ``--capture graph`` replays it (one CUDA graph)
  vs eager, each with the fused and the plain modules, bf16 autocast, channels_last, batch 4
  and 16: GPU time per update (CUDA events around 50 back-to-back updates, so idle gaps while
  the host launches count) and host time beside it: the figures ``--capture auto`` waits for;
- ``test_cuda_recipe``: the published recipe (batch 16 x 64x64, FCN, bf16 autocast,
  channels_last, fused) vs eager fp32 unfused on the same GPU: iterations/s, peak memory
  (``torch.cuda.max_memory_allocated``), and the estimated time of the 40k-iteration DRIVE recipe;
  ``test_cuda_deterministic`` the cost of ``--deterministic``.
"""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet.models import apply_overrides
from fastunet.training.schedule import build_optimizer
from fastunet.training.step import GraphedUpdate, TrainStep, Update, set_fused, train_step
from _harness import interleaved_best  # noqa: E402  (benchmarks/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _setup(config, batch, size, device, fused=True, channels_last=False, overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = apply_overrides(fastunet.get_config(config), list(overrides))
    model = fastunet.build_segmentor(cfg).to(device).train()
    set_fused(model, bool(fused))  # fastunet's kernels, also where the default is plain (CUDA)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = build_optimizer(model, cfg["train"])
    scaler = torch.amp.GradScaler(device, enabled=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, size, size, generator=g) < 0.12).long().to(device)
    return TrainStep(model), opt, scaler, x, y


def _runner(parts, amp_dtype=None):
    step, opt, scaler, x, y = parts

    def run():
        train_step(step, opt, scaler, x, y, amp_dtype)
        if x.is_cuda:
            torch.cuda.synchronize()
    return run


def _interleaved(runs, rounds, warmup=2):
    """Min seconds per call of each runner (the runners synchronise themselves), after
    `warmup` calls each, the runners alternating round by round."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    return interleaved_best(runs, rounds)


def _conv_only(parts):
    """A runner of the model's convolutions alone, forward and backward (the gradients the step
    needs), each on inputs of its shape and layout: the floor of any Conv-BN-ReLU fusion."""
    step, _, _, x, y = parts
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append((m, a[0])))
             for m in step.modules() if isinstance(m, torch.nn.Conv2d)]
    step(x, y)
    for h in hooks:
        h.remove()
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format
    cases = []
    for m, a in calls:
        inp = torch.randn(a.shape).contiguous(memory_format=fmt)
        w = m.weight.detach()
        out = F.conv2d(inp, w, None, m.stride, m.padding, m.dilation, m.groups)
        mask = [a.requires_grad, True, m.bias is not None]
        cases.append((m, inp, w, torch.randn_like(out), mask))

    def run():
        for m, inp, w, grad, mask in cases:
            F.conv2d(inp, w, None, m.stride, m.padding, m.dilation, m.groups)
            torch.ops.aten.convolution_backward(
                grad, inp, w, [w.shape[0]] if mask[2] else None, m.stride, m.padding,
                m.dilation, False, [0, 0], m.groups, mask)
    return run


def _without_winograd(run):
    """run as with FASTUNET_WINOGRAD=0."""
    def wrapped():
        from fastunet import settings

        with settings.override(winograd=False):
            run()
    return wrapped


def test_cpu_iteration(benchmark):
    cfg = "fcn_unet_s5-d16_64x64_40k_drive"
    parts = {f"{'fused' if f else 'unfused'}{'_cl' if cl else ''}":
             _setup(cfg, 4, 64, "cpu", fused=f, channels_last=cl)
             for f in (True, False) for cl in (False, True)}
    runs = {k: _runner(v) for k, v in parts.items()}
    runs["fused_cl_no_winograd"] = _without_winograd(runs["fused_cl"])
    runs["conv_only"] = _conv_only(parts["unfused"])
    t = _interleaved(runs, rounds=5)
    benchmark.pedantic(runs["fused_cl"], rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        case="fcn full width, batch 4 x 64x64, fp32, CPU",
        **{f"{k}_s": v for k, v in t.items()},
        fused_speedup=t["unfused"] / t["fused"],                 # fused vs the eager reference
        fused_channels_last_speedup=t["unfused"] / t["fused_cl"],
        cli_cpu_recipe_speedup=t["unfused"] / t["fused_cl"],     # what --fused auto runs here
        # the reference's convolutions (oneDNN, NCHW) alone, forward and backward
        conv_share_of_reference=t["conv_only"] / t["unfused"],
        # the fused channels_last step with and without its Winograd convolutions
        cli_cpu_recipe_speedup_no_winograd=t["unfused"] / t["fused_cl_no_winograd"],
        winograd_speedup=t["fused_cl_no_winograd"] / t["fused_cl"],
        load_average=os.getloadavg(),
        threads=torch.get_num_threads())


def test_cpu_fused_auto(benchmark):
    """What train.py's --fused auto picks on CPU: fused vs plain modules, both channels_last
    (as the CLI trains), on the default synthetic config and the full-width FCN config."""
    syn = fastunet.get_config("synthetic")["train"]["batch_size"]
    runs = {f"{name}_{'fused' if f else 'unfused'}":
            _runner(_setup(cfg, batch, 64, "cpu", fused=f, channels_last=True))
            for name, cfg, batch in (("synthetic", "synthetic", syn),
                                     ("fcn", "fcn_unet_s5-d16_64x64_40k_drive", 4))
            for f in (True, False)}
    t = _interleaved(runs, rounds=4)
    benchmark.pedantic(runs["synthetic_unfused"], rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        **{f"{k}_s": v for k, v in t.items()},
        synthetic_fused_speedup=t["synthetic_unfused"] / t["synthetic_fused"],
        fcn_fused_speedup=t["fcn_unfused"] / t["fcn_fused"],
        threads=torch.get_num_threads())


def test_cpu_data_vs_model(benchmark):
    from fastunet.data import EpochSampler, SyntheticVessels, TrainDataset, TrainTransform

    images = SyntheticVessels("training", num_images=4, cache=False)
    items = [images[i] for i in range(len(images))]
    ds = TrainDataset(items, TrainTransform((64, 64), (584, 565)), seed=0)
    keys = list(itertools.islice(iter(EpochSampler(len(ds), seed=0)), 128))

    def pipeline():
        for k in keys:
            ds[k]

    benchmark.pedantic(pipeline, rounds=3, warmup_rounds=1)
    pipe = len(keys) / benchmark.stats.stats.min
    syn_cfg = fastunet.get_config("synthetic")["train"]
    # the models as python -m fastunet.train runs them on CPU (channels_last; --fused auto:
    # plain modules for the narrow synthetic model, fused for the full-width FCN)
    t = _interleaved({
        "synthetic": _runner(_setup("synthetic", syn_cfg["batch_size"], 64, "cpu", fused=False,
                                    channels_last=True)),
        "fcn": _runner(_setup("fcn_unet_s5-d16_64x64_40k_drive", 4, 64, "cpu", fused=True,
                              channels_last=True))}, rounds=4)
    syn = syn_cfg["batch_size"] / t["synthetic"]
    fcn = 4 / t["fcn"]
    benchmark.extra_info.update(
        pipeline_samples_per_s=pipe, synthetic_model_samples_per_s=syn,
        fcn_model_samples_per_s=fcn, pipeline_over_synthetic_model=pipe / syn,
        pipeline_over_fcn_model=pipe / fcn,
        data_share_of_synthetic_iteration=syn / (pipe + syn))


@cuda
@pytest.mark.cuda
def test_cuda_recipe(benchmark):
    config = "fcn_unet_s5-d16_64x64_40k_drive"
    torch.backends.cudnn.benchmark = True
    runs = {  # what python -m fastunet.train runs on CUDA, the same unfused, the eager reference
        "recipe": _runner(_setup(config, 16, 64, "cuda", channels_last=True), torch.bfloat16),
        "recipe_unfused": _runner(_setup(config, 16, 64, "cuda", fused=False,
                                         channels_last=True), torch.bfloat16),
        "reference": _runner(_setup(config, 16, 64, "cuda", fused=False), None)}
    mem = {}
    for name, run in runs.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            run()
        mem[name] = torch.cuda.max_memory_allocated() / 2 ** 30

    def many(run, n=20):
        def f():
            for _ in range(n):
                run()
        return f
    t = _interleaved({k: many(v) for k, v in runs.items()}, rounds=3, warmup=1)
    benchmark.pedantic(runs["recipe"], rounds=20, warmup_rounds=5)
    it_s = {k: 20 / v for k, v in t.items()}
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(0),
        case="fcn full width, batch 16 x 64x64: bf16+channels_last+fused vs fp32 eager unfused",
        **{f"{k}_it_per_s": v for k, v in it_s.items()},
        speedup=it_s["recipe"] / it_s["reference"],
        fused_vs_unfused_in_recipe=it_s["recipe"] / it_s["recipe_unfused"],
        **{f"{k}_peak_gb": v for k, v in mem.items()},
        drive_40k_hours_recipe=40000 / it_s["recipe"] / 3600,
        drive_40k_hours_recipe_unfused=40000 / it_s["recipe_unfused"] / 3600,
        drive_40k_hours_reference=40000 / it_s["reference"] / 3600)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("batch", [4, 16])
def test_cuda_captured_update(benchmark, batch):
    import time

    config = "fcn_unet_s5-d16_64x64_40k_drive"
    torch.backends.cudnn.benchmark = True
    updates = {}
    for fused in (True, False):
        for captured in (False, True):
            step, _, _, x, y = _setup(config, batch, 64, "cuda", fused=fused, channels_last=True)
            opt = build_optimizer(step.model, fastunet.get_config(config)["train"],
                                  capturable=captured)
            update = (GraphedUpdate(step, opt, torch.bfloat16) if captured
                      else Update(step, opt, amp_dtype=torch.bfloat16))
            for _ in range(5):  # warm-up, capture
                update(x, y)
            updates[f"{'fused' if fused else 'plain'}_{'captured' if captured else 'eager'}"] = (
                update, x, y)
    torch.cuda.synchronize()
    gpu, host = {}, {}
    for _ in range(3):  # rounds, interleaved; best of each
        for name, (update, x, y) in updates.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(50):
                update(x, y)
            end.record()
            t1 = time.perf_counter()  # the host's time to queue 50 updates
            end.synchronize()
            gpu[name] = min(gpu.get(name, 1e9), start.elapsed_time(end) / 50 * 1e3)
            host[name] = min(host.get(name, 1e9), (t1 - t0) / 50 * 1e6)
    update, x, y = updates["fused_captured"]
    benchmark.pedantic(lambda: update(x, y), rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(0),
        case=f"fcn full width, batch {batch} x 64x64, bf16, channels_last: captured vs eager",
        **{f"{k}_gpu_us": v for k, v in gpu.items()},
        **{f"{k}_host_us": v for k, v in host.items()},
        captured_speedup_fused=gpu["fused_eager"] / gpu["fused_captured"],
        captured_speedup_plain=gpu["plain_eager"] / gpu["plain_captured"],
        fused_captured_vs_plain_eager=gpu["plain_eager"] / gpu["fused_captured"])


@cuda
@pytest.mark.cuda
def test_cuda_deterministic(benchmark):
    import subprocess
    import sys
    # determinism switches are process-wide: measure each mode in its own process
    code = r"""
import sys, time, torch
sys.path[:0] = [".", "benchmarks"]
from benchmarks.bench_train import _setup, _runner
if sys.argv[1] == "1":
    import fastunet
    fastunet.set_deterministic(True)
else:
    torch.backends.cudnn.benchmark = True
run = _runner(_setup("fcn_unet_s5-d16_64x64_40k_drive", 16, 64, "cuda", channels_last=True),
              torch.bfloat16)
for _ in range(10):
    run()
t = time.perf_counter()
for _ in range(50):
    run()
print(50 / (time.perf_counter() - t))
"""
    rates = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        rates[flag] = float(out.stdout.strip().splitlines()[-1])
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(0),
                                default_it_per_s=rates["0"], deterministic_it_per_s=rates["1"],
                                deterministic_cost=rates["0"] / rates["1"])


# ---------------------------------------------------------------- the plain loop reference

def plain_loop(iterations, batch=4, seed=0, cache=None, warmup=10):
    """Iterations/s of a plain PyTorch training loop of the default config's model and recipe:
    PIL resizes (the label whole, nearest; the image only inside the crop, bilinear), mmseg's
    crop, flip and photometric distortion, SGD + poly, one process, torch's default threads and
    layout. Timed after ``warmup``."""
    import time

    import numpy as np
    from PIL import Image

    from fastunet.data import SyntheticVessels
    from fastunet.data.transforms import photometric_distortion
    from fastunet.training.schedule import poly_lr

    cfg = fastunet.get_config("synthetic")
    dcfg, tcfg = cfg["data"], cfg["train"]
    train = SyntheticVessels("training", dcfg["num_train"], tuple(dcfg["image_size"]),
                             dcfg["synthetic_seed"], root=cache, progress=False)
    pairs = [(Image.fromarray(train[i]["img"]), Image.fromarray(train[i]["label"]))
             for i in range(len(train))]
    mean = torch.tensor(dcfg["mean"]).view(3, 1, 1)
    std = torch.tensor(dcfg["std"]).view(3, 1, 1)
    ch, cw = dcfg["crop_size"]
    rng = np.random.default_rng(seed)

    def sample():
        img, lab = pairs[rng.integers(len(pairs))]
        r = rng.uniform(*dcfg["ratio_range"])
        w, h = img.size
        f = min(max(dcfg["img_scale"]) * r / max(h, w), min(dcfg["img_scale"]) * r / min(h, w))
        size = (int(w * f + 0.5), int(h * f + 0.5))
        lab = np.asarray(lab.resize(size, Image.NEAREST))
        for _ in range(10):  # mmseg's crop: re-drawn while one class covers >= 75%
            oy = rng.integers(0, max(size[1] - ch, 0) + 1)
            ox = rng.integers(0, max(size[0] - cw, 0) + 1)
            counts = np.bincount(lab[oy:oy + ch, ox:ox + cw].ravel(), minlength=2)
            if (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75:
                break
        lab = lab[oy:oy + ch, ox:ox + cw]
        sx, sy = w / size[0], h / size[1]  # the crop's box in the source image
        img = np.asarray(img.resize(lab.shape[::-1], Image.BILINEAR, box=(
            ox * sx, oy * sy, (ox + lab.shape[1]) * sx, (oy + lab.shape[0]) * sy)))
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        img = photometric_distortion(np.ascontiguousarray(img), rng)
        x = (torch.from_numpy(img).permute(2, 0, 1).float() - mean) / std
        y = torch.from_numpy(lab.astype(np.int64))
        if x.shape[1:] != (ch, cw):
            x = F.pad(x, (0, cw - x.shape[2], 0, ch - x.shape[1]))
            y = F.pad(y, (0, cw - y.shape[1], 0, ch - y.shape[0]), value=255)
        return x, y

    torch.manual_seed(seed)
    model = fastunet.build_segmentor(cfg).train()
    set_fused(model, False)  # plain Conv2d, BatchNorm2d, ReLU
    opt = torch.optim.SGD(model.parameters(), lr=tcfg["lr"], momentum=tcfg["momentum"],
                          weight_decay=tcfg["weight_decay"])
    t0 = None
    for it in range(warmup + iterations):
        if it == warmup:
            t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = poly_lr(it, warmup + iterations, tcfg["lr"], tcfg["min_lr"])
        xs, ys = zip(*(sample() for _ in range(batch)))
        losses = model.loss(torch.stack(xs), torch.stack(ys))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    return iterations / (time.perf_counter() - t0)


def cli_iterations_per_s(iterations, work_dir, cache, batch=4, env=None, args=()):
    """Iterations/s of ``python -m fastunet.train`` (default config, batch ``batch``) over its
    last half: the rate log.jsonl records per log interval, from its own clock."""
    import json
    import subprocess
    import sys

    every = iterations // 4
    cmd = [sys.executable, "-m", "fastunet.train", "--max-iters", str(iterations),
           "--batch-size", str(batch), "--work-dir", str(work_dir), "--log-interval", str(every),
           *args, "--cfg-options", "data.num_val=1", f"train.eval_interval={iterations}",
           f"train.checkpoint_interval={iterations}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "FASTUNET_CACHE": str(cache), **(env or {})})
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(work_dir, "log.jsonl")) as f:
        rates = [r["it_per_s"] for r in map(json.loads, f) if r.get("mode") == "train"]
    return 2 / sum(1 / r for r in rates[-2:])  # the last two intervals: warm, steady


def _plain_loop_in_process(iterations, cache):
    """plain_loop in a fresh process, which imports torch first: torch's own OpenMP settings."""
    import subprocess
    import sys

    code = ("import sys, torch; sys.path[:0] = ['.', 'benchmarks']; "
            "from bench_train import plain_loop; "
            f"print(plain_loop({iterations}, cache={str(cache)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_cpu_cli_vs_plain_loop(benchmark, tmp_path):
    cache = tmp_path / "cache"
    fastunet.data.SyntheticVessels("training", 20, root=cache, progress=False)
    rates = {"cli": [], "plain": []}
    for round_ in range(3):
        rates["plain"].append(_plain_loop_in_process(120, cache))
        rates["cli"].append(cli_iterations_per_s(200, tmp_path / f"cli{round_}", cache))
    benchmark.pedantic(lambda: None, rounds=1)
    best = {k: max(v) for k, v in rates.items()}
    benchmark.extra_info.update(
        case="synthetic default model (base_channels 16), batch 4 x 64x64, CPU: the CLI's "
             "iteration vs a plain PyTorch loop (PIL resizes), each in its own process",
        cli_it_per_s=best["cli"], plain_loop_it_per_s=best["plain"],
        cli_over_plain_loop=best["cli"] / best["plain"],
        rounds={k: [round(r, 2) for r in v] for k, v in rates.items()},
        load_average=os.getloadavg(), threads=torch.get_num_threads())

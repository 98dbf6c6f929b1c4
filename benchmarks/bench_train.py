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
from fastunet.training.step import TrainStep, train_step
from _harness import interleaved_best  # noqa: E402  (benchmarks/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _setup(config, batch, size, device, fused=True, channels_last=False, overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = apply_overrides(fastunet.get_config(config), list(overrides))
    model = fastunet.build_segmentor(cfg).to(device).train()
    for m in model.modules():  # fused: fastunet's kernels, also where the default is plain (CUDA)
        if isinstance(m, fastunet.nn.ConvBNReLU):
            m.fused = bool(fused)
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
def test_cuda_deterministic(benchmark):
    import subprocess
    import sys
    # determinism switches are process-wide: measure each mode in its own process
    code = r"""
import sys, time, torch
sys.path[:0] = [".", "benchmarks"]
from benchmarks.bench_train import _setup, _runner
if sys.argv[1] == "1":
    from fastunet.training import determinism
    determinism.enable("cuda")
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

"""Train a U-Net: the built-in synthetic default, or any published config from its name.

    python -m fastunet.train                      # synthetic vessels, CPU or GPU, minutes
    python -m fastunet.train --config fcn_unet_s5-d16_64x64_40k_drive --data-root data/DRIVE
    python -m fastunet.train --config fcn_unet_s5-d16_64x64_40k_drive --resume
    python -m fastunet.train --config synthetic --max-iters 200 --cfg-options train.lr=0.02
    torchrun --nproc_per_node=4 -m fastunet.train --config fcn_unet_s5-d16_64x64_40k_drive \\
        --data-root data/DRIVE

The published recipe: SGD lr 0.01, momentum 0.9, weight decay 5e-4 on all parameters; poly decay
per iteration to 1e-4 over 40k iterations; batch 16 in total (split over the processes);
evaluation and checkpoint every 4k iterations, the best checkpoint by vessel Dice. It runs
channels_last; on CUDA with bf16 autocast (``--amp``); fastunet's fused Conv-BN-ReLU training
kernels where they measured faster (``--fused``; on CPU for full-width backbones only), optionally
``--compile``d or with the whole update replayed from a CUDA graph (``--capture graph``). Everything goes to
``work_dirs/<config>/``: ``iter_<N>.pth``, ``latest.pth``, ``best_vessel_dice_iter_<N>.pth``,
``log.jsonl``, ``curves.png``, ``vis/`` overlays, TensorBoard scalars when tensorboard is
installed. ``--resume`` continues exactly where the last checkpoint left off (same weights as an
uninterrupted run, on CPU bit for bit).

The code reads top to bottom: ``_train`` sets up (config, data, model, optimizer, log, resumed
state), then runs one loop: learning rate, batch, update, and at intervals the finite-loss check,
the log line, the evaluation and the checkpoint (plain functions below it). What the loop changes
lives in one ``RunState``.
"""
import argparse
import dataclasses
import math
import os
import random
import sys
import textwrap
import time
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn

from ._cli import ArgumentParser, add_deterministic_flag
from .atomic import DiskFullError
from .conv_plan import train_fused_default
from .data import DatasetError, ImageReadError
from .models import load_checkpoint
from .models.checkpoint import extract_state_dict
from .models.configs import list_configs
from .runtime import set_deterministic
from .training import cli, data as tdata, distributed, state
from .training.cli import UserError
from .training.evaluation import evaluate
from .training.log import RunLog, format_duration
from .training.schedule import PolyLR, build_optimizer, load_optimizer_state
from .training.step import GraphedUpdate, LossTracker, TrainStep, Update, set_fused

__all__ = ["main", "build_parser", "train", "TrainResult", "NonFiniteLoss", "TrainStep",
           "RunState"]

AMP_CHOICES = ("auto", "off", "fp16", "bf16")
CAPTURE_CHOICES = ("auto", "off", "graph")
PROG = "python -m fastunet.train"


class TrainResult(NamedTuple):
    """What :func:`train` returns: the trained segmentor (unwrapped), the final validation metrics
    (SegMetric.compute()), the work dir and the number of iterations done."""

    model: nn.Module
    metrics: dict
    work_dir: str
    iterations: int


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class RunState:
    """What the training loop changes; everything else is fixed at set-up."""

    iteration: int = 0                    # updates done
    best: dict = dataclasses.field(default_factory=dict)  # vessel_dice and its iteration
    metrics: Optional[dict] = None        # the last evaluation (SegMetric.compute())
    metric: Optional[object] = None       # the same as a SegMetric (its tables)
    overlay: Optional[str] = None         # the last evaluation's overlay picture
    last_checkpoint: Optional[int] = None  # iteration of the newest checkpoint
    last_path: Optional[str] = None        # and its file (outside work_dir when resumed from there)


class Job(NamedTuple):
    """The fixed set-up of a run that evaluation and checkpoints need."""

    cfg: dict
    dist: distributed.DistInfo
    work_dir: str
    seed: int
    max_iters: int
    total_batch: int


def _auto_capture(device):
    """``--capture auto``: off everywhere. CUDA graphs exist on CUDA only, and no committed GPU
    result (benchmarks/results/) shows the captured update faster than the eager one yet; the
    GPU benchmark times both (bench_train.py's captured cases)."""
    return False


# One add_argument per option with its help: a list to read, longer than 60 lines by nature.
def build_parser():
    """The argument parser of ``python -m fastunet.train``."""
    p = ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Train a UNet-S5-D16 segmentor with the published mmseg recipe. With no arguments: "
            "the 'synthetic' config on fastunet's built-in synthetic vessel images (generated on "
            "first use), on the GPU if there is one, in minutes even on a 2-core CPU; ends with "
            "the validation metrics, a checkpoint and an overlay picture.", 79),
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\nconfigs (mmseg 1.x config "
               "file names work too):\n" + textwrap.fill(", ".join(list_configs()), 79,
                                                         initial_indent="  ",
                                                         subsequent_indent="  "))
    p.add_argument("--config", default="synthetic",
                   help="config name (default: synthetic; see the list below) or config file: "
                        ".yaml/.json (from --print-config) or an mmseg .py config")
    p.add_argument("--print-config", nargs="?", const="", metavar="NAME",
                   help="print config NAME (default: --config's, with --cfg-options) as YAML "
                        "and exit: python -m fastunet.train --print-config synthetic > my.yaml")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset folder: a converted DRIVE/STARE/CHASE_DB1/HRF root, or with "
                        "--cfg-options data.dataset=folder your images/<split>/ and "
                        "masks/<split>/ (default: the config's data_root); the synthetic "
                        "config generates its images and takes none")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where checkpoints and logs go (default: work_dirs/<config name>)")
    p.add_argument("--max-iters", type=int, metavar="N",
                   help="iterations (default: the config's, 40000 for the published ones); "
                        "also the horizon of the poly schedule")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="total batch over all processes (default: the config's, 16)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="mixed precision: auto (default) = bf16 on CUDA GPUs that support it, "
                        "else fp16 on CUDA, off on CPU; off = fp32 as mmseg; fp16 uses a "
                        "GradScaler")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue the run in --work-dir from latest.pth (or from CKPT): "
                        "weights, optimizer, schedule, iteration, random states, data order")
    p.add_argument("--load-from", metavar="CKPT",
                   help="start a new run from these weights (fastunet or mmseg checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config entries, e.g. train.lr=0.02 "
                        "model.backbone.base_channels=32 data.num_train=10 "
                        "data.label_resize=mmseg (mmseg's pipeline bit for bit)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="data loading processes per GPU/process (default: 0 on CPUs with up to "
                        "4 cores, else up to 8)")
    p.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                   help="fastunet's fused Conv-BN-ReLU training kernels: auto (default) = where "
                        "committed results show them faster (fastunet/conv_plan.py: on CPU for "
                        "full-width backbones, base_channels >= 64; the plain modules on CUDA "
                        "and for narrower backbones); on = always; off = never (evaluations "
                        "run the device's default inference path)")
    p.add_argument("--capture", choices=CAPTURE_CHOICES, default="auto",
                   help="graph = capture the whole update (forward, backward, SGD) in a CUDA "
                        "graph after 3 eager ones and replay it for every batch (CUDA, one "
                        "process, --amp bf16 or off); auto (default) = off, until a committed GPU "
                        "benchmark shows the captured update faster")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (long first iterations, then faster)")
    add_deterministic_flag(p)
    p.add_argument("--log-interval", type=int, metavar="N",
                   help="iterations between log lines (default: 50, fewer for short runs)")
    return p


def main(argv=None):
    """Entry point of ``python -m fastunet.train`` and ``fastunet-train``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.print_config is not None:
        return cli.print_config(PROG, args.print_config or args.config, args.cfg_options)
    try:
        train(args)
    except UserError as e:
        return cli.fail(PROG, e)
    except NonFiniteLoss as e:
        return cli.fail(PROG, e, code=1)
    except (DatasetError, ImageReadError) as e:  # found while reading the data, maybe mid-run
        return cli.fail(PROG, f"{cli.data_error_message(e)} (fix the data, then continue with "
                              f"--resume)", code=1)
    except DiskFullError as e:  # a checkpoint, overlay or log; the previous files are intact
        return cli.fail(PROG, f"{e}; free some space, then continue with --resume", code=1)
    except KeyboardInterrupt:
        return cli.fail(PROG, "interrupted; continue with --resume", code=130)
    return 0


def train(args):
    """Run training as ``args`` (from :func:`build_parser`) say; returns a :class:`TrainResult`.

    From Python: ``train(build_parser().parse_args(["--config", "synthetic"]))``. Process-wide
    switches (``--deterministic``, cuDNN autotuning) are restored on return.
    """
    cudnn_benchmark = torch.backends.cudnn.benchmark
    restore = []
    try:
        return _train(args, restore)
    finally:
        for undo in restore:
            undo()
        torch.backends.cudnn.benchmark = cudnn_benchmark


# _train is the one place that shows a whole run in order (set-up, then the loop), so it is
# longer than the house's 60 lines; each step it takes is a named function below.
def _train(args, restore):
    t_start = time.perf_counter()
    # ---- set-up: config, processes, device, work dir, data
    cfg, dist_info, data_root, work_dir = _setup(args)
    device, main_rank = dist_info.device, dist_info.is_main
    tcfg, dcfg = cfg["train"], cfg["data"]
    job = Job(cfg, dist_info, work_dir, args.seed, int(tcfg["max_iters"]),
              int(tcfg["batch_size"]))
    batch = job.total_batch // dist_info.world_size
    amp_dtype = _resolve_amp(args.amp, device)
    capture = _resolve_capture(args, device, dist_info, amp_dtype)
    if args.deterministic:
        restore.append(set_deterministic(True))  # with the CUDA backward kernels of determinism
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotuning pays off
    resume_path = _resume_path(args, work_dir)
    if main_rank:
        _prepare_work_dir(work_dir)
    train_set, val_set = _datasets(dcfg, data_root, main_rank)

    # ---- model (built identically on every rank from the seed), optimizer, schedule
    _seed_all(args.seed)
    model, train_fused = _build_model(cfg, args, device)
    sync_bn = dist_info.distributed and device.type == "cuda"
    if sync_bn:  # mmseg trains with SyncBN; DDP allows it on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, tcfg, capturable=capture)
    schedule = PolyLR(optimizer, job.max_iters, tcfg["lr"], tcfg.get("min_lr", 1e-4),
                      tcfg.get("power", 0.9))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # ---- the log, then what a resumed run brings back (its notes go to the log)
    run = RunState()
    checkpoint = (_read_checkpoint(resume_path, model, optimizer, scaler, job.max_iters)
                  if resume_path else None)
    if checkpoint is not None:
        run.iteration = int(checkpoint["meta"]["iteration"])
    log_interval = args.log_interval or max(1, min(50, job.max_iters // 40))
    log = RunLog(work_dir, job.max_iters, run.iteration, log_interval, enabled=main_rank)
    amp_name = {None: "off (fp32)", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    log.print(f"fastunet.train: config {cfg['name']} | {len(train_set)} training / "
              f"{len(val_set)} validation images | device {device}"
              + (f" x {dist_info.world_size} processes ({dist_info.backend})"
                 if dist_info.distributed else "")
              + f" | batch {job.total_batch} ({batch} per process) | amp {amp_name} | fused "
              f"{'off' if train_fused is False else 'on'}{' | captured' if capture else ''} | "
              f"{job.max_iters} iterations | work dir {work_dir}")
    if dist_info.distributed and not sync_bn:
        log.print("note: BatchNorm statistics are per process on CPU (DDP supports SyncBN on "
                  "GPUs only)")
    rng = None
    if checkpoint is not None:
        log.print(f"resuming from {resume_path} at iteration {run.iteration}")
        rng = _restore(checkpoint, resume_path, model, optimizer, scaler, job, run, log)
    _seed_all(args.seed + dist_info.rank)  # dropout masks differ per rank
    if rng is not None:
        try:
            state.set_rng_state(rng)
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as e:
            raise UserError(f"cannot resume from {resume_path}: its random states are damaged "
                            f"({str(e).splitlines()[0]})") from None
    log.event(run.iteration, event="resume" if run.iteration else "start", config=cfg["name"],
              world_size=dist_info.world_size, amp=amp_name, device=str(device))

    # ---- the update and the batches
    step = TrainStep(model)
    if dist_info.distributed:
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step = torch.compile(step)
    update = (GraphedUpdate(step, optimizer, amp_dtype) if capture
              else Update(step, optimizer, scaler, amp_dtype))
    workers = args.workers if args.workers is not None else _default_workers(
        device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loader = tdata.build_train_loader(
        train_set, dcfg, batch, job.total_batch, args.seed, run.iteration, dist_info.rank,
        dist_info.world_size, workers, pin_memory=device.type == "cuda", channels_last=True,
        generator=torch.Generator().manual_seed(args.seed + dist_info.rank))

    # ---- the loop: one update per iteration, lr from the poly schedule
    eval_interval = int(tcfg.get("eval_interval", 4000))
    ckpt_interval = int(tcfg.get("checkpoint_interval", 4000))
    # the host looks at the losses only here: every iteration on the CPU (no cost), at log
    # intervals on a GPU (a look waits for the device)
    check_every = 1 if device.type == "cpu" else log_interval
    run.last_checkpoint, run.last_path = run.iteration or None, resume_path
    losses = LossTracker(job.max_iters, device)
    batches, t_data = iter(loader), 0.0
    model.train()
    for it in range(run.iteration, job.max_iters):
        lr = schedule.step(it)
        t0 = time.perf_counter()
        images, labels = next(batches)
        t_data += time.perf_counter() - t0
        images = images.to(device, non_blocking=True)  # channels_last from the loader
        labels = labels.to(device, non_blocking=True)
        losses.add(update(images, labels), it)
        run.iteration = done = it + 1
        log_due, eval_due, ckpt_due = (done % n == 0 or done == job.max_iters
                                       for n in (log_interval, eval_interval, ckpt_interval))
        if done % check_every == 0 or log_due or eval_due or ckpt_due:
            _stop_unless_finite(losses, update.names, job, run, log)
        if log_due:
            extra = {"data_time": t_data / losses.count}
            if device.type == "cuda":
                extra["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            means = losses.take_means(distributed.all_reduce_sum, dist_info.world_size)
            log.train(done, dict(zip(update.names, means)), lr, extra)
            t_data = 0.0
        else:
            log.advance(done)
        improved = eval_due and _evaluate(job, run, model, val_set, train_fused, log)
        if ckpt_due or improved:
            _save_checkpoint(job, run, model, optimizer, scaler, improved)
    log.close()

    # ---- the result: metrics table, checkpoint, pictures
    if run.metric is None:  # resumed a finished run: evaluate its final weights
        _evaluate(job, run, model, val_set, train_fused, log)
    if main_rank:
        _print_result(job, run, len(val_set), log, time.perf_counter() - t_start)
    distributed.barrier()
    distributed.shutdown()
    return TrainResult(model, run.metrics, work_dir, job.max_iters)


# ---------------------------------------------------------------- set-up

def _setup(args):
    """Config, process group, device, work dir; raises UserError for bad input."""
    cfg = cli.load_config(args.config, args.cfg_options)
    tcfg = cfg["train"]
    if args.max_iters is not None:
        if args.max_iters <= 0:
            raise UserError(f"--max-iters must be positive, got {args.max_iters}")
        tcfg["max_iters"] = args.max_iters
    if args.batch_size is not None:
        tcfg["batch_size"] = args.batch_size
    for name in ("workers", "log_interval"):
        value, least = getattr(args, name), 0 if name == "workers" else 1
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not isinstance(tcfg.get("batch_size"), int) or tcfg["batch_size"] <= 0:
        raise UserError(f"batch size {tcfg.get('batch_size')!r} must be a positive multiple "
                        f"of the number of processes")
    cli.validate_training_config(cfg)
    cli.check_device(args.device)
    if args.work_dir and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise UserError(f"--work-dir {args.work_dir} exists and is not a folder")
    try:
        dist_info = distributed.init(args.device)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    total = int(tcfg["batch_size"])
    if total <= 0 or total % dist_info.world_size:
        raise UserError(f"batch size {total} must be a positive multiple of the number of "
                        f"processes ({dist_info.world_size})")
    try:
        data_root = tdata.check_data_root(cfg["data"], args.data_root)
    except (tdata.DataRootError, ValueError) as e:
        raise UserError(str(e)) from None
    work_dir = args.work_dir or cli.default_work_dir(cfg)
    return cfg, dist_info, data_root, work_dir


def _resolve_amp(amp, device):
    if device.type != "cuda":
        if amp in ("fp16", "bf16"):
            raise UserError(f"--amp {amp} is for CUDA GPUs; on {device} use --amp off (or auto)")
        return None
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def _resolve_capture(args, device, dist_info, amp_dtype):
    """Whether the update runs from a CUDA graph; UserError where it cannot."""
    if args.capture == "auto":
        return _auto_capture(device)
    if args.capture == "off":
        return False
    why = ("needs a CUDA device" if device.type != "cuda" else
           "runs one process (not under torchrun)" if dist_info.distributed else
           "cannot replay fp16's GradScaler (use --amp bf16 or off)"
           if amp_dtype == torch.float16 else
           "and --compile are two ways of doing the same; choose one" if args.compile else None)
    if why:
        raise UserError(f"--capture graph {why}")
    return True


def _resume_path(args, work_dir):
    """The checkpoint --resume names (None without --resume); UserError when it is missing."""
    if not args.resume:
        return None
    path = state.latest_checkpoint(work_dir) if args.resume == "auto" else args.resume
    if path is None or not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint in {work_dir} (latest.pth or iter_*.pth)"
                        if args.resume == "auto" else f"--resume: {args.resume} not found")
    return path


def _prepare_work_dir(work_dir):
    try:
        os.makedirs(work_dir, exist_ok=True)
        state.remove_stale_temp_files(work_dir)  # of a run killed while saving
    except OSError as e:
        raise UserError(f"cannot create the work dir {work_dir}: {e.strerror or e}") from None


def _datasets(dcfg, data_root, main_rank):
    """The training and validation splits; rank 0 first (the synthetic set may have to be
    generated once)."""
    try:
        if main_rank:
            splits = [tdata.build_split(dcfg, s, data_root) for s in ("training", "validation")]
        distributed.barrier()
        if not main_rank:
            splits = [tdata.build_split(dcfg, s, data_root) for s in ("training", "validation")]
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    return splits


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _build_model(cfg, args, device):
    """The segmentor on ``device`` in channels_last, with --load-from's weights; returns it and
    its training ``fused`` setting."""
    model = cli.build_model(cfg)
    if args.load_from:
        try:
            load_checkpoint(model, args.load_from)
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"--load-from: {str(e).splitlines()[0]}") from None
    model.to(device)
    # channels_last is faster on both devices (cuDNN tensor cores; oneDNN on CPU)
    model.to(memory_format=torch.channels_last)
    train_fused = (train_fused_default(model, device) if args.fused == "auto"
                   else args.fused == "on")
    set_fused(model, train_fused)
    return model, train_fused


def _default_workers(device, local_world):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, (cores or 1) // max(local_world, 1))
    if device.type != "cuda" and cores <= 4:
        return 0  # a worker would take a core from the model; the pipeline costs ~2% here
    return min(8, max(cores - 1, 1))


def _read_checkpoint(path, model, optimizer, scaler, max_iters):
    """The training checkpoint at ``path``, checked whole against this run's model, optimizer
    and scaler before anything is loaded; UserError when it cannot be continued from."""
    try:
        ckpt = state.load_training_checkpoint(path)
        state.check_resumable(ckpt, model, optimizer, scaler, max_iters)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError, IndexError,
            AttributeError) as e:
        raise UserError(f"cannot resume from {path}: {str(e).splitlines()[0] or type(e).__name__}"
                        ) from None
    return ckpt


def _restore(ckpt, path, model, optimizer, scaler, job, run, log):
    """Load a training checkpoint into the model, optimizer, scaler and ``run``, noting in the
    log what differs; returns this rank's saved random states (None: restart from the seed)."""
    meta = ckpt["meta"]
    try:
        model.load_state_dict(extract_state_dict(ckpt), strict=True)
        # a checkpoint from elsewhere (or damaged) can hold anything here: one line, not a
        # traceback from deep inside the optimizer
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"cannot resume from {path}: {str(e).splitlines()[0] or type(e).__name__}"
                        ) from None
    run.best, run.metrics = meta.get("best") or {}, meta.get("metrics")
    old = meta.get("config") or {}
    changed = [k for k in ("model", "data", "train") if k in old and old[k] != job.cfg[k]]
    if changed:
        log.print(f"note: the {'/'.join(changed)} settings differ from the checkpoint's; "
                  f"continuing with the current ones")
    rngs = ckpt.get("rng") or []
    if len(rngs) == job.dist.world_size:
        return rngs[job.dist.rank]
    log.print(f"note: the checkpoint was written by {len(rngs)} process(es), this run has "
              f"{job.dist.world_size}: random states restart from the seed")
    return None


# ---------------------------------------------------------------- what the loop calls

def _stop_unless_finite(losses, names, job, run, log):
    """Raise NonFiniteLoss (after closing the log) if any update so far had a NaN/inf loss."""
    bad = int(distributed.all_reduce_min(losses.first_bad.clone()).item())
    if bad > job.max_iters:
        return
    log.close()
    last = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, losses.last.tolist()))
    raise NonFiniteLoss(
        f"the loss became non-finite at iteration {bad} ({last}); training stopped and nothing "
        f"was saved after it. "
        + (f"The last good checkpoint is {run.last_path} (iteration {run.last_checkpoint}). "
           if run.last_checkpoint else "")
        + "Lower the learning rate (--cfg-options train.lr=...) or use --amp off, then "
        "continue with --resume"
        + (f" {run.last_path}" if run.last_checkpoint and os.path.abspath(run.last_path) !=
           os.path.abspath(os.path.join(job.work_dir, "latest.pth")) else ""))


def _evaluate(job, run, model, val_set, train_fused, log):
    """Score the model on the validation set (split over the ranks), log it, keep it in
    ``run``; returns whether it is the best vessel Dice so far."""
    path = (os.path.join(job.work_dir, "vis", f"val_iter_{run.iteration}.png")
            if job.dist.is_main else None)
    set_fused(model, None)  # the fused inference path (folded BN) is never slower
    metric, secs = evaluate(model, val_set, job.dist.device, rank=job.dist.rank,
                            world_size=job.dist.world_size, overlay_path=path,
                            weights_change=True)
    set_fused(model, train_fused)
    run.metric, run.metrics = metric, metric.compute()
    run.overlay = path or run.overlay
    m = run.metrics
    log.val(run.iteration, m, secs)
    log.print(f"evaluation at iteration {run.iteration} ({len(val_set)} images, "
              f"{format_duration(secs)}): vessel Dice {m['vessel_dice']:.2f}  "
              f"mDice {m['mDice']:.2f}  mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}")
    if not m["vessel_dice"] > run.best.get("vessel_dice", -math.inf):  # NaN is never the best
        return False
    run.best.update(vessel_dice=m["vessel_dice"], iteration=run.iteration)
    return True


def _save_checkpoint(job, run, model, optimizer, scaler, is_best):
    """Write iter_<N>.pth / latest.pth (and the best one) on rank 0, with every rank's random
    states."""
    rngs = distributed.all_gather_object(state.rng_state())
    run.last_checkpoint = run.iteration
    run.last_path = os.path.join(job.work_dir, "latest.pth")
    if not job.dist.is_main:
        return
    meta = {"config": job.cfg, "config_name": job.cfg["name"], "metrics": run.metrics,
            "best": run.best, "seed": job.seed, "world_size": job.dist.world_size,
            "total_batch_size": job.total_batch}
    state.save_training_checkpoint(job.work_dir, model, optimizer, run.iteration, meta, rngs,
                                   scaler, best=is_best)


def _print_result(job, run, num_val, log, elapsed):
    m = run.metrics
    best_path = os.path.join(job.work_dir, f"{state.BEST_PREFIX}{run.best.get('iteration')}.pth")
    print(f"\nvalidation results of {job.cfg['name']} after {job.max_iters} iterations "
          f"({num_val} images):\n{run.metric.table()}")
    print(f"vessel Dice {m['vessel_dice']:.2f} | mDice {m['mDice']:.2f} | "
          f"mIoU {m['mIoU']:.2f} | aAcc {m['aAcc']:.2f}")
    print(f"checkpoint: {run.last_path}"
          + (f"  (best: {best_path}, vessel Dice {run.best['vessel_dice']:.2f})"
             if os.path.isfile(best_path) else ""))
    print(f"overlay:    {run.overlay}  (green: found, blue: missed, red: false vessel)")
    print(f"curves:     {log.curves_path}")
    print(f"log:        {log.jsonl_path}")
    print(f"total time: {format_duration(elapsed)}")


if __name__ == "__main__":
    sys.exit(main())

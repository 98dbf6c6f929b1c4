"""Train a U-Net: the built-in synthetic default, or any published config from its name.

    python -m fastunet.train                      # synthetic vessels, CPU or GPU, minutes
    python -m fastunet.train --config fcn_unet_s5-d16_64x64_40k_drive --data-root data/DRIVE
    python -m fastunet.train --config fcn_unet_s5-d16_64x64_40k_drive --resume
    python -m fastunet.train --config synthetic --max-iters 200 --cfg-options train.lr=0.02
    torchrun --nproc_per_node=4 -m fastunet.train --config fcn_unet_s5-d16_64x64_40k_drive \\
        --data-root data/DRIVE

The published recipe (SPEC §1): SGD lr 0.01, momentum 0.9, weight decay 5e-4 on all parameters;
poly decay per iteration to 1e-4 over 40k iterations; batch 16 in total (split over the
processes); evaluation and checkpoint every 4k iterations, the best checkpoint by vessel Dice.
It runs channels_last; on CUDA with bf16 autocast (``--amp``); fastunet's fused Conv-BN-ReLU
training kernels where they measured faster (``--fused``; on CPU for full-width backbones only),
optionally ``--compile``d.
Everything goes to ``work_dirs/<config>/``: ``iter_<N>.pth``, ``latest.pth``,
``best_vessel_dice_iter_<N>.pth``, ``log.jsonl``, ``curves.png``, ``vis/`` overlays, TensorBoard
scalars when tensorboard is installed. ``--resume`` continues exactly where the last checkpoint
left off (same weights as an uninterrupted run, on CPU bit for bit).
"""
import argparse
import math
import os
import random
import sys
import textwrap
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from .training.step import TrainStep, set_fused, train_step

__all__ = ["main", "build_parser", "train", "TrainResult", "NonFiniteLoss", "TrainStep"]

AMP_CHOICES = ("auto", "off", "fp16", "bf16")
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


def build_parser():
    """The argument parser of ``python -m fastunet.train``."""
    from .models.configs import list_configs

    from ._cli import ArgumentParser, add_deterministic_flag

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
                        "model.backbone.base_channels=32 data.num_train=10")
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (long first iterations, then faster)")
    add_deterministic_flag(p)
    p.add_argument("--log-interval", type=int, metavar="N",
                   help="iterations between log lines (default: 50, fewer for short runs)")
    return p


def main(argv=None):
    """Entry point of ``python -m fastunet.train`` and ``fastunet-train``; returns the exit code."""
    args = build_parser().parse_args(argv)
    from .atomic import DiskFullError
    from .data import DatasetError, ImageReadError
    from .training.cli import UserError, data_error_message, fail, print_config
    if args.print_config is not None:
        return print_config(PROG, args.print_config or args.config, args.cfg_options)
    try:
        train(args)
    except UserError as e:
        return fail(PROG, e)
    except NonFiniteLoss as e:
        return fail(PROG, e, code=1)
    except (DatasetError, ImageReadError) as e:  # found while reading the data, maybe mid-run
        return fail(PROG, f"{data_error_message(e)} (fix the data, then continue with "
                          f"--resume)", code=1)
    except DiskFullError as e:  # a checkpoint, overlay or log; the previous files are intact
        return fail(PROG, f"{e}; free some space, then continue with --resume", code=1)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; continue with --resume", code=130)
    return 0


def _resolve_amp(amp, device):
    if device.type != "cuda":
        if amp in ("fp16", "bf16"):
            from .training.cli import UserError
            raise UserError(f"--amp {amp} is for CUDA GPUs; on {device} use --amp off (or auto)")
        return None
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def _default_workers(device, local_world):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, (cores or 1) // max(local_world, 1))
    if device.type != "cuda" and cores <= 4:
        return 0  # a worker would take a core from the model; the pipeline costs ~2% here
    return min(8, max(cores - 1, 1))


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _setup(args):
    """Config, process group, device, work dir; raises UserError for bad input."""
    from .training import cli, data as tdata, distributed

    cfg = cli.load_config(args.config, args.cfg_options)
    tcfg = cfg["train"]
    if args.max_iters is not None:
        if args.max_iters <= 0:
            raise cli.UserError(f"--max-iters must be positive, got {args.max_iters}")
        tcfg["max_iters"] = args.max_iters
    if args.batch_size is not None:
        tcfg["batch_size"] = args.batch_size
    for name in ("workers", "log_interval"):
        value, least = getattr(args, name), 0 if name == "workers" else 1
        if value is not None and value < least:
            raise cli.UserError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not isinstance(tcfg.get("batch_size"), int) or tcfg["batch_size"] <= 0:
        raise cli.UserError(f"batch size {tcfg.get('batch_size')!r} must be a positive multiple "
                            f"of the number of processes")
    cli.validate_training_config(cfg)
    cli.check_device(args.device)
    if args.work_dir and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise cli.UserError(f"--work-dir {args.work_dir} exists and is not a folder")
    try:
        dist_info = distributed.init(args.device)
    except RuntimeError as e:
        raise cli.UserError(str(e)) from None
    total = int(tcfg["batch_size"])
    if total <= 0 or total % dist_info.world_size:
        raise cli.UserError(f"batch size {total} must be a positive multiple of the number of "
                            f"processes ({dist_info.world_size})")
    try:
        data_root = tdata.check_data_root(cfg["data"], args.data_root)
    except (tdata.DataRootError, ValueError) as e:
        raise cli.UserError(str(e)) from None
    work_dir = args.work_dir or cli.default_work_dir(cfg)
    return cfg, dist_info, data_root, work_dir


def _restore(path, model, optimizer, scaler, dist_info, cfg, log):
    """Load a training checkpoint; returns (start iteration, best, last metrics, rng state)."""
    from .training import state
    from .training.cli import UserError
    from .models.checkpoint import extract_state_dict

    try:
        ckpt = state.load_training_checkpoint(path)
        state.check_resumable(ckpt, model, optimizer, scaler, cfg["train"]["max_iters"])
        model.load_state_dict(extract_state_dict(ckpt), strict=True)
        meta = ckpt["meta"]
        # a checkpoint from elsewhere (or damaged) can hold anything here: one line, not a
        # traceback from deep inside the optimizer
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        int(meta["iteration"])
    except (ValueError, RuntimeError, OSError, KeyError, TypeError, IndexError,
            AttributeError) as e:
        raise UserError(f"cannot resume from {path}: {str(e).splitlines()[0] or type(e).__name__}"
                        ) from None
    old = meta.get("config") or {}
    changed = [k for k in ("model", "data", "train") if k in old and old[k] != cfg[k]]
    if changed:
        log.print(f"note: the {'/'.join(changed)} settings differ from the checkpoint's; "
                  f"continuing with the current ones")
    rngs = ckpt.get("rng") or []
    rng = rngs[dist_info.rank] if len(rngs) == dist_info.world_size else None
    if rng is None:
        log.print(f"note: the checkpoint was written by {len(rngs)} process(es), this run has "
                  f"{dist_info.world_size}: random states restart from the seed")
    return int(meta["iteration"]), meta.get("best") or {}, meta.get("metrics"), rng


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


def _train(args, restore):
    from .data import build_dataset  # noqa: F401  (import errors surface before any work)
    from .models import build_segmentor, load_checkpoint
    from .training import data as tdata, determinism, distributed, state
    from .training.cli import UserError
    from .training.evaluation import evaluate
    from .training.log import RunLog, format_duration
    from .training.schedule import PolyLR, build_optimizer

    t_start = time.perf_counter()
    cfg, dist_info, data_root, work_dir = _setup(args)
    device, main_rank = dist_info.device, dist_info.is_main
    tcfg, dcfg = cfg["train"], cfg["data"]
    max_iters, total_batch = int(tcfg["max_iters"]), int(tcfg["batch_size"])
    batch = total_batch // dist_info.world_size
    amp_dtype = _resolve_amp(args.amp, device)
    if args.deterministic:
        restore.append(determinism.enable(device))  # also fastunet.set_deterministic
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotuning pays off
    resume_path = None
    if args.resume:
        resume_path = (state.latest_checkpoint(work_dir) if args.resume == "auto"
                       else args.resume)
        if resume_path is None or not os.path.isfile(resume_path):
            raise UserError(f"--resume: no checkpoint in {work_dir} (latest.pth or iter_*.pth)"
                            if args.resume == "auto" else f"--resume: {args.resume} not found")
    if main_rank:
        try:
            os.makedirs(work_dir, exist_ok=True)
            state.remove_stale_temp_files(work_dir)  # of a run killed while saving
        except OSError as e:
            raise UserError(f"cannot create the work dir {work_dir}: {e.strerror or e}") from None

    # ---- data: the training split through mmseg's pipeline, keyed by (seed, epoch, index)
    try:
        if main_rank:  # rank 0 first: the synthetic set may have to be generated once
            train_set = tdata.build_split(dcfg, "training", data_root)
            val_set = tdata.build_split(dcfg, "validation", data_root)
        distributed.barrier()
        if not main_rank:
            train_set = tdata.build_split(dcfg, "training", data_root)
            val_set = tdata.build_split(dcfg, "validation", data_root)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None

    # ---- model: built identically on every rank from the seed
    _seed_all(args.seed)
    try:
        model = build_segmentor(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot build the model of config {cfg['name']}: {e}") from None
    if args.load_from:
        try:
            load_checkpoint(model, args.load_from)
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"--load-from: {str(e).splitlines()[0]}") from None
    model.to(device)
    # channels_last is faster on both devices (cuDNN tensor cores; oneDNN on CPU: 1.4x on the
    # synthetic model)
    model.to(memory_format=torch.channels_last)
    from .conv_plan import train_fused_default

    train_fused = (train_fused_default(model, device) if args.fused == "auto"
                   else args.fused == "on")
    set_fused(model, train_fused)
    sync_bn = dist_info.distributed and device.type == "cuda"
    if sync_bn:  # mmseg trains with SyncBN; DDP allows it on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # ---- optimizer, schedule, mixed precision
    optimizer = build_optimizer(model, tcfg)
    schedule = PolyLR(optimizer, max_iters, tcfg["lr"], tcfg.get("min_lr", 1e-4),
                      tcfg.get("power", 0.9))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    log_interval = args.log_interval or max(1, min(50, max_iters // 40))
    start_iter, best, metrics, rng = 0, {}, None, None
    log = RunLog(work_dir, max_iters, log_interval=log_interval, enabled=False)
    if resume_path:
        start_iter, best, metrics, rng = _restore(resume_path, model, optimizer, scaler,
                                                  dist_info, cfg, log)
    log = RunLog(work_dir, max_iters, start_iter, log_interval, enabled=main_rank)
    _seed_all(args.seed + dist_info.rank)  # dropout masks differ per rank
    if rng is not None:
        try:
            state.set_rng_state(rng)
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as e:
            raise UserError(f"cannot resume from {resume_path}: its random states are damaged "
                            f"({str(e).splitlines()[0]})") from None

    step = TrainStep(model)
    if dist_info.distributed:
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step = torch.compile(step)

    workers = args.workers if args.workers is not None else _default_workers(
        device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loader_gen = torch.Generator().manual_seed(args.seed + dist_info.rank)
    loader = tdata.build_train_loader(
        train_set, dcfg, batch, total_batch, args.seed, start_iter, dist_info.rank,
        dist_info.world_size, workers, pin_memory=device.type == "cuda", generator=loader_gen)

    amp_name = {None: "off (fp32)", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    log.print(f"fastunet.train: config {cfg['name']} | {len(train_set)} training / "
              f"{len(val_set)} validation images | device {device}"
              + (f" x {dist_info.world_size} processes ({dist_info.backend})"
                 if dist_info.distributed else "")
              + f" | batch {total_batch} ({batch} per process) | amp {amp_name} | fused "
              f"{'off' if train_fused is False else 'on'} | "
              f"{max_iters} iterations | work dir {work_dir}")
    if dist_info.distributed and not sync_bn:
        log.print("note: BatchNorm statistics are per process on CPU (DDP supports SyncBN on "
                  "GPUs only)")
    if start_iter:
        log.print(f"resuming from {resume_path} at iteration {start_iter}")
    log.event(start_iter, event="resume" if start_iter else "start", config=cfg["name"],
              world_size=dist_info.world_size, amp=amp_name, device=str(device))

    eval_interval = int(tcfg.get("eval_interval", 4000))
    ckpt_interval = int(tcfg.get("checkpoint_interval", 4000))
    overlay = None

    def checkpoint(iteration, is_best):
        rngs = distributed.all_gather_object(state.rng_state())
        if not main_rank:
            return None
        meta = {"config": cfg, "config_name": cfg["name"], "metrics": metrics, "best": best,
                "seed": args.seed, "world_size": dist_info.world_size,
                "total_batch_size": total_batch}
        return state.save_training_checkpoint(work_dir, model, optimizer, iteration, meta, rngs,
                                              scaler, best=is_best)

    def run_eval(iteration):
        nonlocal metrics, overlay
        path = os.path.join(work_dir, "vis", f"val_iter_{iteration}.png") if main_rank else None
        set_fused(model, None)  # the fused inference path (folded BN) is never slower
        metric, secs = evaluate(model, val_set, device, rank=dist_info.rank,
                                world_size=dist_info.world_size, overlay_path=path,
                                weights_change=True)
        set_fused(model, train_fused)
        metrics = metric.compute()
        overlay = path or overlay
        log.val(iteration, metrics, secs)
        log.print(f"evaluation at iteration {iteration} ({len(val_set)} images, "
                  f"{format_duration(secs)}): vessel Dice {metrics['vessel_dice']:.2f}  "
                  f"mDice {metrics['mDice']:.2f}  mIoU {metrics['mIoU']:.2f}  "
                  f"aAcc {metrics['aAcc']:.2f}")
        improved = metrics["vessel_dice"] > best.get("vessel_dice", -math.inf)
        if improved:
            best.update(vessel_dice=metrics["vessel_dice"], iteration=iteration)
        return metric, improved

    # ---- the loop: one update per iteration, lr from the poly schedule
    model.train()
    data_iter = iter(loader)
    first_bad = torch.full((), max_iters + 1, dtype=torch.int64, device=device)
    sums, count, t_data = None, 0, 0.0
    last_ckpt = start_iter or None  # iteration of the newest checkpoint
    last_path = resume_path  # and its file (outside work_dir when resumed from elsewhere)
    metric = None
    check_every = 1 if device.type == "cpu" else log_interval
    for it in range(start_iter, max_iters):
        lr = schedule.step(it)
        t0 = time.perf_counter()
        images, labels = next(data_iter)
        t_data += time.perf_counter() - t0
        images = images.to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        losses = train_step(step, optimizer, scaler, images, labels, amp_dtype)

        # non-finite losses are caught without a device sync per iteration: the first bad
        # iteration is kept on the device and looked at before anything is logged or saved
        vals = torch.stack([v.detach().float() for v in losses.values()])
        first_bad = torch.where(torch.isfinite(vals).all() | (first_bad <= max_iters),
                                first_bad, torch.full_like(first_bad, it + 1))
        sums = vals if sums is None else sums + vals
        count += 1
        done = it + 1
        log_due = done % log_interval == 0 or done == max_iters
        eval_due = done % eval_interval == 0 or done == max_iters
        ckpt_due = done % ckpt_interval == 0 or done == max_iters
        if done % check_every == 0 or log_due or eval_due or ckpt_due:
            bad = int(distributed.all_reduce_min(first_bad.clone()).item())
            if bad <= max_iters:
                log.close()
                raise NonFiniteLoss(
                    f"the loss became non-finite at iteration {bad} ("
                    + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    + f"); training stopped and nothing was saved after it. "
                    + (f"The last good checkpoint is {last_path} (iteration {last_ckpt}). "
                       if last_ckpt else "")
                    + "Lower the learning rate (--cfg-options train.lr=...) or use --amp off, "
                    "then continue with --resume"
                    + (f" {last_path}" if last_ckpt and os.path.abspath(last_path) !=
                       os.path.abspath(os.path.join(work_dir, "latest.pth")) else ""))
        if log_due:
            means = (distributed.all_reduce_sum(sums.clone()) / dist_info.world_size).tolist()
            extra = {"data_time": t_data / count}
            if device.type == "cuda":
                extra["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            log.train(done, {k: v / count for k, v in zip(losses, means)}, lr, extra)
            sums, t_data, count = None, 0.0, 0
        else:
            log.advance(done)
        improved = False
        if eval_due:
            metric, improved = run_eval(done)
        if ckpt_due or improved:
            checkpoint(done, improved)
            last_ckpt, last_path = done, os.path.join(work_dir, "latest.pth")
    log.close()

    # ---- the result: metrics table, checkpoint, pictures
    if metric is None:  # resumed a finished run: evaluate its final weights
        metric, _ = run_eval(max_iters)
    if main_rank:
        elapsed = time.perf_counter() - t_start
        best_path = os.path.join(work_dir, f"{state.BEST_PREFIX}{best.get('iteration')}.pth")
        print(f"\nvalidation results of {cfg['name']} after {max_iters} iterations "
              f"({len(val_set)} images):\n{metric.table()}")
        print(f"vessel Dice {metrics['vessel_dice']:.2f} | mDice {metrics['mDice']:.2f} | "
              f"mIoU {metrics['mIoU']:.2f} | aAcc {metrics['aAcc']:.2f}")
        print(f"checkpoint: {last_path}"
              + (f"  (best: {best_path}, vessel Dice {best['vessel_dice']:.2f})"
                 if os.path.isfile(best_path) else ""))
        print(f"overlay:    {overlay}  (green: found, blue: missed, red: false vessel)")
        print(f"curves:     {log.curves_path}")
        print(f"log:        {log.jsonl_path}")
        print(f"total time: {format_duration(elapsed)}")
    distributed.barrier()
    distributed.shutdown()
    return TrainResult(model, metrics, work_dir, max_iters)


if __name__ == "__main__":
    sys.exit(main())

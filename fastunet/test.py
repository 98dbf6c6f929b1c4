"""Evaluate a checkpoint on a dataset's validation split: mmseg's per-class table and summary.

    python -m fastunet.test --config fcn_unet_s5-d16_64x64_40k_drive \\
        --checkpoint work_dirs/fcn_unet_s5-d16_64x64_40k_drive/latest.pth --data-root data/DRIVE
    python -m fastunet.test --config unet-s5-d16_fcn_4xb4-40k_drive-64x64 \\
        --checkpoint fcn_unet_s5-d16_64x64_40k_drive_20201223_191051-5daf6d3b.pth  # mmseg's file
    python -m fastunet.test --checkpoint work_dirs/synthetic/latest.pth \\
        --fov --json results.json --save-predictions preds/     # the config stored in the file

Images are predicted at native resolution in the config's test mode (``slide`` for the published
configs, as mmseg) or ``--mode`` (``--tta`` adds flipped predictions); metrics are pooled over
all validation pixels (label 255 ignored; ``--fov`` also ignores pixels outside the
field-of-view mask, as papers often score). Printed: mmseg's per-class and summary tables, then
the retinal-vessel papers' sensitivity, specificity, accuracy, AUC-ROC (of the vessel
probability, pooled over the data set) and Dice (``fastunet.metrics`` defines each). Runs under
torchrun too (images shared among the processes).
"""
import argparse
import json
import os
import sys
import time

import torch

__all__ = ["main", "build_parser", "run_test"]

PROG = "python -m fastunet.test"


def build_parser():
    """The argument parser of ``python -m fastunet.test``."""
    from ._cli import ArgumentParser, add_deterministic_flag, add_max_pixels_flag
    from .training.evaluation import TEST_MODES

    p = ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a trained model (a fastunet or mmseg checkpoint) on the validation\n"
                    "split of its dataset and print the per-class and summary tables.",
        epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--config",
                   help="config name or file the model was trained with (default: the one "
                        "stored in the checkpoint; fastunet's checkpoints and mmseg's with their "
                        "config text carry it)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file: fastunet's (work_dirs/...) or mmseg's")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset folder: a converted root, or images/<split>/ and "
                        "masks/<split>/ with data.dataset=folder (default: the config's "
                        "data_root; none for synthetic, which generates its images)")
    p.add_argument("--mode", choices=TEST_MODES,
                   help="inference mode (default: the config's; slide for published configs)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="compute precision of the network: fp32 (default; mmseg's published "
                        "numbers are fp32), bf16/fp16 (autocast; averaging stays fp32) or auto "
                        "(bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--fov", action="store_true",
                   help="score only pixels inside the field-of-view masks")
    p.add_argument("--tta", choices=("none", "h", "v", "hv"), default="none",
                   help="test-time augmentation: also predict horizontally (h), vertically (v) "
                        "or both-ways (hv) flipped images and average the logits (2x / 4x the "
                        "work); default none")
    p.add_argument("--save-predictions", metavar="DIR",
                   help="write each prediction as DIR/<name>.png (vessel 255, background 0)")
    p.add_argument("--json", metavar="PATH", help="write the metrics as JSON to PATH")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config entries, e.g. model.test_cfg.stride=(32,32)")
    add_max_pixels_flag(p)
    add_deterministic_flag(p)
    return p


def main(argv=None):
    """Entry point of ``python -m fastunet.test`` and ``fastunet-test``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._cli import apply_deterministic_flag, apply_max_pixels_flag
    from .atomic import DiskFullError
    from .data import DatasetError, ImageReadError
    from .training.cli import UserError, data_error_message, fail
    restore_limit = apply_max_pixels_flag(args, parser)
    restore = apply_deterministic_flag(args)
    try:
        run_test(args)
    except UserError as e:
        return fail(PROG, e)
    except (DatasetError, ImageReadError) as e:
        return fail(PROG, data_error_message(e), code=1)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", code=130)
    except DiskFullError as e:  # --json or --save-predictions
        return fail(PROG, e, code=1)
    finally:
        restore()
        restore_limit()
    return 0


def run_test(args):
    """Evaluate as ``args`` say; prints the tables and returns the metrics dict."""
    from .inference import resolve_precision
    from .training import cli, data as tdata, distributed
    from .training.evaluation import evaluate

    cfg, ckpt = _config_and_checkpoint(args)
    cli.check_device(args.device)
    _check_output_paths(args)
    try:
        dist_info = distributed.init(args.device)
    except RuntimeError as e:
        raise cli.UserError(str(e)) from None
    try:
        val_set = _ColourCheck(tdata.build_split(cfg["data"], "validation", args.data_root))
    except (tdata.DataRootError, FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e).splitlines()[0]) from None
    if ckpt is None:  # with --config, the data is checked before the checkpoint is read
        ckpt = cli.read_checkpoint(args.checkpoint)
    model, meta = _load_model(cfg, ckpt, args.checkpoint, dist_info.device)
    mode = args.mode or model.test_cfg.get("mode", "whole")
    tta = None if args.tta == "none" else args.tta
    precision = resolve_precision(args.precision, dist_info.device)
    if dist_info.is_main:
        it = meta.get("iteration", meta.get("iter"))
        print(f"fastunet.test: {cfg['name']} | checkpoint {args.checkpoint}"
              + (f" (iteration {it})" if it is not None else "")
              + f" | {len(val_set)} validation images | mode {mode}"
              + (f" | TTA {tta}" if tta else "") + (" | FOV only" if args.fov else "")
              + f" | device {dist_info.device}"
              + (f" | precision {precision}" if precision != "fp32" else ""),
              flush=True)
    progress = None
    if dist_info.is_main and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=-(-len(val_set) // dist_info.world_size), unit="img", leave=False)
        progress = lambda done, total: bar.update(done - bar.n)
    try:
        with torch.inference_mode():
            metric, seconds = evaluate(model, val_set, dist_info.device, mode=args.mode,
                                       use_fov=args.fov, rank=dist_info.rank,
                                       world_size=dist_info.world_size,
                                       save_dir=args.save_predictions, progress=progress,
                                       tta=tta, precision=precision)
    except ValueError as e:
        raise cli.UserError(str(e).splitlines()[0]) from None
    metrics = metric.compute()
    if dist_info.is_main:
        _print_results(args, metric, metrics, val_set, seconds)
        if args.json:
            _write_json(args, dict(config=cfg["name"], mode=mode, tta=tta, precision=precision,
                                   device=str(dist_info.device)), metric, metrics,
                        len(val_set), seconds)
    distributed.shutdown()
    return metrics


def _config_and_checkpoint(args):
    """The config (--config's, else the checkpoint's own) and, when it had to be read for
    that, the checkpoint (else None: read later)."""
    from .training import cli

    if args.config is not None:
        return cli.load_config(args.config, args.cfg_options), None
    ckpt = cli.read_checkpoint(args.checkpoint)
    return _checkpoint_config(ckpt, args.checkpoint, args.cfg_options), ckpt


def _check_output_paths(args):
    from .training.cli import UserError

    if args.json and os.path.isdir(args.json):
        raise UserError(f"--json {args.json} is a folder; give a file name")
    if args.save_predictions and os.path.exists(args.save_predictions) and not os.path.isdir(
            args.save_predictions):
        raise UserError(f"--save-predictions {args.save_predictions} exists and is not a "
                        f"folder")


def _load_model(cfg, ckpt, path, device):
    """The config's segmentor with the checkpoint's weights, in eval mode and channels_last on
    ``device``; returns it and the checkpoint's meta."""
    from .models.checkpoint import load_state
    from .training.cli import UserError, build_model

    model = build_model(cfg)
    try:
        meta = load_state(model, ckpt, path)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    model.to(device).eval()
    model.to(memory_format=torch.channels_last)  # faster on CPU (oneDNN) and GPU (cuDNN)
    return model, meta


def _print_results(args, metric, metrics, val_set, seconds):
    if val_set.grayscale:
        from .inference.predictor import COLOUR_ADVICE

        print(f"{PROG}: warning: {len(val_set.grayscale)} of the images scored here are "
              f"grayscale (e.g. {val_set.grayscale[0]}); {COLOUR_ADVICE}", file=sys.stderr,
              flush=True)
    print(metric.table())
    print(metric.vessel_table())
    print(f"vessel Dice {metrics['vessel_dice']:.2f} | mDice {metrics['mDice']:.2f} | "
          f"mIoU {metrics['mIoU']:.2f} | aAcc {metrics['aAcc']:.2f} | "
          f"{len(val_set)} images in {seconds:.1f} s")
    if args.save_predictions:
        print(f"predictions: {args.save_predictions}")


def _write_json(args, run, metric, metrics, num_images, seconds):
    """--json: what ran (``run``: config, mode, tta, precision, device) and the metrics."""
    from .atomic import atomic_write

    record = {"config": run["config"], "checkpoint": os.path.abspath(args.checkpoint),
              "mode": run["mode"], "tta": run["tta"], "precision": run["precision"],
              "fov": bool(args.fov), "num_images": num_images,
              # AUC from a histogram: its largest possible error, in the same unit
              "vessel_auc_max_error": metric.auc_error_bound(),
              "seconds": seconds, "device": run["device"],
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": metrics}
    folder = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(folder, exist_ok=True)
    with atomic_write(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"json: {args.json}")


def _checkpoint_config(ckpt, path, cfg_options):
    """The config stored in the checkpoint, with --cfg-options applied (UserError otherwise)."""
    from .models import apply_overrides
    from .models.checkpoint import checkpoint_config
    from .models.configs import ConfigKeyError
    from .training.cli import UserError

    try:
        cfg = checkpoint_config(ckpt, path)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        return apply_overrides(cfg, cfg_options)
    except (ConfigKeyError, ValueError) as e:
        raise UserError(f"--cfg-options: {e}") from None


class _ColourCheck:
    """A dataset whose items are noted when their image is grayscale (warned about once, after
    scoring); everything else is the wrapped dataset's."""

    def __init__(self, dataset):
        self.dataset, self.grayscale = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from .inference.predictor import is_grayscale

        item = self.dataset[index]
        if is_grayscale(item["img"]):
            self.grayscale.append(item.get("name", index))
        return item

    def __getattr__(self, name):  # CLASSES and the like
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


if __name__ == "__main__":
    sys.exit(main())

"""Segment your own images: vessel masks, probability maps and overlays as PNG files.

    python -m fastunet.predict --config fcn_unet_s5-d16_64x64_40k_drive --checkpoint drive.pth \\
        photos/ extra/scan.tif --out-dir predictions
    python -m fastunet.predict --config ... --checkpoint ... images/ --out-dir out \\
        --save-probs --mode overlap-tile --precision bf16 --tta hv

For each image NAME.EXT it writes NAME_mask.png (vessels 255, background 0), NAME_overlay.png
(the vessels tinted green over the image) and, with --save-probs, NAME_prob.png (vessel
probability x 255). Folders are searched recursively and their layout is kept under --out-dir.
Files are written atomically (no partial PNG after a crash; temporary files a killed run left
are deleted by the next run into the same --out-dir). A file that cannot be read or
segmented is reported in one line and skipped; the others are still processed, and the exit
status is 1 if any was skipped (2 for bad arguments).
"""
import argparse
import os
import sys
import warnings

import numpy as np

from ._cli import ArgumentParser, add_deterministic_flag, apply_deterministic_flag, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".webp", ".jp2")
OVERLAY_COLOUR = np.array([0, 255, 0], dtype=np.float32)
OVERLAY_ALPHA = 0.6


def _stem(name):
    base = name[:-3] if name.lower().endswith(".gz") else name
    stem, _ = os.path.splitext(base)
    return stem


def _is_image(name):
    base = name[:-3] if name.lower().endswith(".gz") else name
    return not name.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def collect_inputs(inputs):
    """Inputs (files or folders) -> [(path, output stem relative to --out-dir)], and the inputs
    that do not exist. Folders are walked recursively (sorted); an explicitly named file is
    taken whatever its extension. Clashing stems (a.png and a.tif) keep their extension."""
    found, missing = [], []
    for arg in inputs:
        if os.path.isdir(arg):
            for root, dirs, files in os.walk(arg):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = os.path.relpath(root, arg)
                for name in sorted(files):
                    if _is_image(name):
                        found.append((os.path.join(root, name),
                                      os.path.normpath(os.path.join(rel, _stem(name)))))
        elif os.path.isfile(arg):
            found.append((arg, _stem(os.path.basename(arg))))
        else:
            missing.append(arg)
    counts = {}
    for _, stem in found:
        counts[stem] = counts.get(stem, 0) + 1
    out, seen = [], set()
    for path, stem in found:
        if counts[stem] > 1:
            stem = os.path.join(os.path.dirname(stem), os.path.basename(path).replace(".", "_"))
        if stem in seen:  # the same file named twice
            continue
        seen.add(stem)
        out.append((path, stem))
    return out, missing


def overlay(rgb, mask):
    """The image with the masked pixels tinted OVERLAY_COLOUR (HxWx3 uint8)."""
    out = rgb.copy()  # only the masked pixels go through float (a large image stays uint8)
    tinted = (1 - OVERLAY_ALPHA) * rgb[mask].astype(np.float32) + OVERLAY_ALPHA * OVERLAY_COLOUR
    out[mask] = np.rint(tinted).astype(np.uint8)
    return out


def build_parser():
    """The argument parser (``--help`` documents every option)."""
    from .inference.engine import MODES, PRECISIONS

    p = ArgumentParser(
        prog="python -m fastunet.predict",
        description="Segment vessels in images with a trained fastunet / mmseg checkpoint and "
                    "write masks, overlays and (optionally) probability maps as PNG.",
        epilog="outputs per image NAME: NAME_mask.png (vessels 255), NAME_overlay.png, and\n"
               "with --save-probs NAME_prob.png, written atomically under --out-dir.\n\n"
               "Exit status: 0 all images written; 1 some images were skipped (each reported\n"
               "on stderr in one line); 2 bad arguments, config or checkpoint; 130 interrupted.\n"
               "Each PNG appears only once complete (written to a hidden .NAME.*.tmp file, then\n"
               "renamed), so an interrupted run never leaves a partial output; the next run\n"
               "into the same --out-dir deletes temporary files that a killed run left.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS",
                   help="image files and/or folders (searched recursively for "
                        + ", ".join(IMAGE_EXTENSIONS) + ", also gzip-compressed)")
    p.add_argument("--config", required=True,
                   help="config name, e.g. fcn_unet_s5-d16_64x64_40k_drive (python -c 'import "
                        "fastunet; print(fastunet.list_configs())' lists them; mmseg 1.x names "
                        "work too)")
    p.add_argument("--checkpoint", required=True,
                   help="trained weights: a fastunet or mmseg .pth checkpoint")
    p.add_argument("--out-dir", required=True, help="folder for the output PNGs (created)")
    p.add_argument("--save-probs", action="store_true",
                   help="also write NAME_prob.png: the vessel probability scaled to 0..255")
    p.add_argument("--no-overlay", action="store_true", help="do not write NAME_overlay.png")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="compute precision of the network (fp16/bf16 use autocast, the "
                        "averaging stays fp32). auto (default): bf16 on CPUs with native bf16 "
                        "(AVX512-BF16 or AMX), else fp32; fp32 reproduces mmseg's numbers "
                        "exactly")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="slide: the config's overlapping windows, averaged (exactly as mmseg, "
                        "the published numbers); overlap-tile: large reflect-padded tiles with a "
                        "context margin (faster); whole: the whole image in one pass (fastest, "
                        "most memory). Default: the config's test mode (slide)")
    p.add_argument("--tta", choices=("none", "h", "v", "hv"), default="none",
                   help="test-time augmentation: also predict horizontally (h), vertically (v) "
                        "or both-ways (hv) flipped windows and average (2x / 4x the work); "
                        "default none")
    p.add_argument("--window-batch", type=int, default=None, metavar="N",
                   help="windows per forward pass (default: planned for the device: the CPU's "
                        "cache, the GPU's free memory)")
    p.add_argument("--gaussian", action="store_true",
                   help="weight window pixels by a Gaussian (sigma = window/8) instead of the "
                        "plain average (slide / overlap-tile)")
    p.add_argument("--tile-size", type=int, default=1024,
                   help="overlap-tile: input tile size in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--margin", type=int, default=32,
                   help="overlap-tile: context margin in pixels cropped from each tile "
                        "(default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_deterministic_flag(p)
    return p


def main(argv=None):
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = "fastunet.predict"
    if args.window_batch is not None and args.window_batch < 1:
        parser.error(f"--window-batch must be >= 1, got {args.window_batch}")
    files, missing = collect_inputs(args.inputs)
    if not files:
        what = ("no images found: no such file or folder: " + ", ".join(missing) if missing
                else "no images found in " + ", ".join(args.inputs))
        print(f"{prog}: error: {what}", file=sys.stderr)
        return 2
    for path in missing:
        print(f"{prog}: skipped {path}: no such file or folder", file=sys.stderr)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        print(f"{prog}: error: --out-dir {args.out_dir} exists and is not a folder",
              file=sys.stderr)
        return 2

    from tqdm import tqdm

    from .data.io import decode_image, remove_stale_temp_files, write_png
    from .inference.predictor import Predictor, prefetch_files

    restore = apply_deterministic_flag(args)
    try:
        try:
            predictor = Predictor(args.config, args.checkpoint, device=args.device,
                                  precision=args.precision, mode=args.mode,
                                  window_batch=args.window_batch,
                                  tta=None if args.tta == "none" else args.tta,
                                  gaussian=args.gaussian, tile_size=args.tile_size,
                                  margin=args.margin)
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            # hidden .NAME.<pid>.<hex>.tmp files of an earlier run that was killed mid-write
            remove_stale_temp_files(args.out_dir)
        except OSError as exc:
            print(f"{prog}: error: cannot create --out-dir {args.out_dir}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
        return _predict_files(args, prog, predictor, files, missing, tqdm, decode_image,
                              write_png, prefetch_files)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs written so far are complete", file=sys.stderr)
        return 130
    finally:
        restore()


def _predict_files(args, prog, predictor, files, missing, tqdm, decode_image, write_png,
                   prefetch_files):
    failed = len(missing)
    written = 0
    stems = dict(files)
    bar = tqdm(total=len(files), unit="img", disable=args.quiet, file=sys.stderr,
               desc=prog)
    for path, data in prefetch_files([f for f, _ in files]):
        try:
            if isinstance(data, BaseException):
                raise data
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    rgb = decode_image(data, str(path))
                    result = predictor.predict(rgb, return_probs=args.save_probs)
                finally:  # the image's warnings, also when it is skipped
                    for w in caught:
                        message = str(w.message)
                        bar.write(f"{prog}: warning: " + (
                            message if str(path) in message else f"{path}: {message}"),
                            file=sys.stderr)
            labels, probs = result if args.save_probs else (result, None)
            out = os.path.join(args.out_dir, stems[path])
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            mask = labels > 0
            write_png(out + "_mask.png", mask.astype(np.uint8) * 255)
            if probs is not None:
                probs *= 255  # in place: no float copies of a large image
                write_png(out + "_prob.png", np.rint(probs, out=probs).astype(np.uint8))
            if not args.no_overlay:
                write_png(out + "_overlay.png", overlay(rgb, mask))
            written += 1
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one bad file must not stop the others
            failed += 1
            message = one_line(exc)
            if isinstance(exc, MemoryError):
                message = ("not enough memory for this image; try --mode overlap-tile or a "
                           "smaller --window-batch")
            if str(path) not in message:
                message = f"{path}: {message}"
            bar.write(f"{prog}: skipped {message}", file=sys.stderr)
        bar.update(1)
    bar.close()
    total = len(files) + len(missing)
    print(f"{prog}: wrote {written} of {total} images to {args.out_dir}"
          + (f" ({failed} skipped)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

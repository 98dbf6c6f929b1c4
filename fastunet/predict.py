"""Segment your own images: vessel masks, probability maps and overlays as PNG files.

    python -m fastunet.predict photo.jpg               # fastunet's pretrained weights -> predictions/
    python -m fastunet.predict photos/ --checkpoint work_dirs/synthetic/latest.pth --out-dir out
    python -m fastunet.predict --config fcn_unet_s5-d16_64x64_40k_drive --checkpoint drive.pth \\
        photos/ extra/scan.tif --out-dir predictions --save-probs --mode overlap-tile --tta hv

Without --checkpoint it uses the weights that ship with fastunet (trained on synthetic fundus
images only: plausible vessels on real photographs, not accurate ones; fine-tune them on
annotated real images for accuracy) and says so once. A checkpoint carries its config, so
--config is only needed for checkpoints without one (bare state_dicts, some mmseg files).
--fov-diameter auto (default) rescales each photo so that its field of view (the bright disc on
the dark border) is as wide as the training images' when the checkpoint records their width (the
shipped weights do; others are segmented at their own scale), and brings the results back to the
photo's size (fastunet.inference.fov); --fov-diameter N rescales to N pixels, off never.

For each image NAME.EXT it writes NAME_mask.png (vessels 255, background 0), NAME_overlay.png
(the vessels tinted green over the image) and, with --save-probs, NAME_prob.png (vessel
probability x 255). Folders are searched recursively and their layout is kept under --out-dir;
inputs that would share an output name (a/x.png and b/x.png) keep as much of their path as tells
them apart (a/x_mask.png, b/x_mask.png). Files are written atomically (no partial PNG after a
crash; temporary files a killed run left are deleted by the next run into the same --out-dir).

Nothing is lost when --out-dir is (or holds) an input folder: every output carries a PNG text
chunk (Software: fastunet.predict), and files named NAME_mask/_overlay/_prob.png that carry it are
never taken as inputs, so a second run neither re-segments its own outputs nor multiplies them;
an output that would replace an input image (a user's own x_mask.png beside x.png) stops the run
before anything is written. A file that cannot be read or segmented is reported in one line and
skipped; the others are still processed, and the exit status is 1 if any was skipped (2 for bad
arguments). A full disk stops the run with one line naming the file.
"""
import argparse
import os
import sys
import warnings

import numpy as np

from ._cli import (ArgumentParser, add_deterministic_flag, add_max_pixels_flag,
                   apply_deterministic_flag, apply_max_pixels_flag, fail, one_line)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".webp", ".jp2")
OVERLAY_COLOUR = np.array([0, 255, 0], dtype=np.float32)
OVERLAY_ALPHA = 0.6
PROG = "fastunet.predict"
# the PNG text chunk that marks this command's outputs, and the names they have
MARKER = {"Software": "fastunet.predict"}
OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png", "_prob.png")


def _stem(name):
    base = name[:-3] if name.lower().endswith(".gz") else name
    stem, _ = os.path.splitext(base)
    return stem


def _is_image(name):
    base = name[:-3] if name.lower().endswith(".gz") else name
    return not name.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def is_prediction(path):
    """Whether a file is an output of this command: named like one and carrying its marker."""
    if not os.path.basename(path).lower().endswith(OUTPUT_SUFFIXES):
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header and the text chunks before the pixels
            return all(img.info.get(k) == v for k, v in MARKER.items())
    except Exception:  # unreadable: not ours (predict will report it)
        return False


def _disambiguate(found):
    """Output stems for [(path, natural stem)] that are unique (case-insensitively): clashing
    inputs keep their folders relative to the clash's common folder, then their extension."""
    def with_folders(path, common):
        return os.path.relpath(_stem_path(path), common)

    def with_extension(path, common):
        rel = os.path.relpath(os.path.abspath(path), common)
        return os.path.join(os.path.dirname(rel), os.path.basename(rel).replace(".", "_"))

    stems = [stem for _, stem in found]
    for rename in (with_folders, with_extension):
        groups = {}
        for i, stem in enumerate(stems):
            groups.setdefault(os.path.normcase(stem).lower(), []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            break
        for group in clashes:
            common = os.path.commonpath([os.path.dirname(os.path.abspath(found[i][0]))
                                         for i in group])
            for i in group:
                stems[i] = os.path.normpath(rename(found[i][0], common))
    return stems


def _stem_path(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, _stem(name))


def collect_inputs(inputs):
    """Inputs (files or folders) -> ([(path, output stem relative to --out-dir)], the inputs
    that do not exist, the number of this command's own outputs skipped in folders). Folders are
    walked recursively (sorted); an explicitly named file is taken whatever its extension; a
    file named twice counts once."""
    found, missing, own, seen = [], [], 0, set()
    for arg in inputs:
        if os.path.isdir(arg):
            for root, dirs, files in os.walk(arg):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = os.path.relpath(root, arg)
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if not _is_image(name):
                        continue
                    if is_prediction(path):
                        own += 1
                        continue
                    found.append((path, os.path.normpath(os.path.join(rel, _stem(name)))))
        elif os.path.isfile(arg):
            found.append((arg, _stem(os.path.basename(arg))))
        else:
            missing.append(arg)
    unique = []
    for path, stem in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, stem))
    return list(zip([p for p, _ in unique], _disambiguate(unique))), missing, own


def output_names(args):
    """The suffixes this run writes for each image."""
    return (["_mask.png"] + ([] if args.no_overlay else ["_overlay.png"])
            + (["_prob.png"] if args.save_probs else []))


def _replaced_input(files, out_dir, suffixes):
    """(output, input) when an output path is one of the input images, else None."""
    inputs = {os.path.realpath(path): path for path, _ in files}
    for _, stem in files:
        for suffix in suffixes:
            out = os.path.join(out_dir, stem + suffix)
            real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(out))),
                                os.path.basename(out))
            if real in inputs:
                return out, inputs[real]
    return None


def overlay(rgb, mask):
    """The image with the masked pixels tinted OVERLAY_COLOUR (HxWx3 uint8)."""
    out = rgb.copy()  # only the masked pixels go through float (a large image stays uint8)
    tinted = (1 - OVERLAY_ALPHA) * rgb[mask].astype(np.float32) + OVERLAY_ALPHA * OVERLAY_COLOUR
    out[mask] = np.rint(tinted).astype(np.uint8)
    return out


# One add_argument per option with its help: a list to read, longer than 60 lines by nature.
def build_parser():
    """The argument parser (``--help`` documents every option)."""
    from .inference.engine import MODES, PRECISIONS

    p = ArgumentParser(
        prog="python -m fastunet.predict",
        description="Segment the vessels of colour fundus photographs, with the weights "
                    "shipped with fastunet (default) or a trained fastunet / mmseg checkpoint, "
                    "and write masks, overlays and (optionally) probability maps as PNG.",
        epilog="outputs per image NAME: NAME_mask.png (vessels 255), NAME_overlay.png, and\n"
               "with --save-probs NAME_prob.png, written atomically under --out-dir, each\n"
               "marked with a PNG text chunk (Software: fastunet.predict). Folders keep their\n"
               "layout; inputs that would share a name keep as much of their path as needed.\n\n"
               "Nothing is lost when --out-dir is an input folder: marked outputs are never\n"
               "taken as inputs, and a run whose output would replace an input image stops\n"
               "before writing anything.\n\n"
               "Exit status: 0 all images written; 1 some images were skipped (each reported\n"
               "on stderr in one line) or the disk is full; 2 bad arguments, config or\n"
               "checkpoint; 130 interrupted. Each PNG appears only once complete (written to a\n"
               "hidden .NAME.<pid>.<hex>.tmp file, then renamed), so an interrupted run never\n"
               "leaves a partial output; the next run into the same --out-dir deletes\n"
               "temporary files that a killed run left.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS",
                   help="image files and/or folders (searched recursively for "
                        + ", ".join(IMAGE_EXTENSIONS) + ", also gzip-compressed)")
    p.add_argument("--checkpoint", default=None,
                   help="trained weights: a fastunet or mmseg .pth checkpoint (default: the "
                        "weights shipped with fastunet, trained on synthetic fundus images)")
    p.add_argument("--config", default=None,
                   help="the checkpoint's config: a name such as fcn_unet_s5-d16_64x64_40k_drive "
                        "(python -c 'import fastunet; print(fastunet.list_configs())' lists them; "
                        "mmseg 1.x names work too) or a config file. Default: the one stored in "
                        "the checkpoint (fastunet's checkpoints and mmseg's with their config "
                        "text carry it)")
    p.add_argument("--out-dir", default="predictions",
                   help="folder for the output PNGs (created; default: predictions)")
    p.add_argument("--fov-diameter", type=_fov_diameter, default="auto", metavar="auto|off|N",
                   help="rescale each photo so that its field of view (the bright disc on the "
                        "dark border) is this many pixels across, and the results back to the "
                        "photo's size: auto (default) = the training images' diameter when the "
                        "checkpoint records it (the shipped weights do: about 540, DRIVE's), "
                        "else no rescaling; off = segment photos at their own scale")
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
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, no note that the shipped weights are used")
    add_max_pixels_flag(p)
    add_deterministic_flag(p)
    return p


def main(argv=None):
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.window_batch is not None and args.window_batch < 1:
        parser.error(f"--window-batch must be >= 1, got {args.window_batch}")
    restore_limit = apply_max_pixels_flag(args, parser)
    try:
        return _run(args)
    finally:
        restore_limit()


def _run(args):
    files, missing, own = collect_inputs(args.inputs)
    if not files:
        what = ("no images found: no such file or folder: " + ", ".join(missing) if missing
                else "no images found in " + ", ".join(args.inputs))
        return fail(PROG, what)
    for path in missing:
        print(f"{PROG}: skipped {path}: no such file or folder", file=sys.stderr)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        return fail(PROG, f"--out-dir {args.out_dir} exists and is not a folder")
    clash = _replaced_input(files, args.out_dir, output_names(args))
    if clash:
        return fail(PROG, f"the output {clash[0]} would replace the input image {clash[1]}; "
                          f"choose another --out-dir (nothing was written)")
    if own:
        print(f"{PROG}: note: {own} file(s) this command wrote earlier (marked "
              f"NAME_mask/_overlay/_prob.png) are not taken as inputs", file=sys.stderr)

    from tqdm import tqdm

    from .atomic import remove_stale_temp_files
    from .data.io import decode_image
    from .inference.predictor import Predictor, prefetch_files

    if args.config is not None and args.checkpoint is None:
        return fail(PROG, "--config names the config of a --checkpoint: give both (without "
                          "either, the shipped pretrained weights and their config are used)")
    restore = apply_deterministic_flag(args)
    try:
        try:
            predictor = _build_predictor(args, Predictor)
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
            return fail(PROG, exc)
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            remove_stale_temp_files(args.out_dir)  # of an earlier run killed mid-write
        except OSError as exc:
            return fail(PROG, f"cannot create --out-dir {args.out_dir}: {exc.strerror or exc}")
        return _predict_files(args, predictor, files, missing, tqdm, decode_image,
                              prefetch_files)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; outputs written so far are complete", file=sys.stderr)
        return 130
    finally:
        restore()


def _build_predictor(args, Predictor):
    """The Predictor the arguments describe; the shipped weights (said once) without
    --checkpoint."""
    options = dict(device=args.device, precision=args.precision, mode=args.mode,
                   window_batch=args.window_batch, tta=None if args.tta == "none" else args.tta,
                   gaussian=args.gaussian, tile_size=args.tile_size, margin=args.margin,
                   fov_diameter=args.fov_diameter)
    if args.checkpoint is not None:
        return Predictor(args.config, args.checkpoint, **options)
    predictor = Predictor.pretrained(**options)
    if not args.quiet:
        rescale = (f"; photos rescaled to a field of view {predictor.fov_diameter:.0f} pixels "
                   f"across" if predictor.fov_diameter else "")
        print(f"{PROG}: using fastunet's pretrained weights (trained on synthetic images only: "
              f"fine-tune on annotated photos for accuracy){rescale}", file=sys.stderr)
    return predictor


def _fov_diameter(text):
    """--fov-diameter's value: 'auto', None for 'off', or a number of pixels."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 16 <= value <= 100000:
        raise argparse.ArgumentTypeError(f"expected auto, off or a diameter in pixels (16 to 100000), "
                                f"got {text!r}")
    return value


def _write_outputs(args, out, rgb, labels, probs):
    from .data.io import write_png

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    mask = labels > 0
    write_png(out + "_mask.png", mask.astype(np.uint8) * 255, text=MARKER)
    if probs is not None:
        probs *= 255  # in place: no float copies of a large image
        write_png(out + "_prob.png", np.rint(probs, out=probs).astype(np.uint8), text=MARKER)
    if not args.no_overlay:
        write_png(out + "_overlay.png", overlay(rgb, mask), text=MARKER)


def _predict_files(args, predictor, files, missing, tqdm, decode_image, prefetch_files):
    from .atomic import DiskFullError

    failed = len(missing)
    written = 0
    stems = dict(files)
    total = len(files) + len(missing)
    bar = tqdm(total=len(files), unit="img", disable=args.quiet, file=sys.stderr, desc=PROG)
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
                        bar.write(f"{PROG}: warning: " + (
                            message if str(path) in message else f"{path}: {message}"),
                            file=sys.stderr)
            labels, probs = result if args.save_probs else (result, None)
            _write_outputs(args, os.path.join(args.out_dir, stems[path]), rgb, labels, probs)
            written += 1
        except KeyboardInterrupt:
            raise
        except DiskFullError as exc:  # every later image would fail the same way: stop
            bar.close()
            return fail(PROG, f"{exc}; stopped after writing {written} of {total} images "
                              f"(the outputs written are complete)", code=1)
        except Exception as exc:  # one bad file must not stop the others
            failed += 1
            message = one_line(exc)
            if isinstance(exc, MemoryError):
                message = ("not enough memory for this image; try --mode overlap-tile or a "
                           "smaller --window-batch")
            if str(path) not in message:
                message = f"{path}: {message}"
            bar.write(f"{PROG}: skipped {message}", file=sys.stderr)
        bar.update(1)
    bar.close()
    print(f"{PROG}: wrote {written} of {total} images to {args.out_dir}"
          + (f" ({failed} skipped)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

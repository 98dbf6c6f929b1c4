"""Plumbing shared by the command-line tools: one-line errors, never a traceback for user errors."""
import argparse
import sys

__all__ = ["ArgumentParser", "one_line", "fail", "add_deterministic_flag",
           "apply_deterministic_flag", "add_max_pixels_flag", "apply_max_pixels_flag"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``PROG: error: ... (see --help)``), exit 2."""

    def error(self, message):
        """Print the error in one line and exit with status 2 (argparse's usage-error code)."""
        self.exit(fail(self.prog, f"{message} (see {self.prog} --help)"))


def one_line(exc):
    """The first line of an exception's message (its type name when it has none)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename and str(exc).startswith("[Errno"):
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1 and text.startswith(("'", '"')):
        text = str(exc.args[0])  # KeyError quotes its message
    return text.splitlines()[0] if text else type(exc).__name__


def fail(prog, message, code=2):
    """Print ``prog: error: message`` (an exception: its first line) on stderr; returns ``code``
    (2: a usage error or bad input; 1: a data or disk error found mid-run). Every CLI reports
    errors through this one function."""
    if isinstance(message, BaseException):
        message = one_line(message)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def add_deterministic_flag(parser):
    """``--deterministic``: repeatable results run to run (see fastunet.runtime)."""
    parser.add_argument(
        "--deterministic", action="store_true",
        help="repeatable results run to run, on CPU and CUDA: deterministic algorithms, cuDNN "
             "autotuning off, window batches planned from fixed sizes (fastunet.runtime; "
             "costs some CUDA speed, none measurable on CPU)")


def apply_deterministic_flag(args):
    """Turn deterministic mode on when ``--deterministic`` was given; returns restore()."""
    if not getattr(args, "deterministic", False):
        return lambda: None
    from .runtime import set_deterministic
    return set_deterministic(True)


def add_max_pixels_flag(parser):
    """``--max-pixels N``: the largest image (in pixels) read before it is decoded."""
    from .data.io import MAX_PIXELS

    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
        help=f"refuse images of more than N pixels, from their header, before decoding them "
             f"(default {MAX_PIXELS:_}: far above the largest retinal images, 8.2 megapixels for "
             f"HRF, so a small file declaring a huge image cannot take minutes or gigabytes "
             f"unnoticed); 0: no limit")


def apply_max_pixels_flag(args, parser):
    """Set the image size limit from ``--max-pixels`` for this process; returns restore()."""
    from .data.io import set_max_pixels

    if args.max_pixels < 0:
        parser.error(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    return set_max_pixels(args.max_pixels)

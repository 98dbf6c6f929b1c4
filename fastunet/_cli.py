"""Plumbing shared by the command-line tools: one-line errors, never a traceback for user errors."""
import argparse
import sys

__all__ = ["ArgumentParser", "one_line", "add_deterministic_flag", "apply_deterministic_flag"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``PROG: error: ... (see --help)``), exit 2."""

    def error(self, message):
        """Print the error in one line and exit with status 2 (argparse's usage-error code)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(exc):
    """The first line of an exception's message (its type name when it has none)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename and str(exc).startswith("[Errno"):
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1 and text.startswith(("'", '"')):
        text = str(exc.args[0])  # KeyError quotes its message
    return text.splitlines()[0] if text else type(exc).__name__


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


def print_error(prog, message):
    """``prog: error: message`` on stderr, flushed."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)

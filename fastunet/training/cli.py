"""Command-line plumbing shared by ``fastunet.train`` and ``fastunet.test``: configs, errors."""
import os
import sys

from ..models.configs import ConfigKeyError, apply_overrides, get_config

__all__ = ["UserError", "load_config", "fail", "default_work_dir"]


class UserError(Exception):
    """A mistake in the command line or the files it names: printed as one line, exit code 2."""


def load_config(name, cfg_options=None):
    """The named config with ``--cfg-options`` applied; wrong names/keys become UserError."""
    try:
        cfg = get_config(name)
    except (ConfigKeyError, TypeError) as e:
        raise UserError(str(e)) from None
    try:
        apply_overrides(cfg, cfg_options)
    except (ConfigKeyError, ValueError) as e:
        raise UserError(f"--cfg-options: {e}") from None
    return cfg


def default_work_dir(cfg):
    """``work_dirs/<config name>`` (relative to the current folder), as mmseg."""
    return os.path.join("work_dirs", cfg["name"])


def fail(prog, message, code=2):
    """Print ``prog: error: message`` on stderr and return the exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code

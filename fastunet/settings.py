"""Every ``FASTUNET_*`` environment variable: what it does, and the one place it is read.

    from fastunet import settings
    settings.current().winograd        # False when FASTUNET_WINOGRAD=0
    with settings.override(winograd=False):   # tests and benchmarks: switches for a while
        ...

The switches that steer kernels (``FUSED``, ``WINOGRAD``, ``CPU_ISA``, ``CUDNN_FUSED_CONV``,
``DISABLE_EXTENSION``) are read once, when fastunet is imported, so no forward pass looks at the
environment; set them before starting Python (or use :func:`override`). The native library never
reads the environment: ``fastunet._native`` hands it the values it needs when it loads.
``FASTUNET_CACHE`` is a folder, looked up each time data is cached (:func:`cache_dir`). The
variables in :data:`VARIABLES` marked ``build`` or ``tests`` are read by setup.py, .ci/run and the
test suite, not by the package. ``python -m fastunet.settings`` prints the table that
docs/environment.md holds.
"""
import contextlib
import dataclasses
import os
import warnings
from typing import Optional

__all__ = ["Variable", "VARIABLES", "Settings", "current", "override", "cache_dir",
           "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable: its values, default, effect, and who reads it when."""
    name: str
    values: str
    default: str
    effect: str
    read: str  # "import" (fastunet, once), "use" (fastunet, each use), "build", "tests"


# name | values | default | effect | read: "import" (fastunet, once), "use" (fastunet, each use),
# "build" (setup.py, .ci/run), "tests"
_TABLE = """
FASTUNET_FUSED | `0`, `1` | unset | `0`: every ConvBNReLU runs the plain modules (conv, BN, ReLU); \
`1`: the fused kernels wherever they apply, also on devices whose defaults pick the plain modules \
(CUDA); unset: the device defaults of fastunet/defaults.py | import
FASTUNET_WINOGRAD | `0`, `1` | `1` | `0`: no Winograd CPU convolutions (oneDNN or GEMMs instead); \
where Winograd runs: fastunet/conv_plan.py | import
FASTUNET_CPU_ISA | `base`, `avx2`, `avx512` | unset (no cap) | caps the x86 vector instructions the \
CPU kernels use, to test or rule out the AVX-512/AVX2 builds; Winograd runs only with AVX-512 | import
FASTUNET_CUDNN_FUSED_CONV | `0`, `1` | `0` | `1`: the CUDA conv_bias_relu kernel tries cuDNN's fused \
conv-bias-ReLU engine (measured slower than the convolution alone; kept for re-measuring) | import
FASTUNET_DISABLE_EXTENSION | `0`, `1` | `0` | `1`: do not load the native extension; the \
pure-PyTorch reference ops run | import
FASTUNET_CACHE | a folder | `~/.cache/fastunet` | where generated data (the built-in synthetic set) \
is cached | use
FASTUNET_NO_CUDA | `0`, `1` | `0` | `1`: setup.py builds no CUDA kernels even where nvcc is found \
| build
FASTUNET_PRINT_SOURCES | `0`, `1` | `0` | `1`: setup.py prints the native source list and exits \
(CI compares it with CMakeLists.txt) | build
FASTUNET_CI_CACHE | a folder | `~/.cache/fastunet-ci` | .ci/run's cache of venvs and wheels | build
FASTUNET_CI_CUDA_TORCH | a torch version | see .ci/run | the CUDA torch .ci/run compiles the CUDA \
kernels against | build
FASTUNET_FUZZ_EXAMPLES | a number | `25` | hypothesis examples per property in \
tests/test_fuzz_ops.py | tests
FASTUNET_TRAIN_KILLS | a number | `5` | how often tests/test_crash_safety.py kills and resumes \
training | tests
"""
VARIABLES = tuple(Variable(*(part.strip() for part in row.split(" | ")))
                  for row in _TABLE.strip().splitlines())

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")
_ISAS = ("base", "avx2", "avx512")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The kernel switches, parsed (see :data:`VARIABLES` for what each does)."""
    fused: Optional[bool] = None  # None: the device defaults
    winograd: bool = True
    cpu_isa: str = ""  # "" = no cap
    cudnn_fused_conv: bool = False
    disable_extension: bool = False


def _flag(environ, name, default):
    """True/False for an on/off variable, None when unset or empty; a typo warns and is ignored."""
    raw = environ.get(name, "").strip().lower()
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    if raw not in ("", "auto"):
        warnings.warn(f"fastunet: {name}={environ[name]!r} is not 0 or 1; ignored",
                      RuntimeWarning, stacklevel=3)
    return default


def read(environ=None):
    """The switches as set in ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    isa = environ.get("FASTUNET_CPU_ISA", "").strip().lower()
    if isa not in ("",) + _ISAS:
        warnings.warn(f"fastunet: FASTUNET_CPU_ISA={environ['FASTUNET_CPU_ISA']!r} is not one of "
                      f"{', '.join(_ISAS)}; ignored", RuntimeWarning, stacklevel=2)
        isa = ""
    return Settings(fused=_flag(environ, "FASTUNET_FUSED", None),
                    winograd=_flag(environ, "FASTUNET_WINOGRAD", True),
                    cpu_isa=isa,
                    cudnn_fused_conv=_flag(environ, "FASTUNET_CUDNN_FUSED_CONV", False),
                    disable_extension=_flag(environ, "FASTUNET_DISABLE_EXTENSION", False))


_CURRENT = read()
_LISTENERS = []  # called with the new Settings after override() changes them (the native loader)


def current():
    """The switches in force (read from the environment at import, or :func:`override`'s)."""
    return _CURRENT


def on_change(fn):
    """Call ``fn(settings)`` whenever :func:`override` changes the switches."""
    _LISTENERS.append(fn)


@contextlib.contextmanager
def override(**changes):
    """Run a block with some switches changed (names: the fields of :class:`Settings`).

    For tests and benchmarks that compare paths in one process; ``disable_extension`` cannot
    change once the extension is loaded.
    """
    global _CURRENT
    before = _CURRENT
    _CURRENT = dataclasses.replace(before, **changes)
    for fn in _LISTENERS:
        fn(_CURRENT)
    try:
        yield _CURRENT
    finally:
        _CURRENT = before
        for fn in _LISTENERS:
            fn(_CURRENT)


def cache_dir():
    """Where generated data is cached: ``$FASTUNET_CACHE``, else ``~/.cache/fastunet``."""
    return os.environ.get("FASTUNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "fastunet")


def markdown_table():
    """docs/environment.md's table (a test checks the file against it)."""
    where = {"import": "fastunet, once at import", "use": "fastunet, on each use",
             "build": "setup.py / .ci/run", "tests": "the test suite"}
    rows = ["| variable | values | default | effect | read by |", "|---|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.values} | {v.default} | {v.effect} | {where[v.read]} |"
             for v in VARIABLES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())

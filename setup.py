"""Build script for fastunet and its native extension ``fastunet._C``.

The extension always gets the CPU kernels; CUDA kernels are added when a CUDA build of torch and
nvcc are present, or when FORCE_CUDA=1. Environment knobs (printed at build time):

  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (needs nvcc)
  FASTUNET_NO_CUDA=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0;10.0+PTX"; default: the visible GPUs, or,
                          with none visible, the current data-centre GPUs (Ampere, Hopper, Blackwell)
  CUDA_HOME               toolkit root; default: resolved from the nvcc on PATH (wrappers followed)
  DEBUG=1                 -O0 -g
  FASTUNET_PRINT_SOURCES=1  print the native source list (one per line) and exit; CI compares it
                          with the CMake build's list
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0+PTX"


def native_sources(with_cuda):
    """Sorted globs; CMakeLists.txt uses the same patterns (checked by tools/check_cmake_parity.py)."""
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
    return sources


if os.environ.get("FASTUNET_PRINT_SOURCES") == "1":
    print("\n".join(native_sources(with_cuda=True)))
    sys.exit(0)


def resolve_cuda_home():
    """Toolkit root of the nvcc on PATH. Reads `nvcc --dryrun` because nvcc is often a wrapper
    script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc), and torch's guess
    from the wrapper's folder then points at /usr/local and linking misses libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    here = re.search(r"_HERE_=(\S+)", out)
    if here:
        return os.path.dirname(os.path.realpath(here.group(1)))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


cuda_home = resolve_cuda_home()
if cuda_home:
    os.environ.setdefault("CUDA_HOME", cuda_home)

# torch.utils.cpp_extension reads CUDA_HOME at import time, so import it only now.
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    if os.environ.get("FASTUNET_NO_CUDA") == "1":
        return False, "FASTUNET_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "no nvcc found (set CUDA_HOME)"
    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return True, "torch is a CUDA build and nvcc is present"


def cuda_arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs, "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"
    return DEFAULT_CUDA_ARCHS, "default (Ampere, Hopper, Blackwell data-centre GPUs)"


def wheel_cuda_includes():
    """Headers shipped in torch's nvidia-* wheels (cuBLAS, cuSPARSE, ...): a bare toolkit may lack
    them while ATen's CUDA headers include them."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    return [d for i, d in enumerate(dirs) if d not in dirs[:i] and os.path.isdir(d)]


def make_extension():
    with_cuda, why = want_cuda()
    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fvisibility=hidden"]  # torch picks the C++ standard its headers need
    # at::parallel_for is a header template: compiled without OpenMP it runs every CPU kernel on
    # one thread. libgomp.so.1 resolves to the copy torch has already loaded (same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx += openmp
    define_macros = [("TORCH_EXTENSION_NAME", "_C")] + ([("FASTUNET_DEBUG", None)] if debug else [])
    include_dirs = [os.path.join(ROOT, "csrc")]
    print(f"fastunet build: torch {torch.__version__}, CPU kernels: yes, "
          f"CUDA kernels: {'yes' if with_cuda else 'no'} ({why}), debug: {debug}")
    if not with_cuda:
        define_macros.append(("FASTUNET_CUDA_ARCHS", '""'))
        return CppExtension("fastunet._C", native_sources(False), include_dirs=include_dirs,
                            define_macros=define_macros, extra_compile_args={"cxx": cxx},
                            extra_link_args=openmp)
    archs, source = cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"fastunet build: CUDA_HOME={os.environ.get('CUDA_HOME')}, CUDA archs {archs} ({source})")
    define_macros += [("WITH_CUDA", None), ("FASTUNET_CUDA_ARCHS", f'"{archs}"')]
    include_dirs += wheel_cuda_includes()
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("fastunet._C", native_sources(True), include_dirs=include_dirs,
                         define_macros=define_macros,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=openmp)


setup(
    packages=find_packages(include=["fastunet", "fastunet.*"]),
    # the shipped weights and their record (fastunet/weights/__init__.py)
    package_data={"fastunet.weights": ["synthetic.pt", "synthetic.json"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

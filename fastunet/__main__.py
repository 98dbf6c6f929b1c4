"""Prints what fastunet runs on this machine: the build, the CPU convolution plan, the precisions.

    python -m fastunet            # version, native build, devices, conv plan, precisions
    python -m fastunet --help
"""
import argparse

import torch

import fastunet
from fastunet import _native, settings


def _build_lines():
    lines = [f"fastunet {fastunet.__version__}  (torch {torch.__version__}, "
             f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} build)"]
    if not _native.LOADED:
        return lines + [f"native extension: NOT loaded ({_native.LOAD_ERROR}); "
                        "using pure-PyTorch reference ops"]
    info = _native.BUILD_INFO
    lines.append(f"native extension: loaded ({_native._C.__file__})")
    lines.append(f"  CPU kernels: yes; CUDA kernels: {'yes' if info.get('cuda') else 'no'}"
                 + (f" (archs {info.get('cuda_archs')})" if info.get("cuda") else ""))
    lines.append(f"  built against torch {info.get('torch_version')} with {info.get('compiler')}"
                 + ("; debug build" if info.get("debug") else ""))
    return lines


def _cpu_precision_line():
    """Which CPU inference precisions run fast here: fp32 always; bf16 where the CPU computes it
    natively (the same test that makes bf16 the predict/Predictor default)."""
    from fastunet.inference import cpu_has_native_bf16

    isa = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return (f"CPU inference precision (vector ISA {isa}): "
            + ("fp32, and bf16 natively (AVX512-BF16/AMX): predict and Predictor default to "
               "bf16, --precision fp32 for mmseg's exact numbers" if cpu_has_native_bf16()
               else "fp32 (no native bf16 on this CPU: bf16 would be emulated, slower)"))


def describe():
    """Everything ``python -m fastunet`` prints, as one string."""
    from fastunet import conv_plan

    lines = _build_lines()
    ops = sorted(n for n in dir(torch.ops.fastunet) if not n.startswith("_") and n != "name")
    lines.append(f"ops: {', '.join('torch.ops.fastunet.' + o for o in ops) or 'none registered'}")
    lines.append(_cpu_precision_line())
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "none visible")
    lines.append(f"GPU: {gpu}; CPU threads: {torch.get_num_threads()}")
    fast = _native.LOADED and _native._C.winograd_fast_kernel()
    lines.append("CPU 3x3 convolutions: "
                 + ("Winograd where faster (AVX-512), else oneDNN"
                    if fast and settings.current().winograd
                    else "oneDNN (Winograd off: FASTUNET_WINOGRAD=0)" if fast
                    else "oneDNN (Winograd needs AVX-512; FASTUNET_CPU_ISA may cap it)"))
    lines += conv_plan.describe()
    lines.append("switches: FASTUNET_* environment variables, docs/environment.md")
    lines.append("start here: python -m fastunet.train   (trains on built-in synthetic vessels)")
    lines.append("            python -m pytest           (runs the tests)   README.md has the rest")
    return "\n".join(lines)


def main(argv=None):
    argparse.ArgumentParser(
        prog="python -m fastunet",
        description="Print what fastunet runs on this machine: its version and how the native "
                    "extension was built, the GPUs it sees, which convolution algorithm each "
                    "layer of UNet-S5-D16 runs on this CPU in inference and training, and why "
                    "(fastunet/conv_plan.py), and the CPU precisions available (fp32; bf16 where "
                    "the CPU has AVX512-BF16 or AMX).",
        epilog="The tools: python -m fastunet.train | .test | .predict | .convert | .export | "
               ".data (each with --help).").parse_args(argv)
    print(describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

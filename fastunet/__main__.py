"""Prints the version, how the native extension was built, and where to start.

    python -m fastunet
"""
import torch

import fastunet
from fastunet import _native


def describe():
    lines = [f"fastunet {fastunet.__version__}  (torch {torch.__version__}, "
             f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} build)"]
    if _native.LOADED:
        info = _native.BUILD_INFO
        lines.append(f"native extension: loaded ({fastunet._native._C.__file__})")
        lines.append(f"  CPU kernels: yes; CUDA kernels: {'yes' if info.get('cuda') else 'no'}"
                     + (f" (archs {info.get('cuda_archs')})" if info.get("cuda") else ""))
        lines.append(f"  built against torch {info.get('torch_version')} with {info.get('compiler')}"
                     + ("; debug build" if info.get("debug") else ""))
        from fastunet.ops import cpu_winograd_conv
        fast = _native._C.winograd_fast_kernel()
        lines.append("  CPU 3x3 convolutions: "
                     + ("Winograd where faster (AVX-512)" if fast and cpu_winograd_conv.enabled()
                        else "oneDNN (Winograd off: FASTUNET_WINOGRAD=0)" if fast
                        else "oneDNN (Winograd needs AVX-512; FASTUNET_CPU_ISA may cap it)"))
    else:
        lines.append(f"native extension: NOT loaded ({_native.LOAD_ERROR}); "
                     "using pure-PyTorch reference ops")
    ops = sorted(n for n in dir(torch.ops.fastunet) if not n.startswith("_") and n != "name")
    lines.append(f"ops: {', '.join('torch.ops.fastunet.' + o for o in ops) or 'none registered'}")
    from fastunet.inference import cpu_has_native_bf16
    lines.append("CPU inference precision: "
                 + ("fp32, and bf16 natively (AVX512-BF16/AMX): predict and Predictor default "
                    "to bf16, --precision fp32 for mmseg's exact numbers" if cpu_has_native_bf16()
                    else "fp32 (no native bf16 on this CPU: bf16 would be emulated, slower)"))
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "none visible")
    lines.append(f"GPU: {gpu}; CPU threads: {torch.get_num_threads()}")
    lines.append("start here: python -m fastunet.train   (trains on built-in synthetic vessels)")
    lines.append("            python -m pytest           (runs the tests)   README.md has the rest")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())

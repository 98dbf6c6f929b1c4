// Run-time switches of the native library. C++ never reads the environment: fastunet/settings.py
// reads the FASTUNET_* variables once (docs/environment.md lists them) and fastunet/_native.py
// hands the values below to the library through _C._set_switches as soon as it loads, before any
// kernel runs. Atomics, so a test may change them between calls (settings.override).
#pragma once

#include <atomic>

namespace fastunet {

struct Switches {
  // The best x86 vector ISA the CPU kernels may use (cpu/isa.h's CpuIsa as an int: 0 base,
  // 1 AVX2, 2 AVX-512): FASTUNET_CPU_ISA.
  std::atomic<int> cpu_isa_cap{2};
  // Whether the CUDA conv_bias_relu tries cuDNN's fused conv-bias-ReLU engine:
  // FASTUNET_CUDNN_FUSED_CONV.
  std::atomic<bool> cudnn_fused_conv{false};
};

// The one instance (an inline function's static: one object across the library's units).
inline Switches& switches() {
  static Switches s;
  return s;
}

}  // namespace fastunet

// Which x86 vector ISA the CPU kernels may use: what cpuid reports, capped by
// FASTUNET_CPU_ISA ("base", "avx2" or "avx512"; read by fastunet/settings.py and handed over in
// switches().cpu_isa_cap). The cap lets the tests run the baseline and AVX2 builds of the kernels
// on a machine that has AVX-512, so the paths taken on older CPUs are checked too, and lets a
// user rule out an ISA-specific kernel when debugging.
#pragma once

#include "common/switches.h"

namespace fastunet {

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA both the CPU (cpuid, read once) and the cap allow (x86 with GCC/Clang; kBase
// elsewhere).
inline CpuIsa cpu_isa() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const int found = [] {
    int isa = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = 1;
    if (isa == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      isa = 2;
    return isa;
  }();
  const int cap = switches().cpu_isa_cap.load(std::memory_order_relaxed);
  return static_cast<CpuIsa>(found < cap ? found : cap);
#else
  return CpuIsa::kBase;
#endif
}

}  // namespace fastunet

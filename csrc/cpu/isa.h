// Which x86 vector ISA the CPU kernels may use: what cpuid reports, capped by the environment
// variable FASTUNET_CPU_ISA ("base", "avx2" or "avx512"). The cap lets the tests run the
// baseline and AVX2 builds of the kernels on a machine that has AVX-512, so the paths taken on
// older CPUs are checked too, and lets a user rule out an ISA-specific kernel when debugging.
#pragma once

#include <cstdlib>
#include <cstring>

namespace fastunet {

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa cpu_isa_cap() {
  const char* v = std::getenv("FASTUNET_CPU_ISA");
  if (v == nullptr || *v == '\0') return CpuIsa::kAvx512;
  if (std::strcmp(v, "base") == 0) return CpuIsa::kBase;
  if (std::strcmp(v, "avx2") == 0) return CpuIsa::kAvx2;
  return CpuIsa::kAvx512;
}

// The best ISA both the CPU and the cap allow (x86 with GCC/Clang; kBase elsewhere). Read once.
inline CpuIsa cpu_isa() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const CpuIsa isa = [] {
    CpuIsa found = CpuIsa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) found = CpuIsa::kAvx2;
    if (found == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw"))
      found = CpuIsa::kAvx512;
    const CpuIsa cap = cpu_isa_cap();
    return static_cast<int>(found) < static_cast<int>(cap) ? found : cap;
  }();
  return isa;
#else
  return CpuIsa::kBase;
#endif
}

}  // namespace fastunet

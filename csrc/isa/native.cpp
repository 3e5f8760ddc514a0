// The -march=native (DUAT_NATIVE=1 builds only) copy of the CPU kernels: csrc/kernels/* compiled with -march=native (see setup.py).
#define DUAT_ISA native

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  // Built for the build machine's CPU: require the vector features the compiler targeted.
  bool ok = true;
#if defined(__x86_64__)
#if defined(__AVX512F__)
  ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
#if defined(__AVX512DQ__)
  ok = ok && __builtin_cpu_supports("avx512dq");
#endif
#if defined(__AVX512BF16__)
  ok = ok && __builtin_cpu_supports("avx512bf16");  // bf16 stores use vcvtne2ps2bf16
#endif
#if defined(__AVX2__)
  ok = ok && __builtin_cpu_supports("avx2");
#endif
#if defined(__FMA__)
  ok = ok && __builtin_cpu_supports("fma");
#endif
#if defined(__F16C__)
  ok = ok && __builtin_cpu_supports("f16c");
#endif
#endif
  return ok;
}
}  // namespace
}  // namespace DUAT_ISA
}  // namespace duat

#include "variant.h"

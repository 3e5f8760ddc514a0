// The AVX-512 (F, BW, VL, DQ) copy of the CPU kernels: csrc/kernels/* compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c (see setup.py).
#define DUAT_ISA avx512

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}
}  // namespace
}  // namespace DUAT_ISA
}  // namespace duat

#include "variant.h"

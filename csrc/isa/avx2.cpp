// The AVX2 + FMA + F16C copy of the CPU kernels: csrc/kernels/* compiled with -mavx2 -mfma -mf16c (see setup.py).
#define DUAT_ISA avx2

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
}  // namespace
}  // namespace DUAT_ISA
}  // namespace duat

#include "variant.h"

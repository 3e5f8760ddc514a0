// The AVX-512 (F, BW, VL, DQ) + AVX512_BF16 copy of the CPU kernels: the avx512 flags and -mavx512bf16 (see
// setup.py). It differs from avx512 only in the bfloat16 stores (kron_sum.cpp: store_bf16_pair).
#define DUAT_ISA avx512_bf16

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("avx512bf16");
}
}  // namespace
}  // namespace DUAT_ISA
}  // namespace duat

#include "variant.h"

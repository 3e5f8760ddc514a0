// Vectors of the ISA being compiled (csrc/isa/*.cpp) and the register blocking derived from its
// register file, shared by the kernels of csrc/kernels/.
#pragma once

#include <cstdint>

#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

DUAT_ISA_BEGIN
namespace {

// The micro-kernel's accumulator block (see kron_sum.cpp): up to kNV vectors of t times as many
// segments as fit kAccumulators registers, and the register file stays free of spills:
// kAccumulators + kNV slab vectors + 1 broadcast <= 16 (SSE2, AVX2) or 32 (AVX-512, NEON).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kNV = 4, kAccumulators = 24;
#elif defined(__AVX__)
constexpr int kVecBytes = 32, kNV = 2, kAccumulators = 12;
#elif defined(__aarch64__)
constexpr int kVecBytes = 16, kNV = 4, kAccumulators = 24;
#else
constexpr int kVecBytes = 16, kNV = 2, kAccumulators = 12;
#endif
constexpr int kMaxGroup = 12;  // segments per micro-kernel when a segment is one vector wide


template <typename A>
struct Vec {
  static constexpr int kLanes = kVecBytes / sizeof(A);
  typedef A type __attribute__((vector_size(kVecBytes)));
};
using VF = Vec<float>::type;
using VD = Vec<double>::type;

struct BF16 { uint16_t bits; };
// bfloat16 written from finite factors: the only NaN such sums can produce is the default NaN of an
// invalid operation (Inf - Inf after an overflow), which the rounding bias leaves a NaN (x86
// 0xFFC00000 -> 0xFFC0, Arm 0x7FC00000 -> 0x7FC0), so the NaN test of the general path is skipped.
// Payload NaNs from the inputs could carry into the exponent or the sign; they take the BF16 path.
struct BF16Finite { uint16_t bits; };
// BF16Finite whose values are known not to be subnormal (KronSumProblem bound, see kron_sum.cpp
// lowest_bit): AVX512_BF16's conversion instruction, which flushes subnormal inputs, is then exact.
struct BF16Normal { uint16_t bits; };
#if defined(__AVX512BF16__)
constexpr bool kBf16Convert = true;
#else
constexpr bool kBf16Convert = false;
#endif
// BF16Finite written from a slab whose columns are split (Workspace::split_slab): AVX2 rounds and
// packs a pair of vectors that hold the even and the odd columns of 2L consecutive ones with word
// blends, fewer operations than packing two vectors of consecutive columns across 128-bit lanes.
struct BF16Split { uint16_t bits; };
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool kSplitBf16 = true;
#else
constexpr bool kSplitBf16 = false;
#endif
struct FP16 { uint16_t bits; };

// acc + a * b, fused where the ISA has an FMA instruction (scalar and vector alike).
inline float madd(float a, float b, float acc) {
#if defined(__FMA__) || defined(__aarch64__)
  return __builtin_fmaf(a, b, acc);
#else
  return acc + a * b;
#endif
}
inline double madd(double a, double b, double acc) {
#if defined(__FMA__) || defined(__aarch64__)
  return __builtin_fma(a, b, acc);
#else
  return acc + a * b;
#endif
}
inline VF madd(VF a, VF b, VF acc) {
#if defined(__AVX512F__)
  return (VF)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
  return (VF)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#elif defined(__aarch64__)
  return (VF)vfmaq_f32((float32x4_t)acc, (float32x4_t)a, (float32x4_t)b);
#else
  return acc + a * b;
#endif
}
inline VD madd(VD a, VD b, VD acc) {
#if defined(__AVX512F__)
  return (VD)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)acc);
#elif defined(__FMA__)
  return (VD)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)acc);
#elif defined(__aarch64__)
  return (VD)vfmaq_f64((float64x2_t)acc, (float64x2_t)a, (float64x2_t)b);
#else
  return acc + a * b;
#endif
}

// All lanes = *p, read straight from memory (a load-port broadcast, or an FMA's embedded broadcast
// on AVX-512) rather than through a scalar register and a shuffle.
inline VF splat(const float* p) {
#if defined(__AVX512F__)
  return (VF)_mm512_set1_ps(*p);
#elif defined(__AVX__)
  return (VF)_mm256_broadcast_ss(p);
#else
  return VF{} + *p;
#endif
}
inline VD splat(const double* p) {
#if defined(__AVX512F__)
  return (VD)_mm512_set1_pd(*p);
#elif defined(__AVX__)
  return (VD)_mm256_broadcast_sd(p);
#else
  return VD{} + *p;
#endif
}

}  // namespace
DUAT_ISA_END

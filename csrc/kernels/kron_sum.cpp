// Hot loop of the Kronecker-sum materialisation (see kron_sum.h for the contract), compiled once per
// instruction set (csrc/isa/*.cpp): the vector width and the register blocking come from the ISA.
//
// Roofline. Every output entry is a length-h dot product (2h flops) and one store (4 bytes fp32,
// 2 bytes bf16/fp16); nothing is read from memory except the small factors, which stay in cache.
// Small h is bound by the stores (out.fill_ is the floor), large h by the FMAs (2h flops/entry at
// the FMA peak); on a 2-core AVX2 machine the crossover is near h = 16 for fp32.
//
// Structure. One output row (p, q) is the small matrix product (S x h) @ (h x T): segment s is
//   W[(p, q), (s, :)] = sum_i L[i, p, s] * R[i, q, :],
// a linear combination of the h rows of the slab R[:, q, :]. The micro-kernel combines MR segments
// over NV vectors of t with MR * NV accumulators in registers (inner dimension h), like a GEMM
// micro-kernel whose k-loop is the heads. Register budget: MR * NV accumulators + NV slab vectors +
// 1 broadcast coefficient must fit the register file (16 on SSE2/AVX2, 32 on AVX-512/NEON):
//   AVX-512: 4 x 4 zmm (21 registers)  AVX2: 6 x 2 ymm (15)  SSE2: 6 x 2 xmm (15)  NEON: 6 x 4 (29).
// The slab is blocked over t so that the part in use (h x TB) stays in L1 across up to kBatch
// segments, which matters once h * T no longer fits (h = 12, T = 768 is 36 KiB).
// Segments whose coefficients are all zero (causal masks in token layout) and the columns where
// R[:, q, :] is zero (causal masks in feature layout) are written as zeros, but only when the other
// factor is finite: 0 * inf and 0 * NaN are NaN, and IEEE semantics win over the shortcut.
//
// Rounding. Vector and scalar paths use the same operation per term (fused multiply-add where the
// ISA has it, multiply then add otherwise, never contracted by the compiler: -ffp-contract=off), so
// a tile computed with other vector boundaries equals the same slice of the full matrix bit for bit.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "simd.h"
#ifdef _OPENMP
#include <omp.h>
#endif

DUAT_ISA_BEGIN
namespace {

constexpr int kBatch = 48;                             // whole segments that share one pass over a slab block
constexpr int64_t kSlabBlockBytes = 16 << 10;         // h x TB slab part kept in L1
constexpr int64_t kStreamBytes = int64_t(16) << 20;  // tiles above 16 MiB use non-temporal stores

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// float -> bfloat16, round to nearest even (NaN becomes the quiet NaN 0x7FC0), as torch rounds.
// kNaN = false: no NaN test (see BF16Finite).
template <bool kNaN = true>
inline uint16_t to_bf16(float f) {
  uint32_t u = bits_of(f);
  if (kNaN && (u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// float -> IEEE half, round to nearest even, handling subnormals, overflow to inf and NaN (quieted,
// payload kept: the bits F16C's conversion gives).
inline uint16_t to_fp16(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  // Scale so that the float adder rounds the mantissa to 10 bits at the right exponent.
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  // NaN: quiet, with the top 9 bits of the payload, as F16C's vcvtps2ph (and so torch there) keeps them
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u | ((w >> 13) & 0x3FFu) : nonsign));
#endif
}

inline void store(float* dst, float v) { *dst = v; }
inline void store(double* dst, double v) { *dst = v; }
inline void store(BF16* dst, float v) { dst->bits = to_bf16(v); }
inline void store(BF16Finite* dst, float v) { dst->bits = to_bf16<false>(v); }
inline void store(BF16Split* dst, float v) { dst->bits = to_bf16<false>(v); }
inline void store(BF16Normal* dst, float v) { dst->bits = to_bf16<false>(v); }
inline void store(FP16* dst, float v) { dst->bits = to_fp16(v); }

// One store of Bytes bytes. kStream: a non-temporal store, which bypasses the cache (a large W' is
// not read back soon, and a regular store would first read the line it overwrites); the caller
// guarantees that dst is aligned to Bytes (to 16 below 16 bytes).
template <int Bytes, bool kStream>
inline void put(void* dst, const void* src) {
#if defined(__AVX512F__)
  if (Bytes == 64 && kStream) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_loadu_si512(src));
    return;
  }
#endif
#if defined(__AVX__)
  if (Bytes >= 32 && kStream) {
    for (int j = 0; j < Bytes / 32; ++j)
      _mm256_stream_si256(static_cast<__m256i*>(dst) + j, _mm256_loadu_si256(static_cast<const __m256i*>(src) + j));
    return;
  }
#endif
#if defined(__SSE2__)
  if (Bytes >= 16 && kStream) {
    for (int j = 0; j < Bytes / 16; ++j)
      _mm_stream_si128(static_cast<__m128i*>(dst) + j, _mm_loadu_si128(static_cast<const __m128i*>(src) + j));
    return;
  }
#endif
  std::memcpy(dst, src, Bytes);
}

template <bool kStream>
inline void store_vec(float* dst, VF v) { put<sizeof v, kStream>(dst, &v); }
template <bool kStream>
inline void store_vec(double* dst, VD v) { put<sizeof v, kStream>(dst, &v); }

#if defined(__AVX2__) && !defined(__AVX512F__)
template <bool kNaN = true>
inline __m256i bf16_bits_avx2(VF v) {  // rounded bfloat16 bits in the low half of each 32-bit lane
  const __m256i u = _mm256_castps_si256((__m256)v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  if (!kNaN) return r;
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
#endif

#if defined(__SSE2__) && !defined(__AVX__)
// a's then b's 4 values as 8 bfloat16, rounded to nearest even (NaN -> 0x7FC0 with kNaN). SSE2 has no
// unsigned pack: the biased values are shifted arithmetically, so that each high half is a signed 16-bit
// number, which packs_epi32 keeps exactly. (A finite float plus the bias never wraps around.)
template <bool kNaN>
inline __m128i bf16_bits_sse2(VF a, VF b) {
  auto high = [](VF v) {
    const __m128i u = _mm_castps_si128((__m128)v);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    __m128i r = _mm_srai_epi32(_mm_add_epi32(u, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF))), 16);
    if (kNaN) {
      const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(u, _mm_set1_epi32(0x7FFFFFFF)), _mm_set1_epi32(0x7F800000));
      r = _mm_or_si128(_mm_andnot_si128(nan, r), _mm_and_si128(nan, _mm_set1_epi32(0x7FC0)));
    }
    return r;
  };
  return _mm_packs_epi32(high(a), high(b));
}
#endif

#if defined(__SSE2__) && !defined(__F16C__)
// a's then b's 4 values as 8 IEEE halves: to_fp16's arithmetic on 4 lanes at once, the same bits for
// every float. The signed pack keeps each lane exactly: sign | magnitude is 0xFFFF8000 | m or m, m <= 0x7FFF.
inline __m128i fp16_bits_sse2(VF a, VF b) {
  auto half = [](VF v) {
    const __m128 f = (__m128)v;
    const __m128i w = _mm_castps_si128(f);
    __m128 base = _mm_and_ps(f, _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF)));
    base = _mm_mul_ps(_mm_mul_ps(base, _mm_set1_ps(0x1.0p+112f)), _mm_set1_ps(0x1.0p-110f));
    // to_fp16's bias >> 1 is w's exponent field, at least 0x38800000: an unsigned max, here the float max of
    // two positive powers of two (or zero, or inf) given by their exponent bits.
    const __m128 exponent = _mm_castsi128_ps(_mm_and_si128(w, _mm_set1_epi32(0x7F800000)));
    const __m128i bias = _mm_castps_si128(_mm_max_ps(exponent, _mm_castsi128_ps(_mm_set1_epi32(0x38800000))));
    base = _mm_add_ps(_mm_castsi128_ps(_mm_add_epi32(bias, _mm_set1_epi32(0x07800000))), base);
    const __m128i bits = _mm_castps_si128(base);
    const __m128i nonsign = _mm_add_epi32(_mm_and_si128(_mm_srli_epi32(bits, 13), _mm_set1_epi32(0x7C00)),
                                          _mm_and_si128(bits, _mm_set1_epi32(0x0FFF)));
    const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(f, f));
    const __m128i quiet = _mm_or_si128(_mm_and_si128(_mm_srli_epi32(w, 13), _mm_set1_epi32(0x3FF)), _mm_set1_epi32(0x7E00));
    const __m128i magnitude = _mm_or_si128(_mm_andnot_si128(nan, nonsign), _mm_and_si128(nan, quiet));
    return _mm_or_si128(magnitude, _mm_srai_epi32(_mm_and_si128(w, _mm_set1_epi32(int(0x80000000u))), 16));
  };
  return _mm_packs_epi32(half(a), half(b));
}
#endif

// bfloat16: add the rounding bias (0x7FFF + lowest kept bit), keep the high halves, NaN -> 0x7FC0.
template <bool kNaN, bool kStream, typename Out>
inline void store_bf16_vec(Out* dst, VF v) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256i r = bf16_bits_avx2<kNaN>(v);
  // Pack the 8 32-bit lanes into 8 16-bit lanes (packus works per 128-bit half: fix the order).
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  const __m128i half = _mm256_castsi256_si128(packed);
  put<16, kStream>(dst, &half);
#elif defined(__SSE2__) && !defined(__AVX__)
  const __m128i packed = bf16_bits_sse2<kNaN>(v, v);
  put<8, kStream>(dst, &packed);
#else
  typedef uint32_t VU32 __attribute__((vector_size(kVecBytes)));
  typedef int32_t VI32 __attribute__((vector_size(kVecBytes)));
  typedef uint16_t VU16 __attribute__((vector_size(kVecBytes / 2)));
  VU32 u;
  std::memcpy(&u, &v, sizeof u);
  VU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  if (kNaN) {
    const VU32 nan_mask = (VU32)(VI32)((u & 0x7FFFFFFFu) > 0x7F800000u);  // all-ones lanes where NaN
    rounded = (rounded & ~nan_mask) | (0x7FC0u & nan_mask);
  }
  const VU16 narrow = __builtin_convertvector(rounded, VU16);
  put<sizeof narrow, kStream>(dst, &narrow);
#endif
}
template <bool kStream>
inline void store_vec(BF16* dst, VF v) { store_bf16_vec<true, kStream>(dst, v); }
template <bool kStream>
inline void store_vec(BF16Finite* dst, VF v) { store_bf16_vec<false, kStream>(dst, v); }
template <bool kStream>  // a single vector: columns in order (only full pairs are split)
inline void store_vec(BF16Split* dst, VF v) { store_bf16_vec<false, kStream>(dst, v); }
template <bool kStream>
inline void store_vec(BF16Normal* dst, VF v) { store_bf16_vec<false, kStream>(dst, v); }

#if defined(__AVX512F__)
// float -> IEEE half, 16 lanes, round to nearest even. Zero-masked forms here and in store_pair: the plain intrinsics'
// undefined pass-through makes GCC 12 warn (-Wuninitialized) wherever it is inlined.
inline __m256i cvtps_ph(__m512 v) { return _mm512_maskz_cvtps_ph(0xFFFF, v, _MM_FROUND_TO_NEAREST_INT); }
#endif

template <bool kStream>
inline void store_vec(FP16* dst, VF v) {
#if defined(__AVX512F__)
  const __m256i half = cvtps_ph((__m512)v);
  put<32, kStream>(dst, &half);
#elif defined(__F16C__) && defined(__AVX__)
  const __m128i half = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
  put<16, kStream>(dst, &half);
#elif defined(__SSE2__) && !defined(__AVX__)
  const __m128i half = fp16_bits_sse2(v, v);
  put<8, kStream>(dst, &half);
#else
  uint16_t half[Vec<float>::kLanes];
  for (int j = 0; j < Vec<float>::kLanes; ++j) half[j] = to_fp16(v[j]);
  put<sizeof half, kStream>(dst, half);
#endif
}

// Two adjacent vectors (2L entries) at once. For 16-bit outputs this packs both into one full-width
// store (half the packing work, no half-register stores); other outputs store each vector.
template <bool kStream, typename Out, typename V>
inline void store_pair(Out* dst, V a, V b) {
  store_vec<kStream>(dst, a);
  store_vec<kStream>(dst + sizeof(V) / sizeof(a[0]), b);
}

#if defined(__AVX512F__)
template <bool kNaN = true>
inline __m512i bf16_rounded(VF v) {  // the rounded bfloat16 bits in the high half of each 32-bit lane
  const __m512i u = _mm512_castps_si512((__m512)v);
  const __m512i biased = _mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF));
  // + 1 where the lowest kept bit (bit 16) is set: ties round to even
  const __m512i r = _mm512_mask_add_epi32(biased, _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000)), biased,
                                          _mm512_set1_epi32(1));
  if (!kNaN) return r;
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000));
}
template <bool kNaN, bool kStream, typename Out>
inline void store_bf16_pair(Out* dst, VF a, VF b) {
#if defined(__AVX512BF16__)
  if (!kNaN) {
    // vcvtne2ps2bf16 rounds to nearest even as below, but flushes denormal inputs to zero (torch
    // keeps them): pairs holding a denormal (class 0x20) take the integer path. NaN cannot occur
    // here but as the default NaN of Inf - Inf, which both paths keep as 0xFFC0.
    const __mmask16 denormal = _mm512_fpclass_ps_mask((__m512)a, 0x20) | _mm512_fpclass_ps_mask((__m512)b, 0x20);
    if (__builtin_expect(denormal == 0, 1)) {
      const __m512i out = (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a);
      put<64, kStream>(dst, &out);
      return;
    }
  }
#endif
  // One word permutation takes the high halves of a's 16 lanes, then of b's: a0..a15 b0..b15.
  const __m512i high_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                              31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i out = _mm512_permutex2var_epi16(bf16_rounded<kNaN>(a), high_words, bf16_rounded<kNaN>(b));
  put<64, kStream>(dst, &out);
}
#if defined(__AVX512BF16__)
template <bool kStream>
inline void store_pair(BF16Normal* dst, VF a, VF b) {  // no subnormal, no NaN but the default one
  const __m512i out = (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a);
  put<64, kStream>(dst, &out);
}
#endif
template <bool kStream>
inline void store_pair(FP16* dst, VF a, VF b) {
  const __m512i out = _mm512_maskz_inserti64x4(0xFF, _mm512_castsi256_si512(cvtps_ph((__m512)a)), cvtps_ph((__m512)b), 1);
  put<64, kStream>(dst, &out);
}
#elif defined(__AVX2__)
template <bool kNaN, bool kStream, typename Out>
inline void store_bf16_pair(Out* dst, VF a, VF b) {
  const __m256i out =
      _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_avx2<kNaN>(a), bf16_bits_avx2<kNaN>(b)), 0xD8);
  put<32, kStream>(dst, &out);
}
template <bool kStream>
inline void store_pair(FP16* dst, VF a, VF b) {
  const __m256i out = _mm256_set_m128i(_mm256_cvtps_ph((__m256)b, _MM_FROUND_TO_NEAREST_INT),
                                       _mm256_cvtps_ph((__m256)a, _MM_FROUND_TO_NEAREST_INT));
  put<32, kStream>(dst, &out);
}
#endif
#if defined(__SSE2__) && !defined(__AVX__)
template <bool kStream>
inline void store_pair(BF16* dst, VF a, VF b) {
  const __m128i out = bf16_bits_sse2<true>(a, b);
  put<16, kStream>(dst, &out);
}
template <bool kStream>
inline void store_pair(BF16Finite* dst, VF a, VF b) {
  const __m128i out = bf16_bits_sse2<false>(a, b);
  put<16, kStream>(dst, &out);
}
template <bool kStream>
inline void store_pair(FP16* dst, VF a, VF b) {
  const __m128i out = fp16_bits_sse2(a, b);
  put<16, kStream>(dst, &out);
}
#endif
#if defined(__AVX2__)
template <bool kStream>
inline void store_pair(BF16* dst, VF a, VF b) { store_bf16_pair<true, kStream>(dst, a, b); }
template <bool kStream>
inline void store_pair(BF16Finite* dst, VF a, VF b) { store_bf16_pair<false, kStream>(dst, a, b); }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
// a holds the even columns of 16, b the odd ones, so that word j of the result is column j. Word
// blends pair the high halves (hi) and the low halves (lo) of a's and b's lanes; the rounding carry
// of lo + 0x7FFF + (lowest kept bit of hi) is a saturating 16-bit add that reaches 0xFFFF. Nine
// operations per 16 values instead of twelve; on AVX2 they share ports with the FMAs.
template <bool kStream>
inline void store_pair(BF16Split* dst, VF a, VF b) {
  const __m256i ua = _mm256_castps_si256((__m256)a), ub = _mm256_castps_si256((__m256)b);
  const __m256i hi = _mm256_blend_epi16(_mm256_srli_epi32(ua, 16), ub, 0xAA);
  const __m256i lo = _mm256_blend_epi16(ua, _mm256_slli_epi32(ub, 16), 0xAA);
  const __m256i bias = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi16(1)), _mm256_set1_epi16(0x7FFE));
  const __m256i carry = _mm256_cmpeq_epi16(_mm256_adds_epu16(lo, bias), _mm256_set1_epi16(-1));
  const __m256i out = _mm256_sub_epi16(hi, carry);
  put<32, kStream>(dst, &out);
}
#endif

// `bytes` bytes of `value` from p; stream: non-temporal stores from the first 64-byte boundary on.
inline void fill_bytes(char* p, int64_t bytes, unsigned char value, bool stream) {
  if (bytes <= 0) return;
  if (stream) {
    alignas(64) char pattern[64];
    std::memset(pattern, value, sizeof pattern);
    const int64_t head = min64(bytes, (64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63);
    std::memset(p, value, static_cast<size_t>(head));
    p += head;
    bytes -= head;
    for (; bytes >= 64; bytes -= 64, p += 64) put<64, true>(p, pattern);
  }
  std::memset(p, value, static_cast<size_t>(bytes));
}

// Zeros for [dst, dst + n): blocks with all-zero coefficients cost a memset, not h FMAs.
template <typename Out>
inline void zero(Out* dst, int64_t n, bool stream) {
  if (n > 0) fill_bytes(reinterpret_cast<char*>(dst), n * static_cast<int64_t>(sizeof(Out)), 0, stream);
}

// dst[k][t - t0] = sum_i coef[k][i] * slab[i * T + t] for t in [t, t + NV * L) and k < K: the
// micro-kernel, all K * NV accumulators in registers.
// kStream: non-temporal stores, every dst[k] + offset aligned to the vector width (see micro_at).
// CS: coef[k] holds each coefficient once (CS = 1, read with a broadcast load) or as a whole vector
// of CS = L copies (expanded_coefficients).
template <typename A, typename Out, int K, int NV, bool kStream, int CS>
void micro(const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t, Out* const* dst, int64_t offset) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::kLanes;
  if (h < 1) __builtin_unreachable();  // the boundary refuses h = 0; GCC would otherwise merge an h = 0 path into the stores
  V acc[K][NV];
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[k][j] = V{};
#pragma GCC unroll 2
  for (int64_t i = 0; i < h; ++i) {
    V r[NV];
    const A* row = slab + i * T + t;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&r[j], row + j * L, sizeof(V));
#pragma GCC unroll 16
    for (int k = 0; k < K; ++k) {
      V c;
      if constexpr (CS == 1) c = splat(coef[k] + i);
      else std::memcpy(&c, coef[k] + i * CS, sizeof(V));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[k][j] = madd(c, r[j], acc[k][j]);
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) {
#pragma GCC unroll 4
    for (int j = 0; j + 1 < NV; j += 2) store_pair<kStream>(dst[k] + offset + j * L, acc[k][j], acc[k][j + 1]);
    if constexpr (NV % 2 == 1) store_vec<kStream>(dst[k] + offset + (NV - 1) * L, acc[k][NV - 1]);
  }
}

// One micro-kernel, streaming its stores when asked and every destination is aligned to the vector
// width. The choice is made here, once per call, and not among the stores: with both store paths in
// one body GCC computes their common part for every accumulator before the branch and spills it.
template <typename A, typename Out, int K, int NV, int CS>
inline void micro_at(const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t, Out* const* dst,
                     int64_t offset, bool stream) {
  uintptr_t addresses = 0;
  for (int k = 0; k < K; ++k) addresses |= reinterpret_cast<uintptr_t>(dst[k] + offset);
  if (stream && (addresses & (kVecBytes - 1)) == 0)
    micro<A, Out, K, NV, true, CS>(coef, slab, h, T, t, dst, offset);
  else
    micro<A, Out, K, NV, false, CS>(coef, slab, h, T, t, dst, offset);
}

// Vectors of t per micro-kernel for K segments: as many as the accumulator budget allows.
constexpr int nv_for(int k) { return kAccumulators / k >= kNV ? kNV : (kAccumulators / k >= 2 ? 2 : 1); }

// K segments over columns [t0, t1) of the slab: full-width micro-kernels (their coefficients
// vcoef, CS copies each), then narrower ones, then a scalar tail (same rounding per term).
template <typename A, typename Out, int K, int CS>
void combine_columns(const A* const* vcoef, const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t0,
                     int64_t t1, Out* const* dst, bool stream) {
  constexpr int L = Vec<A>::kLanes, NV = nv_for(K);
  int64_t t = t0;
  for (; t + NV * L <= t1; t += NV * L) micro_at<A, Out, K, NV, CS>(vcoef, slab, h, T, t, dst, t - t0, stream);
  if constexpr (NV > 2) {
    if (t + 2 * L <= t1) {
      micro_at<A, Out, K, 2, CS>(vcoef, slab, h, T, t, dst, t - t0, stream);
      t += 2 * L;
    }
  }
  if constexpr (NV > 1) {
    for (; t + L <= t1; t += L) micro_at<A, Out, K, 1, CS>(vcoef, slab, h, T, t, dst, t - t0, stream);
  }
  for (; t < t1; ++t) {
    for (int k = 0; k < K; ++k) {
      A sum = 0;
      for (int64_t i = 0; i < h; ++i) sum = madd(coef[k][i], slab[i * T + t], sum);
      store(dst[k] + (t - t0), sum);
    }
  }
}

// SSE2 has no broadcast load: splat is a load and a shuffle, which takes an FP pipe from the adds and
// multiplies (the micro-kernel ran at about 60% of the variant's probe in L1). There each
// coefficient is copied once into a whole vector, which the micro-kernels then read with plain loads.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__AVX__)
constexpr int64_t kExpandedHeads = 128;  // expanded copies on the stack: K * h * 16 bytes, at most 24 KiB
#else
constexpr int64_t kExpandedHeads = 0;
#endif

template <typename A, typename Out, int K>
void combine(const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t0, int64_t t1, Out* const* dst,
             bool stream) {
  constexpr int L = Vec<A>::kLanes;
  if constexpr (kExpandedHeads > 0) {
    if (h <= kExpandedHeads && t1 - t0 >= 2 * nv_for(K) * L) {  // two or more micro-kernel calls share them
      alignas(64) A expanded[K * kExpandedHeads * L];
      const A* vcoef[K];
      for (int k = 0; k < K; ++k) {
        A* e = expanded + k * h * L;
        for (int64_t i = 0; i < h; ++i)
          for (int l = 0; l < L; ++l) e[i * L + l] = coef[k][i];
        vcoef[k] = e;
      }
      return combine_columns<A, Out, K, L>(vcoef, coef, slab, h, T, t0, t1, dst, stream);
    }
  }
  combine_columns<A, Out, K, 1>(coef, coef, slab, h, T, t0, t1, dst, stream);
}

// Segments per micro-kernel call for segments of `width` columns: short segments (feature layout,
// T = N) are grouped more widely so that each slab vector still feeds enough FMAs.
inline int group_for(int64_t width, int64_t lanes) {
  const int64_t vectors = width / lanes;
  const int64_t nv = vectors >= kNV ? kNV : (vectors >= 2 ? 2 : 1);
  const int64_t k = kAccumulators / nv;
  return static_cast<int>(k < kMaxGroup ? k : kMaxGroup);
}

template <typename A, typename Out>
void combine_k(int k, const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t0, int64_t t1,
               Out* const* dst, bool stream) {
  static_assert(kMaxGroup == 12, "combine_k covers groups of up to 12 segments");
  switch (k) {
    case 12: combine<A, Out, 12>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 8: combine<A, Out, 8>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 6: combine<A, Out, 6>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 5: combine<A, Out, 5>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 4: combine<A, Out, 4>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 3: combine<A, Out, 3>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 2: combine<A, Out, 2>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 1: combine<A, Out, 1>(coef, slab, h, T, t0, t1, dst, stream); break;
    default: {  // 7, 9-11: one group of the next smaller size, then the rest
      const int first = k > 8 ? 8 : 6;
      combine_k<A, Out>(first, coef, slab, h, T, t0, t1, dst, stream);
      combine_k<A, Out>(k - first, coef + first, slab, h, T, t0, t1, dst + first, stream);
    }
  }
}

// n segments (n <= kBatch) that share the columns [t0, t1): slab blocks of TB columns stay in L1
// while every group of segments passes over them.
template <typename A, typename Out>
void combine_batch(int n, const A* const* coef, Out* const* dst, const A* slab, int64_t h, int64_t T, int64_t t0,
                   int64_t t1, bool stream) {
  constexpr int64_t step = kNV * Vec<A>::kLanes;
  const int64_t tb = max64(step, kSlabBlockBytes / (h * static_cast<int64_t>(sizeof(A))) / step * step);
  const int group = group_for(t1 - t0, Vec<A>::kLanes);
  Out* d[kMaxGroup];
  for (int64_t ta = t0; ta < t1; ta += tb) {
    const int64_t te = min64(t1, ta + tb);
    for (int k0 = 0, k = 0; k0 < n; k0 += k) {
      // The last two groups share their segments evenly (32 = 6+6+6+6+4+4, not ...+6+2): a thin
      // group feeds too few FMAs per slab load.
      const int rest = n - k0;
      k = rest > group && rest < 2 * group && group <= 6 ? (rest + 1) / 2 : static_cast<int>(min64(group, rest));
      for (int j = 0; j < k; ++j) d[j] = dst[k0 + j] + (ta - t0);
      combine_k<A, Out>(k, coef + k0, slab, h, T, ta, te, d, stream);
    }
  }
}

// Rows q0 .. q0 + n - 1 (n <= kBatch) of OV_i into dst + j * h * M_in + i * M_in (the slab layout
// (M_out, h, M_in) from row q0 on): row q of head i is one segment whose coefficients are
// Wo[q, i d : (i + 1) d] and whose slab is the d x M_in block of Wv of its value head. Each entry is
// one chain of d multiply-adds from k = 0 whatever the blocking, so OV, and every tile of W' built
// from it, is the same bit for bit however it is split.
template <typename A>
void ov_head_rows(const A* wo, const A* wv, const OvProblem& pb, int64_t i, int64_t q0, int n, A* dst) {
  const A* coef[kBatch];
  A* rows[kBatch];
  for (int j = 0; j < n; ++j) {
    coef[j] = wo + (q0 + j) * pb.ldo + i * pb.d;
    rows[j] = dst + (j * pb.heads + i) * pb.m_in;
  }
  combine_batch<A, A>(n, coef, rows, wv + (i / pb.group) * pb.d * pb.m_in, pb.d, pb.m_in, 0, pb.m_in, false);
}

// OV in slab layout, out (M_out, h, M_in) (see OvProblem), in items of (head, kBatch rows q): one
// head's block of Wv stays in cache.
template <typename A>
void ov_slabs(const A* wo, const A* wv, A* out, const OvProblem& pb, int num_threads) {
  const int64_t blocks = (pb.m_out + kBatch - 1) / kBatch;
  const int64_t items = pb.heads * blocks;
  auto item = [&](int64_t w) {
    const int64_t i = w / blocks, q0 = (w % blocks) * kBatch;
    ov_head_rows(wo, wv, pb, i, q0, static_cast<int>(min64(kBatch, pb.m_out - q0)), out + q0 * pb.heads * pb.m_in);
  };
  if (num_threads <= 1 || items == 1) {
    for (int64_t w = 0; w < items; ++w) item(w);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
  for (int64_t w = 0; w < items; ++w) item(w);
}

// The OV of a factored R (KronSumProblem::wo, wv).
inline OvProblem ov_problem(const KronSumProblem& pb) { return OvProblem{pb.Q, pb.T, pb.h, pb.group, pb.d, pb.ldo}; }

template <typename A>
inline bool all_zero(const A* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (v[i] != A(0)) return false;
  return true;
}

constexpr int kNoBits = 1 << 20;  // FactorScan::lowest_bit of a factor without nonzero finite entries

struct FactorScan {
  bool finite = true;  // no Inf or NaN
  // A lower bound on the exponent of the lowest set bit of every nonzero finite entry (float: the
  // entry's exponent minus 23; -149 for subnormals), or kNoBits. Sums of products of two factors,
  // each product and each rounding exact on that grid, are multiples of 2^(sum of their bounds):
  // nonzero ones are at least that large, so no result is subnormal when the sum is >= -126.
  int lowest_bit = kNoBits;
};

// Scans the strided (n0, n1, n2) array v: finiteness (x - x is 0 exactly for finite x) and, with
// kLowest (float), lowest_bit. Split across threads for large factors, since it runs before every call.
template <bool kLowest, typename A>
FactorScan scan_factor(const A* v, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                       int num_threads) {
  static_assert(!kLowest || std::is_same_v<A, float>, "lowest_bit is computed for float factors");
  auto line = [&](int64_t k, int& bad, uint32_t& emin) {
    const A* row = v + (k / n1) * s0 + (k % n1) * s1;
    int b = 0;
    uint32_t m = 255;
    auto entry = [&](A x) __attribute__((always_inline)) {
      if constexpr (kLowest) {  // float: the biased exponent e; e = 255 is Inf or NaN, zeros leave m
        const uint32_t u = bits_of(x), e = (u >> 23) & 0xFFu;
        b |= e == 0xFFu;
        m = std::min(m, (u << 1) != 0 ? e : 255u);
      } else {
        b |= !((x - x) == A(0));
      }
    };
    if (s2 == 1) {  // contiguous lines vectorise
      for (int64_t j = 0; j < n2; ++j) entry(row[j]);
    } else {
      for (int64_t j = 0; j < n2; ++j) entry(row[j * s2]);
    }
    bad |= b;
    emin = std::min(emin, m);
  };
  const int64_t lines = n0 * n1;
  int bad = 0;
  uint32_t emin = 255;
  if (num_threads > 1 && lines * n2 > (int64_t(1) << 20)) {
#ifdef _OPENMP
#pragma omp parallel for reduction(| : bad) reduction(min : emin) num_threads(num_threads)
#endif
    for (int64_t k = 0; k < lines; ++k) line(k, bad, emin);
  } else {
    for (int64_t k = 0; k < lines; ++k) line(k, bad, emin);
  }
  FactorScan scan;
  scan.finite = bad == 0;
  if (emin < 255) scan.lowest_bit = static_cast<int>(emin > 0 ? emin : 1) - 150;
  return scan;
}

template <typename A>
bool all_finite(const A* v, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                int num_threads) {
  return scan_factor<false>(v, n0, n1, n2, s0, s1, s2, num_threads).finite;
}

// [first, last) of the columns t where some R[i, q, t] != 0 (empty when the slab is zero).
template <typename A>
void nonzero_columns(const A* slab, int64_t h, int64_t T, int64_t* first, int64_t* last) {
  int64_t lo = T, hi = 0;
  for (int64_t i = 0; i < h; ++i) {
    const A* row = slab + i * T;
    int64_t a = 0, b = T;
    while (a < b && row[a] == A(0)) ++a;
    while (b > a && row[b - 1] == A(0)) --b;
    if (a < b) { lo = min64(lo, a); hi = max64(hi, b); }
  }
  *first = lo;
  *last = max64(lo, hi);
}

struct Shortcuts {
  bool zero_segments;  // skip segments whose coefficients are all zero (valid when R is finite)
  bool zero_columns;   // skip columns where the slab is zero (valid when L is finite)
  bool stream;
  bool no_subnormals = false;  // no entry of W can be subnormal (FactorScan::lowest_bit)
};

// Per-thread copies of the factor parts a row reads, packed the way the micro-kernel wants them
// (as a GEMM packs its panels): the slab R[:, q, :] as (h, T) rows and the coefficients L[:, p, s]
// of the tile's segments as (segments, h). The factors themselves are read in place through their
// strides (no transposed copy of OV per call), and the packed rows, unlike rows of OV h·Q·T apart,
// do not all fall into the same cache sets.
// A 64-byte aligned array (full-width vector loads from the packed slab never straddle cache lines).
template <typename A>
class AlignedBuffer {
 public:
  void resize(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(A) + 63) / 64 * 64;
    data_.reset(static_cast<A*>(std::aligned_alloc(64, bytes)));
    if (!data_) throw std::bad_alloc();
  }
  A* data() const { return data_.get(); }
  A& operator[](int64_t i) const { return data_.get()[i]; }

 private:
  struct Free {
    void operator()(A* p) const { std::free(p); }
  };
  std::unique_ptr<A, Free> data_;
};

template <typename A>
struct Workspace {
  static constexpr int64_t kCoefCacheBytes = int64_t(1) << 20;  // all rows' coefficients up to 1 MiB
  static constexpr int kQBlock = 6;  // factored R: slabs computed together (rows of one micro-kernel)
  AlignedBuffer<A> slab, coef, split;  // split: split_slab's copy of the slab of split_q
  std::vector<char> packed;  // per p of the tile: 1 + (some segment's coefficients are all zero) once in `coef`
  bool zero_segment = true;  // pack_coef's row has a segment whose coefficients are all zero
  const A* current = nullptr;  // the slab of q
  int64_t q = -1, z0 = 0, z1 = 0, split_q = -1;
  int64_t s0, segments, p0, rows_cached;
  int64_t blk0 = 0, nblk = 0;  // factored R: the q whose slabs `slab` holds
  bool finite = true;          // factored R: the current slab holds no Inf or NaN

  Workspace(const KronSumProblem& pb)
      : s0(pb.col0 / pb.T), segments((pb.col0 + pb.cols - 1) / pb.T - pb.col0 / pb.T + 1),
        p0(pb.row0 / pb.Q) {
    const int64_t np = (pb.row0 + pb.rows - 1) / pb.Q - p0 + 1;
    // Keep every row's coefficients when they are small (token layout: A), so that rows visited
    // q-major (p changing every row) pack each p once; otherwise one p at a time.
    rows_cached = np * segments * pb.h * static_cast<int64_t>(sizeof(A)) <= kCoefCacheBytes ? np : 1;
    slab.resize(pb.h * pb.T * (pb.wo != nullptr ? kQBlock : 1));
    coef.resize(rows_cached * segments * pb.h);
    packed.assign(rows_cached, 0);
  }

  // R[:, q, :] as (h, T) rows: in place when R is laid out (Q, h, T) already (rows T apart), else
  // copied into the thread's buffer.
  const A* pack_slab(const A* rt, const KronSumProblem& pb, int64_t q_, bool zero_columns) {
    if (q_ != q) {
      const bool in_place = pb.r_h == pb.T;
      if (pb.wo != nullptr) {
        if (q_ < blk0 || q_ >= blk0 + nblk) compute_slabs(pb, q_);
        current = &slab[(q_ - blk0) * pb.h * pb.T];
        finite = all_finite(current, 1, 1, pb.h * pb.T, 0, 0, 1, 1);
      } else if (in_place) {
        current = rt + q_ * pb.r_q;
      } else {
        for (int64_t i = 0; i < pb.h; ++i) std::memcpy(&slab[i * pb.T], rt + i * pb.r_h + q_ * pb.r_q, pb.T * sizeof(A));
        current = slab.data();
      }
      z0 = 0;
      z1 = pb.T;
      if (zero_columns) nonzero_columns(current, pb.h, pb.T, &z0, &z1);
      q = q_;
    }
    return current;
  }

  // The current slab with every full group of 2L columns as its L even then its L odd columns (the
  // rest as it is), for BF16Split stores; computed once per slab.
  const A* split_slab(int64_t h, int64_t T) {
    if (split_q != q) {
      constexpr int64_t L = Vec<A>::kLanes;
      if (split_q < 0) split.resize(h * T);
      const int64_t full = T / (2 * L) * (2 * L);
      for (int64_t i = 0; i < h; ++i) {
        const A* src = current + i * T;
        A* dst = &split[i * T];
        for (int64_t t = 0; t < full; t += 2 * L)
          for (int64_t k = 0; k < L; ++k) {
            dst[t + k] = src[t + 2 * k];
            dst[t + L + k] = src[t + 2 * k + 1];
          }
        for (int64_t t = full; t < T; ++t) dst[t] = src[t];
      }
      split_q = q;
    }
    return split.data();
  }

  // Factored R: the slabs of q0, q0 + 1, ... (up to kQBlock), computed as ov_slabs computes them.
  void compute_slabs(const KronSumProblem& pb, int64_t q0) {
    blk0 = q0;
    nblk = min64(kQBlock, pb.Q - q0);
    const OvProblem op = ov_problem(pb);
    for (int64_t i = 0; i < pb.h; ++i)
      ov_head_rows(static_cast<const A*>(pb.wo), static_cast<const A*>(pb.wv), op, i, q0, static_cast<int>(nblk),
                   slab.data());
  }

  // L[:, p, s] of the tile's segments as (segments, h), one coefficient vector contiguous.
  const A* pack_coef(const A* lt, const KronSumProblem& pb, int64_t p) {
    const int64_t slot = rows_cached > 1 ? p - p0 : 0;
    A* dst = &coef[slot * segments * pb.h];
    if (!packed[slot] || (rows_cached == 1 && p != last_p)) {
      for (int64_t i = 0; i < pb.h; ++i) {
        const A* src = lt + i * pb.l_h + p * pb.l_p + s0 * pb.l_s;
        for (int64_t s = 0; s < segments; ++s) dst[s * pb.h + i] = src[s * pb.l_s];
      }
      bool any_zero = false;  // decided once per p, not per row and segment
      for (int64_t s = 0; s < segments && !any_zero; ++s) any_zero = all_zero(dst + s * pb.h, pb.h);
      packed[slot] = static_cast<char>(1 + any_zero);
      last_p = p;
    }
    zero_segment = packed[slot] == 2;
    return dst;
  }

 private:
  int64_t last_p = -1;
};

// n whole segments of T columns from orow on, with coefficients coefs (n, h).
template <typename A, typename Out>
void whole_segments(const A* coefs, const A* slab, Out* orow, int64_t h, int64_t T, int64_t n, bool zero_check,
                    bool stream) {
  const A* bcoef[kBatch];
  Out* bdst[kBatch];
  if (!zero_check) {  // every segment is computed: batches of consecutive ones
    for (int64_t j0 = 0; j0 < n; j0 += kBatch) {
      const int nb = static_cast<int>(min64(kBatch, n - j0));
      for (int j = 0; j < nb; ++j) {
        bcoef[j] = coefs + (j0 + j) * h;
        bdst[j] = orow + (j0 + j) * T;
      }
      combine_batch<A, Out>(nb, bcoef, bdst, slab, h, T, 0, T, stream);
    }
    return;
  }
  int nb = 0;
  Out* dst = orow;
  const A* coef = coefs;
  for (int64_t j = 0; j < n; ++j, dst += T, coef += h) {
    if (coef[0] == A(0) && all_zero(coef, h)) {
      zero(dst, T, stream);
      continue;
    }
    bcoef[nb] = coef;
    bdst[nb] = dst;
    if (++nb == kBatch) {
      combine_batch<A, Out>(nb, bcoef, bdst, slab, h, T, 0, T, stream);
      nb = 0;
    }
  }
  if (nb > 0) combine_batch<A, Out>(nb, bcoef, bdst, slab, h, T, 0, T, stream);
}

template <typename A, typename Out>
void write_row(const A* lt, const A* rt, Out* orow, const KronSumProblem& pb, int64_t grow, Shortcuts sc,
               Workspace<A>& ws) {
  const int64_t h = pb.h, T = pb.T;
  const int64_t p = grow / pb.Q, q = grow % pb.Q;
  const A* slab = ws.pack_slab(rt, pb, q, sc.zero_columns);
  if constexpr (std::is_same_v<Out, BF16>) {
    // Both factors of this row finite: no NaN can arise but Inf - Inf, whose default NaN survives
    // the rounding bias, so the stores skip the NaN test.
    if (sc.zero_segments && sc.zero_columns && ws.finite) {
      if constexpr (kBf16Convert) {
        if (sc.no_subnormals) return write_row(lt, rt, reinterpret_cast<BF16Normal*>(orow), pb, grow, sc, ws);
      }
      return write_row(lt, rt, reinterpret_cast<BF16Finite*>(orow), pb, grow, sc, ws);
    }
  }
  const A* coefs = ws.pack_coef(lt, pb, p);
  const int64_t z0 = ws.z0, z1 = ws.z1;

  const int64_t c_end = pb.col0 + pb.cols;
  const bool zero_check = sc.zero_segments && ws.finite && ws.zero_segment;
  if (pb.col0 % T == 0 && c_end % T == 0 && z0 == 0 && z1 == T) {
    // Whole segments and no zero columns (a whole W'): only the zero-block test per segment.
    // Every micro-kernel then starts at a multiple of 2L columns (combine_batch), as BF16Split needs.
    if constexpr (kSplitBf16 && std::is_same_v<Out, BF16Finite>)
      whole_segments(coefs, ws.split_slab(h, T), reinterpret_cast<BF16Split*>(orow), h, T, pb.cols / T, zero_check,
                     sc.stream);
    else
      whole_segments(coefs, slab, orow, h, T, pb.cols / T, zero_check, sc.stream);
    return;
  }
  const A* bcoef[kBatch];
  Out* bdst[kBatch];
  int nb = 0;
  for (int64_t s = pb.col0 / T; s * T < c_end; ++s) {
    const int64_t ta = max64(0, pb.col0 - s * T), tb = min64(T, c_end - s * T);
    Out* dst = orow + (s * T + ta - pb.col0);  // local address of column (s, ta)
    const A* coef = coefs + (s - ws.s0) * h;
    const int64_t lo = max64(ta, z0), hi = min64(tb, z1);
    if (lo >= hi || (zero_check && coef[0] == A(0) && all_zero(coef, h))) {
      zero(dst, tb - ta, sc.stream);
      continue;
    }
    zero(dst, lo - ta, sc.stream);
    zero(dst + (hi - ta), tb - hi, sc.stream);
    Out* dlo = dst + (lo - ta);
    if (ta == 0 && tb == T) {  // a whole segment: every batched one shares [z0, z1)
      bcoef[nb] = coef;
      bdst[nb] = dlo;
      if (++nb == kBatch) {
        combine_batch<A, Out>(nb, bcoef, bdst, slab, h, T, lo, hi, sc.stream);
        nb = 0;
      }
    } else {  // the tile's first or last segment, cut by its edge
      combine_batch<A, Out>(1, &coef, &dlo, slab, h, T, lo, hi, sc.stream);
    }
  }
  if (nb > 0) combine_batch<A, Out>(nb, bcoef, bdst, slab, h, T, z0, z1, sc.stream);
}

// Orders a thread's non-temporal stores before what follows it (once per thread and call, not per
// row: each fence waits for the write-combining buffers to drain).
inline void store_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// The order in which the tile's rows g = p * Q + q are written. Row (p, q) reads the coefficients
// L[:, p, :] (S x h) and the slab R[:, q, :] (h x T). Consecutive rows should share the larger of
// the two, so that it is read from memory once and then from cache: p-major (rows in memory order)
// when S >= T, q-major (all p for one q) when T > S, as in token layout where T = M_in >> S = N and
// the h x M_in slab would otherwise be packed again for every row. A fresh output is written in
// memory order instead, so each page is written right after its first-touch fault zeroed it.
struct RowOrder {
  int64_t p0, np, q0, nq, count, Q, row0, row1;
  bool q_major;
  explicit RowOrder(const KronSumProblem& pb)
      : p0(pb.row0 / pb.Q), np((pb.row0 + pb.rows - 1) / pb.Q - pb.row0 / pb.Q + 1), q0(0), nq(pb.Q), count(0),
        Q(pb.Q), row0(pb.row0), row1(pb.row0 + pb.rows), q_major(pb.T > pb.S && np > 1 && !pb.fresh) {
    if (np == 1) {  // one p: only the q range of the tile
      q0 = pb.row0 % pb.Q;
      nq = pb.rows;
    }
    count = q_major ? np * nq : pb.rows;
  }
  // The global row of the k-th step, or -1 for a (p, q) of the bounding box outside the tile.
  int64_t global_row(int64_t k) const {
    if (!q_major) return row0 + k;
    const int64_t g = (p0 + k % np) * Q + q0 + k / np;
    return g >= row0 && g < row1 ? g : -1;
  }
};

template <typename A, typename Out>
void run_rows(const A* lt, const A* rt, Out* out, const KronSumProblem& pb, Shortcuts sc, int num_threads);

template <typename A, typename Out>
void run(const A* lt, const A* rt, Out* out, const KronSumProblem& problem, int num_threads) {
  if (problem.rows <= 0 || problem.cols <= 0) return;
  KronSumProblem pb = problem;
  AlignedBuffer<A> ov;
  if (pb.wo != nullptr && !RowOrder(pb).q_major) {
    // Rows in memory order would need every slab once per p: write OV once instead.
    ov.resize(pb.Q * pb.h * pb.T);
    ov_slabs(static_cast<const A*>(pb.wo), static_cast<const A*>(pb.wv), ov.data(), ov_problem(pb), num_threads);
    rt = ov.data();
    pb.r_h = pb.T;
    pb.r_q = pb.h * pb.T;
    pb.wo = pb.wv = nullptr;
  }
  Shortcuts sc;
  // Zero segments are skipped only where the slab is finite: checked here for a given R, per slab
  // (Workspace::finite) for a factored one.
  // bfloat16 with the conversion instruction also bounds the smallest nonzero |W| (no_subnormals).
  constexpr bool kLowest = kBf16Convert && std::is_same_v<Out, BF16>;
  const FactorScan left = scan_factor<kLowest>(lt, pb.h, pb.P, pb.S, pb.l_h, pb.l_p, pb.l_s, num_threads);
  FactorScan right;
  if (pb.wo == nullptr) {
    right = scan_factor<kLowest>(rt, pb.h, pb.Q, pb.T, pb.r_h, pb.r_q, int64_t(1), num_threads);
  } else if constexpr (kLowest) {  // OV = Wo Wv: its bound is the sum of theirs (finiteness: per slab)
    const A* wo = static_cast<const A*>(pb.wo);
    const A* wv = static_cast<const A*>(pb.wv);
    const int lo = scan_factor<true>(wo, 1, pb.Q, pb.h * pb.d, 0, pb.ldo, int64_t(1), num_threads).lowest_bit;
    const int lv = scan_factor<true>(wv, 1, pb.h / pb.group * pb.d, pb.T, 0, pb.T, int64_t(1), num_threads).lowest_bit;
    right.lowest_bit = lo == kNoBits || lv == kNoBits ? kNoBits : lo + lv;
  }
  sc.zero_segments = pb.wo != nullptr || right.finite;
  sc.zero_columns = left.finite;
  sc.no_subnormals = kLowest && left.lowest_bit + right.lowest_bit >= -126;
  // Stream past the cache once the tile is well beyond the last-level cache of a core. Not into
  // fresh pages: the kernel has just zeroed each one in the cache, and regular stores overwrite the
  // zeros there instead of sending both to memory.
  sc.stream = !pb.fresh && pb.rows * pb.cols * static_cast<int64_t>(sizeof(Out)) > kStreamBytes;
  run_rows(lt, rt, out, pb, sc, num_threads);
}

template <typename A, typename Out>
void run_rows(const A* lt, const A* rt, Out* out, const KronSumProblem& pb, Shortcuts sc, int num_threads) {
  const RowOrder order(pb);
  auto row = [&](int64_t k, Workspace<A>& ws) {
    const int64_t g = order.global_row(k);
    if (g >= 0) write_row(lt, rt, out + (g - pb.row0) * pb.cols, pb, g, sc, ws);
  };
  if (num_threads <= 1) {  // no OpenMP at all: safe in a forked child of a process that used it
    Workspace<A> ws(pb);
    for (int64_t k = 0; k < order.count; ++k) row(k, ws);
    store_fence(sc.stream);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
  {
    Workspace<A> ws(pb);
    // q-major: a thread takes all rows of one q at a time, so each slab is packed once per call.
    const int chunk = order.q_major ? static_cast<int>(order.np) * (pb.wo != nullptr ? Workspace<A>::kQBlock : 1) : 1;
    (void)chunk;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk) nowait
#endif
    for (int64_t k = 0; k < order.count; ++k) row(k, ws);
    store_fence(sc.stream);  // before the barrier that ends the parallel region
  }
}

}  // namespace

void stream_fill(void* dst, int64_t bytes, int value, int num_threads) {
  constexpr int64_t kChunk = int64_t(2) << 20;
  char* base = static_cast<char*>(dst);
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  const auto byte = static_cast<unsigned char>(value);
  auto chunk = [&](int64_t c) { fill_bytes(base + c * kChunk, min64(kChunk, bytes - c * kChunk), byte, true); };
  if (num_threads <= 1 || chunks <= 1) {  // no OpenMP at all (see run_rows)
    for (int64_t c = 0; c < chunks; ++c) chunk(c);
    store_fence(true);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t c = 0; c < chunks; ++c) chunk(c);
    store_fence(true);
  }
}

void kron_sum_f32(const float* lt, const float* rt, void* out, OutType out_type, const KronSumProblem& pb,
                  int num_threads) {
  switch (out_type) {
    case OutType::kFloat32: run(lt, rt, static_cast<float*>(out), pb, num_threads); break;
    case OutType::kFloat16: run(lt, rt, static_cast<FP16*>(out), pb, num_threads); break;
    case OutType::kBFloat16: run(lt, rt, static_cast<BF16*>(out), pb, num_threads); break;
    case OutType::kFloat64: break;  // excluded by the boundary: float64 output uses kron_sum_f64
  }
}

void kron_sum_f64(const double* lt, const double* rt, double* out, const KronSumProblem& pb, int num_threads) {
  run(lt, rt, out, pb, num_threads);
}

void ov_slabs_f32(const float* wo, const float* wv, float* out, const OvProblem& pb, int num_threads) {
  ov_slabs(wo, wv, out, pb, num_threads);
}

void ov_slabs_f64(const double* wo, const double* wv, double* out, const OvProblem& pb, int num_threads) {
  ov_slabs(wo, wv, out, pb, num_threads);
}

DUAT_ISA_END

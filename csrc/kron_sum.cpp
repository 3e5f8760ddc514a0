// Hot loop of the Kronecker-sum materialisation (see kron_sum.h for the contract).
//
// Roofline. Every output entry is a length-h dot product (2h flops) and one store; nothing is
// read from memory except the small factors, which stay in cache. For h <= ~8 on a 2-core AVX2/
// AVX-512 machine the stores bound the kernel; for larger h the FMAs do.
//
// Structure. One output row (p, q) is S segments of T entries; segment s is
//   W[(p, q), (s, :)] = sum_i L[i, p, s] * R[i, q, :],
// a linear combination of the h rows of the slab R[:, q, :] (h x T, cache resident). We combine
// K = 4 segments at once so that each loaded slab vector feeds 4 FMAs, over 4 vectors of t, which
// keeps 16 accumulators in registers (a 4 x 4V micro-kernel with inner dimension h).
// Segments whose coefficients are all zero (causal masks in token layout) and the columns where
// R[:, q, :] is zero (causal masks in feature layout) are written with memset.
//
// Vectorisation uses GCC/Clang vector extensions: with -march=native they become AVX-512/AVX2
// instructions, on a baseline build they lower to SSE2, and a scalar loop handles ragged tails.
#include "kron_sum.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace duat {
namespace {

constexpr int kVecBytes = 64;  // one AVX-512 register; two AVX2 or four SSE registers otherwise
constexpr int kGroupMax = 8;   // segments combined per micro-kernel call: 4 for long segments, 8 for short
constexpr int kAccumulators = 16;  // K segments x NV vectors of t: half the AVX-512 register file
constexpr int64_t kStreamBytes = int64_t(16) << 20;  // tiles above 16 MiB use non-temporal stores

template <typename A>
struct Vec {
  static constexpr int kLanes = kVecBytes / sizeof(A);
  typedef A type __attribute__((vector_size(kVecBytes)));
};

struct BF16 { uint16_t bits; };
struct FP16 { uint16_t bits; };

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// float -> bfloat16, round to nearest even (NaN stays a quiet NaN), as torch rounds.
inline uint16_t to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// float -> IEEE half, round to nearest even, handling subnormals, overflow to inf and NaN.
inline uint16_t to_fp16(float f) {
#if defined(__F16C__) || defined(__AVX512F__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  // Scale so that the float adder rounds the mantissa to 10 bits at the right exponent.
  float base = (std::abs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

inline void store(float* dst, float v) { *dst = v; }
inline void store(double* dst, double v) { *dst = v; }
inline void store(BF16* dst, float v) { dst->bits = to_bf16(v); }
inline void store(FP16* dst, float v) { dst->bits = to_fp16(v); }

using VF = Vec<float>::type;
using VD = Vec<double>::type;

// Stores of one 64-byte (or 32-byte, for 16-bit outputs) vector. With `stream`, aligned stores
// bypass the cache (non-temporal): a large W' is never read back soon, and a regular store would
// first read the line it overwrites, halving the useful write bandwidth.
template <int Bytes>
inline void put(void* dst, const void* src, bool stream) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(dst);
#if defined(__AVX512F__)
  if (Bytes == 64 && stream && (addr & 63) == 0) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_loadu_si512(src));
    return;
  }
#endif
#if defined(__AVX__)
  if (stream && (addr & 31) == 0) {
    for (int j = 0; j < Bytes / 32; ++j)
      _mm256_stream_si256(static_cast<__m256i*>(dst) + j,
                          _mm256_loadu_si256(static_cast<const __m256i*>(src) + j));
    return;
  }
#elif defined(__SSE2__)
  if (stream && (addr & 15) == 0) {
    for (int j = 0; j < Bytes / 16; ++j)
      _mm_stream_si128(static_cast<__m128i*>(dst) + j, _mm_loadu_si128(static_cast<const __m128i*>(src) + j));
    return;
  }
#endif
  (void)addr;
  (void)stream;
  std::memcpy(dst, src, Bytes);
}

inline void store_vec(float* dst, VF v, bool stream) { put<sizeof v>(dst, &v, stream); }
inline void store_vec(double* dst, VD v, bool stream) { put<sizeof v>(dst, &v, stream); }

inline void store_vec(BF16* dst, VF v, bool stream) {
  typedef uint32_t VU32 __attribute__((vector_size(kVecBytes)));
  typedef int32_t VI32 __attribute__((vector_size(kVecBytes)));
  typedef uint16_t VU16 __attribute__((vector_size(kVecBytes / 2)));
  VU32 u;
  std::memcpy(&u, &v, sizeof u);
  VU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  VI32 is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;  // all-ones lanes where NaN
  VU32 nan_mask = (VU32)is_nan;
  rounded = (rounded & ~nan_mask) | (0x7FC0u & nan_mask);
  VU16 narrow = __builtin_convertvector(rounded, VU16);
  put<sizeof narrow>(dst, &narrow, stream);
}

inline void store_vec(FP16* dst, VF v, bool stream) {
  uint16_t half[Vec<float>::kLanes];
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(half), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  __m256 x[2];
  std::memcpy(x, &v, sizeof x);
  for (int j = 0; j < 2; ++j)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(half) + j, _mm256_cvtps_ph(x[j], _MM_FROUND_TO_NEAREST_INT));
#else
  float lanes[Vec<float>::kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int j = 0; j < Vec<float>::kLanes; ++j) half[j] = to_fp16(lanes[j]);
#endif
  put<sizeof half>(dst, half, stream);
}

// Zeros for [dst, dst + n): blocks with all-zero coefficients cost a memset, not h FMAs.
// c += a * b rounded as the vector path rounds it (fused where the hardware fuses), so that a
// tile computed with other vector boundaries equals the same slice of the full matrix bit for bit.
template <typename A>
inline A madd(A a, A b, A c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return c + a * b;
#endif
}

template <typename Out>
inline void zero(Out* dst, int64_t n, bool stream) {
  if (n <= 0) return;
  char* p = reinterpret_cast<char*>(dst);
  int64_t bytes = n * static_cast<int64_t>(sizeof(Out));
  if (stream) {
    alignas(64) static const char zeros[64] = {};
    const int64_t head = std::min<int64_t>(bytes, (64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63);
    std::memset(p, 0, static_cast<size_t>(head));
    p += head;
    bytes -= head;
    for (; bytes >= 64; bytes -= 64, p += 64) put<64>(p, zeros, true);
  }
  std::memset(p, 0, static_cast<size_t>(bytes));
}

// dst[k][t - t0] = sum_i coef[k][i] * slab[i * T + t] for t in [t0, t1) and k < K:
// the micro-kernel, NV vectors of t wide, all K * NV accumulators in registers. H > 0 fixes the
// number of heads at compile time (fully unrolled head loop); H = 0 reads it from h.
template <typename A, typename Out, int K, int NV, int H>
inline void combine_block(const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t,
                          Out* const* dst, int64_t offset, bool stream) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::kLanes;
  const int64_t heads = H > 0 ? H : h;
  V acc[K][NV];
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[k][j] = V{};
#pragma GCC unroll 16
  for (int64_t i = 0; i < heads; ++i) {
    V r[NV];
    const A* row = slab + i * T + t;
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) std::memcpy(&r[j], row + j * L, sizeof(V));
#pragma GCC unroll 16
    for (int k = 0; k < K; ++k) {
      const V c = V{} + coef[k][i];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[k][j] += c * r[j];
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) store_vec(dst[k] + offset + j * L, acc[k][j], stream);
}

template <typename A, typename Out, int K, int H>
void combine_h(const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t0, int64_t t1,
               Out* const* dst, bool stream) {
  constexpr int L = Vec<A>::kLanes;
  constexpr int NV = kAccumulators / K > 4 ? 4 : kAccumulators / K;
  int64_t t = t0;
  for (; t + NV * L <= t1; t += NV * L) combine_block<A, Out, K, NV, H>(coef, slab, h, T, t, dst, t - t0, stream);
  if (NV > 2 && t + 2 * L <= t1) {
    combine_block<A, Out, K, 2, H>(coef, slab, h, T, t, dst, t - t0, stream);
    t += 2 * L;
  }
  for (; t + L <= t1; t += L) combine_block<A, Out, K, 1, H>(coef, slab, h, T, t, dst, t - t0, stream);
  for (; t < t1; ++t) {
    for (int k = 0; k < K; ++k) {
      A sum = 0;
      for (int64_t i = 0; i < h; ++i) sum = madd(coef[k][i], slab[i * T + t], sum);
      store(dst[k] + (t - t0), sum);
    }
  }
}

// Head counts of common models get a fully unrolled head loop; others use the runtime loop.
template <typename A, typename Out, int K>
void combine(const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t0, int64_t t1,
             Out* const* dst, bool stream) {
  switch (h) {
    case 4: combine_h<A, Out, K, 4>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 8: combine_h<A, Out, K, 8>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 12: combine_h<A, Out, K, 12>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 16: combine_h<A, Out, K, 16>(coef, slab, h, T, t0, t1, dst, stream); break;
    default: combine_h<A, Out, K, 0>(coef, slab, h, T, t0, t1, dst, stream); break;
  }
}

template <typename A, typename Out>
void combine_group(int n, const A* const* coef, const A* slab, int64_t h, int64_t T, int64_t t0,
                   int64_t t1, Out* const* dst, bool stream) {
  switch (n) {
    case 8: combine<A, Out, 8>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 7: combine<A, Out, 7>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 6: combine<A, Out, 6>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 5: combine<A, Out, 5>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 4: combine<A, Out, 4>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 3: combine<A, Out, 3>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 2: combine<A, Out, 2>(coef, slab, h, T, t0, t1, dst, stream); break;
    case 1: combine<A, Out, 1>(coef, slab, h, T, t0, t1, dst, stream); break;
    default: break;
  }
}

template <typename A>
inline bool all_zero(const A* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (v[i] != A(0)) return false;
  return true;
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
    if (a < b) { lo = std::min(lo, a); hi = std::max(hi, b); }
  }
  *first = lo;
  *last = std::max(lo, hi);
}

template <typename A, typename Out>
void write_row(const A* lt, const A* rt, Out* orow, const KronSumProblem& pb, int64_t grow, bool stream) {
  const int64_t h = pb.h, S = pb.S, T = pb.T;
  const int64_t p = grow / pb.Q, q = grow % pb.Q;
  const A* slab = rt + q * h * T;
  int64_t z0, z1;
  nonzero_columns(slab, h, T, &z0, &z1);

  const int64_t c_end = pb.col0 + pb.cols;
  // Long segments fill the 4 x 4-vector micro-kernel; short ones (feature layout: T = N) are
  // grouped by 8 so that each slab load still feeds 8 FMAs.
  const int group = T >= 4 * Vec<A>::kLanes ? 4 : kGroupMax;
  const A* gcoef[kGroupMax];
  Out* gdst[kGroupMax];
  int g = 0;
  for (int64_t s = pb.col0 / T; s * T < c_end; ++s) {
    const int64_t ta = std::max<int64_t>(0, pb.col0 - s * T), tb = std::min(T, c_end - s * T);
    Out* dst = orow + (s * T + ta - pb.col0);  // local address of column (s, ta)
    const A* coef = lt + (p * S + s) * h;
    const int64_t lo = std::max(ta, z0), hi = std::min(tb, z1);
    if (lo >= hi || all_zero(coef, h)) {
      zero(dst, tb - ta, stream);
      continue;
    }
    zero(dst, lo - ta, stream);
    zero(dst + (hi - ta), tb - hi, stream);
    Out* dlo = dst + (lo - ta);
    if (ta == 0 && tb == T) {  // a whole segment: every grouped one shares [z0, z1)
      gcoef[g] = coef;
      gdst[g] = dlo;
      if (++g == group) {
        combine_group<A, Out>(g, gcoef, slab, h, T, lo, hi, gdst, stream);
        g = 0;
      }
    } else {
      combine_group<A, Out>(1, &coef, slab, h, T, lo, hi, &dlo, stream);
    }
  }
  if (g > 0) combine_group<A, Out>(g, gcoef, slab, h, T, z0, z1, gdst, stream);
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // order this row's non-temporal stores before the thread moves on
#endif
}

template <typename A, typename Out>
void run(const A* lt, const A* rt, Out* out, const KronSumProblem& pb, int num_threads) {
  if (pb.rows <= 0 || pb.cols <= 0) return;
  // Stream past the cache once the tile is well beyond the last-level cache of a core.
  const bool stream = pb.rows * pb.cols * static_cast<int64_t>(sizeof(Out)) > kStreamBytes;
#ifdef _OPENMP
  const int threads = std::max(1, num_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t r = 0; r < pb.rows; ++r) write_row(lt, rt, out + r * pb.cols, pb, pb.row0 + r, stream);
  (void)num_threads;
}

}  // namespace

void kron_sum_f32(const float* lt, const float* rt, void* out, OutType out_type,
                  const KronSumProblem& pb, int num_threads) {
  switch (out_type) {
    case OutType::kFloat32: run(lt, rt, static_cast<float*>(out), pb, num_threads); break;
    case OutType::kFloat16: run(lt, rt, static_cast<FP16*>(out), pb, num_threads); break;
    case OutType::kBFloat16: run(lt, rt, static_cast<BF16*>(out), pb, num_threads); break;
    case OutType::kFloat64: break;  // excluded by the boundary: float64 output uses kron_sum_f64
  }
}

void kron_sum_f64(const double* lt, const double* rt, double* out, const KronSumProblem& pb,
                  int num_threads) {
  run(lt, rt, out, pb, num_threads);
}

}  // namespace duat

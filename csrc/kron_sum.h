// Kronecker-sum materialisation: the one kernel behind W'_HVO on the CPU.
//
// W = sum_i L_i (x) R_i with L_i (P x S) and R_i (Q x T), i < h. Entry
//   W[p*Q + q, s*T + t] = sum_i L[i, p, s] * R[i, q, t].
// Token layout is (L, R) = (A, OV); feature layout is (L, R) = (OV, A).
//
// The kernel writes any rectangle [row0, row0 + rows) x [col0, col0 + cols) of W into a
// C-contiguous (rows x cols) buffer. It trusts its arguments: the pybind11 boundary validates.
#pragma once

#include <cstdint>

namespace duat {

enum class OutType { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct KronSumProblem {
  int64_t h, P, S, Q, T;      // heads and factor shapes
  int64_t row0, col0;          // global offset of the tile in W
  int64_t rows, cols;          // tile extent (the output buffer is rows x cols)
  int64_t l_h, l_p, l_s;       // strides of L (elements): L[i, p, s] = lt[i * l_h + p * l_p + s * l_s]
  int64_t r_h, r_q;            // strides of R: R[i, q, t] = rt[i * r_h + q * r_q + t] (t contiguous)
  bool fresh;                  // the output's pages were never touched (see kron_sum.cpp: RowOrder)
  // Token layout may give R = OV by its factors instead of rt (which is then unused):
  //   R[i, q, t] = sum_k wo[q * ldo + i * d + k] * wv[((i / group) * d + k) * T + t],
  // computed by the kernel for a few q at a time, in cache, with the arithmetic of OvSlabs (so the
  // same bits as W' from that OV), and never written to memory.
  const void* wo = nullptr;
  const void* wv = nullptr;
  int64_t d = 0, group = 1, ldo = 0;
};

// lt: L (h, P, S) and rt: R (h, Q, T), read in place through the strides of the problem.
using KronSumF32 = void (*)(const float* lt, const float* rt, void* out, OutType out_type,
                            const KronSumProblem& pb, int num_threads);
using KronSumF64 = void (*)(const double* lt, const double* rt, double* out, const KronSumProblem& pb,
                            int num_threads);
// The value-output circuits OV_i = Wo_i Wv_{i / group} written as (m_out, heads, m_in), the layout in
// which a token-layout row of W' reads its slab OV[:, q, :] contiguously. wo (m_out, heads * d) with
// row stride ldo and unit column stride; wv (heads / group * d, m_in) C-contiguous.
struct OvProblem {
  int64_t m_out, m_in, heads, group, d, ldo;
};
using OvSlabsF32 = void (*)(const float* wo, const float* wv, float* out, const OvProblem& pb, int num_threads);
using OvSlabsF64 = void (*)(const double* wo, const double* wv, double* out, const OvProblem& pb, int num_threads);
// Best float32 multiply-add rate (GFLOP/s, 2 flops per FMA) of `num_threads` threads running
// `iterations` rounds of independent vector FMA chains with this variant's vectors.
using FmaPeak = double (*)(int64_t iterations, int num_threads);
// Sets `bytes` bytes from dst to the byte `value` with the non-temporal stores a large W' is written
// with (64-bit sizes): the memory-write floor of that store path, for benchmarks.
using StreamFill = void (*)(void* dst, int64_t bytes, int value, int num_threads);

}  // namespace duat

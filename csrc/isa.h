// Runtime ISA dispatch of the CPU kernels (the way ATen's DispatchStub or numpy's CPU dispatch work).
//
// Every source under csrc/kernels/ is compiled once per instruction set through a translation unit
// csrc/isa/<name>.cpp, which defines DUAT_ISA (the namespace of that copy) and is built with that
// ISA's compiler flags (setup.py). Each copy fills one IsaKernels table; dispatch.cpp picks the
// best table the running CPU supports, once, at import (DUAT_CPU_CAPABILITY forces a lower one).
#pragma once

#include <string>
#include <vector>

#include "kron_sum.h"

namespace duat {

// sq[m] = ||C a[:, m]||^2 for one row of A (a_row = a[0, r, 0], head stride plane; c (h, h)); tiny squares
// as negative codes (attention_norms.h), returns whether the row has any.
using GramRow = bool (*)(const float* a_row, int64_t plane, const float* c, int64_t h, int64_t cols, float* sq);

// s[r * lds + (m - m0)] = scale · q_r · k_m, r < rows, m in [m0, m1), for q (rows, d) with row stride ldq
// and kt = kᵀ (d, ldk).
using QkLogits = void (*)(const float* q, int64_t ldq, int64_t rows, int64_t d, const float* kt, int64_t ldk,
                          int64_t m0, int64_t m1, float scale, float* s, int64_t lds);
// In place x = exp(softcap(x) + bias - max) over one row of n logits; returns the sum (0 if all -inf).
using SoftmaxNumerator = float (*)(float* x, int64_t n, const float* bias, float softcap);
// out[m * e + j] += Σ_r p[r * ldp + m] · us[r * e + j] for m < keys, j < e, r < rows.
using PtUAccumulate = void (*)(const float* p, int64_t ldp, int64_t rows, const float* us, int64_t e, float* out,
                               int64_t keys);
// y = exp(x) elementwise with the vectorised exponential of the variant.
using ExpF32 = void (*)(const float* x, int64_t n, float* y);
// GFLOP/s of one thread writing `segments` whole segments of T columns from an h x T slab, reps times,
// all in L1 (csrc/kernels/micro_rate.cpp): the micro-kernels' own rate for one output dtype.
using MicroRate = double (*)(OutType out_type, int64_t h, int64_t T, int segments, int64_t reps);

struct IsaKernels {
  const char* name;
  bool (*cpu_supports)();  // whether the running CPU (and OS) can execute this copy
  KronSumF32 kron_sum_f32;
  KronSumF64 kron_sum_f64;
  OvSlabsF32 ov_slabs_f32;
  OvSlabsF64 ov_slabs_f64;
  FmaPeak fma_peak_gflops;
  StreamFill stream_fill;
  GramRow gram_row_squared_norms;
  QkLogits qk_logits;
  SoftmaxNumerator softmax_numerator;
  ExpF32 exp_f32;
  PtUAccumulate pt_u_accumulate;
  MicroRate micro_kernel_gflops;
};

// The variants compiled into this build, lowest first (each defined by its csrc/isa/<name>.cpp).
const std::vector<const IsaKernels*>& compiled_variants();
// The variant in use; set_capability throws std::invalid_argument for an unknown or unsupported name.
const IsaKernels& active();
void set_capability(const std::string& name);

}  // namespace duat

// Opens the namespace of the copy being compiled: namespace duat::DUAT_ISA.
#define DUAT_ISA_BEGIN namespace duat { namespace DUAT_ISA {
#define DUAT_ISA_END } }

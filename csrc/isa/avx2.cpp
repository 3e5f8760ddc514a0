// The AVX2 + FMA + F16C copy of the CPU kernels: csrc/kernels/* compiled with -mavx2 -mfma -mf16c (see setup.py).
#define DUAT_ISA avx2

#include "../kernels/kron_sum.cpp"
#include "../kernels/fma_peak.cpp"
#include "../kernels/gram_rows.cpp"
#include "../kernels/qk_rows.cpp"

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
}  // namespace

extern const IsaKernels kKernels = {"avx2", &cpu_supports, &kron_sum_f32, &kron_sum_f64, &ov_slabs_f32, &ov_slabs_f64,
                                   &fma_peak_gflops,
                                   &gram_row_squared_norms, &qk_logits, &softmax_numerator,
                                   &exp_f32, &pt_u_accumulate};
}  // namespace DUAT_ISA
}  // namespace duat

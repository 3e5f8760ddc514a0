// The baseline (SSE2 on x86-64, NEON on aarch64) copy of the CPU kernels: csrc/kernels/* compiled with no ISA flags (see setup.py).
#define DUAT_ISA baseline

#include "../kernels/kron_sum.cpp"
#include "../kernels/fma_peak.cpp"
#include "../kernels/gram_rows.cpp"
#include "../kernels/qk_rows.cpp"

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  return true;  // the architecture's baseline
}
}  // namespace

extern const IsaKernels kKernels = {"baseline", &cpu_supports, &kron_sum_f32, &kron_sum_f64, &ov_slabs_f32, &ov_slabs_f64,
                                   &fma_peak_gflops,
                                   &gram_row_squared_norms, &qk_logits, &softmax_numerator,
                                   &exp_f32, &pt_u_accumulate};
}  // namespace DUAT_ISA
}  // namespace duat

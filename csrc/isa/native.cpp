// The -march=native (DUAT_NATIVE=1 builds only) copy of the CPU kernels: csrc/kernels/* compiled with -march=native (see setup.py).
#define DUAT_ISA native

#include "../kernels/kron_sum.cpp"
#include "../kernels/fma_peak.cpp"
#include "../kernels/gram_rows.cpp"
#include "../kernels/qk_rows.cpp"

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  // Built for the build machine's CPU: require the vector features the compiler targeted.
  bool ok = true;
#if defined(__x86_64__)
#if defined(__AVX512F__)
  ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
#if defined(__AVX2__)
  ok = ok && __builtin_cpu_supports("avx2");
#endif
#if defined(__FMA__)
  ok = ok && __builtin_cpu_supports("fma");
#endif
#if defined(__F16C__)
  ok = ok && __builtin_cpu_supports("f16c");
#endif
#endif
  return ok;
}
}  // namespace

extern const IsaKernels kKernels = {"native", &cpu_supports, &kron_sum_f32, &kron_sum_f64, &ov_slabs_f32, &ov_slabs_f64,
                                   &fma_peak_gflops,
                                   &gram_row_squared_norms, &qk_logits, &softmax_numerator,
                                   &exp_f32, &pt_u_accumulate};
}  // namespace DUAT_ISA
}  // namespace duat

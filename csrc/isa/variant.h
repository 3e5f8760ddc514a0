// The part every csrc/isa/<name>.cpp shares: the kernels of csrc/kernels/ compiled into namespace
// duat::DUAT_ISA, and the table of them that dispatch.cpp chooses from. The including translation
// unit defines DUAT_ISA (the variant's name) and, in duat::DUAT_ISA, bool cpu_supports() before
// including this file; setup.py compiles it with the variant's flags.
#pragma once

#include "../kernels/kron_sum.cpp"
#include "../kernels/fma_peak.cpp"
#include "../kernels/gram_rows.cpp"
#include "../kernels/qk_rows.cpp"
#include "../kernels/micro_rate.cpp"

#define DUAT_ISA_NAME_(x) #x
#define DUAT_ISA_NAME(x) DUAT_ISA_NAME_(x)

namespace duat {
namespace DUAT_ISA {
extern const IsaKernels kKernels = {DUAT_ISA_NAME(DUAT_ISA), &cpu_supports, &kron_sum_f32, &kron_sum_f64,
                                    &ov_slabs_f32, &ov_slabs_f64, &fma_peak_gflops, &stream_fill,
                                    &gram_row_squared_norms,
                                    &qk_logits, &softmax_numerator, &exp_f32, &pt_u_accumulate,
                                    &micro_kernel_gflops};
}  // namespace DUAT_ISA
}  // namespace duat

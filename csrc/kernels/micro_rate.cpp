// Rate of the Kronecker-sum micro-kernels alone, with every operand in L1: what the arithmetic and
// the store conversion of one output dtype cost on this ISA variant, apart from memory and threads.
// One thread writes `segments` whole segments of T columns from one h x T slab, `reps` times, through
// whole_segments (the path of a whole W' row, kron_sum.cpp) with regular stores into a buffer that
// stays in L1. bfloat16 takes the store type a finite W' takes (BF16Normal with the conversion
// instruction, BF16Split on AVX2, BF16Finite otherwise), float16 the F16C/AVX-512 conversion.
// Compared with fma_peak_gflops(iterations, 1) it says how close the micro-kernel runs to the FMA
// pipes' limit, and how much the rounding of a 16-bit dtype costs there.
#include <cmath>

DUAT_ISA_BEGIN
namespace {

template <typename Out>
double micro_rate(int64_t h, int64_t T, int segments, int64_t reps) {
  AlignedBuffer<float> slab, coefs;
  AlignedBuffer<Out> out;
  slab.resize(h * T);
  coefs.resize(segments * h);
  out.resize(segments * T);
  // Values like softmax probabilities times OV entries: finite, normal, of mixed sign.
  for (int64_t i = 0; i < h * T; ++i) slab[i] = std::sin(0.37f * static_cast<float>(i)) + 0.01f;
  for (int64_t i = 0; i < segments * h; ++i) coefs[i] = 0.5f + 0.25f * std::cos(0.71f * static_cast<float>(i));
  whole_segments(coefs.data(), slab.data(), out.data(), h, T, segments, false, false);  // warm the caches
  const double start = thread_seconds();
  for (int64_t r = 0; r < reps; ++r) {
    whole_segments(coefs.data(), slab.data(), out.data(), h, T, segments, false, false);
    asm volatile("" : : "r"(out.data()) : "memory");  // every rep's stores happen
  }
  const double seconds = thread_seconds() - start;
  return 2.0 * static_cast<double>(h) * T * segments * static_cast<double>(reps) / seconds / 1e9;
}

}  // namespace

// Declared in isa.h as MicroRate.
double micro_kernel_gflops(OutType out_type, int64_t h, int64_t T, int segments, int64_t reps) {
  switch (out_type) {
    case OutType::kFloat32: return micro_rate<float>(h, T, segments, reps);
    case OutType::kFloat16: return micro_rate<FP16>(h, T, segments, reps);
    case OutType::kBFloat16:
      if constexpr (kBf16Convert) return micro_rate<BF16Normal>(h, T, segments, reps);
      else if constexpr (kSplitBf16) return micro_rate<BF16Split>(h, T, segments, reps);
      else return micro_rate<BF16Finite>(h, T, segments, reps);
    case OutType::kFloat64: break;  // excluded by the boundary
  }
  return 0.0;
}

DUAT_ISA_END

// FMA-throughput probe: the arithmetic floor of the Kronecker-sum kernel for this ISA variant.
// Independent multiply-add chains on this variant's vectors (the kernel's own `madd`: fused where
// the ISA fuses) keep every FMA pipe busy with no memory traffic. The chains fill the accumulator
// budget of the kernel's micro-kernel (more than latency x pipes, so no chain waits on itself).
// Each thread times itself in CPU time (CLOCK_THREAD_CPUTIME_ID where available), so a machine
// shared with other processes reports the rate of its cores, not the share it happened to get.
#include <chrono>
#include <ctime>

#include "simd.h"

DUAT_ISA_BEGIN
namespace {

double thread_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return ts.tv_sec + 1e-9 * ts.tv_nsec;
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

// Declared in isa.h as FmaPeak.
double fma_peak_gflops(int64_t iterations, int num_threads) {
  using V = Vec<float>::type;
  constexpr int kLanes = Vec<float>::kLanes;
  constexpr int kChains = kAccumulators;
  const int threads = num_threads < 1 ? 1 : num_threads;
  float sink = 0;
  double seconds = 0;  // the slowest thread's own time
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : sink) reduction(max : seconds)
#endif
  {
    const double start = thread_seconds();
    V acc[kChains];
    const V a = V{} + 0.999999f, b = V{} + 1e-7f;
    for (int j = 0; j < kChains; ++j) acc[j] = V{} + static_cast<float>(j);
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 24
      for (int j = 0; j < kChains; ++j) acc[j] = madd(acc[j], a, b);
    }
    for (int j = 0; j < kChains; ++j)
      for (int l = 0; l < kLanes; ++l) sink += acc[j][l];
    seconds = thread_seconds() - start;
  }
#ifdef _OPENMP
  const int used = threads;
#else
  const int used = 1;
#endif
  const double flops = 2.0 * kLanes * kChains * static_cast<double>(iterations) * used;
  return sink == -1.0f ? 0.0 : flops / seconds / 1e9;  // `sink` is used so the chains are computed
}

DUAT_ISA_END

// FMA-throughput probe: the arithmetic floor of the Kronecker-sum kernel on this machine.
// Independent multiply-add chains on full vectors (the same vector type as the kernel) keep every
// FMA pipe busy with no memory traffic; the result is the best flop rate the kernel could reach.
#include "fma_peak.h"

#include <algorithm>
#include <chrono>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace duat {

double fma_peak_gflops(int64_t iterations, int num_threads) {
  typedef float V __attribute__((vector_size(64)));
  constexpr int kChains = 12;  // > FMA latency x pipes, so that no chain waits on itself
  const int threads = std::max(1, num_threads);
  float sink = 0;
  const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : sink)
#endif
  {
    V acc[kChains];
    const V a = V{} + 0.999999f, b = V{} + 1e-7f;
    for (int j = 0; j < kChains; ++j) acc[j] = V{} + static_cast<float>(j);
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
      for (int j = 0; j < kChains; ++j) acc[j] = acc[j] * a + b;  // no reassociation: runs as written
    }
    for (int j = 0; j < kChains; ++j)
      for (int l = 0; l < 16; ++l) sink += acc[j][l];
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
#ifdef _OPENMP
  const int used = threads;
#else
  const int used = 1;
#endif
  const double flops = 2.0 * 16 * kChains * static_cast<double>(iterations) * used;
  return sink == -1.0f ? 0.0 : flops / seconds / 1e9;  // `sink` is used so the chains are computed
}

}  // namespace duat

#pragma once

#include <cstdint>

namespace duat {

// Best float32 multiply-add rate (GFLOP/s, 2 flops per FMA) of `num_threads` threads running
// `iterations` rounds of independent vector FMA chains.
double fma_peak_gflops(int64_t iterations, int num_threads);

}  // namespace duat

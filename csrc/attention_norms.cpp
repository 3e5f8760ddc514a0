// Gram-weighted squared norms over rows of A (see attention_norms.h): the threading and the grid
// reduction; the per-row pass is the ISA-dispatched csrc/kernels/gram_rows.cpp.
#include "attention_norms.h"

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace duat {
namespace {

// The per-row pass of the active ISA variant (csrc/kernels/gram_rows.cpp).
bool row_squared_norms(const float* a_row, int64_t plane, const float* c, int64_t h, int64_t cols, float* sq) {
  return active().gram_row_squared_norms(a_row, plane, c, h, cols, sq);
}

int thread_count(int requested) { return std::max(1, requested); }

}  // namespace

void decode_roots(const float* sq, int64_t cols, float* norms) {
  for (int64_t m = 0; m < cols; ++m) norms[m] = sq[m] < 0.0f ? tiny_norm(sq[m]) : std::sqrt(sq[m]);
}

void add_tiny_to_bins(float* sq, const int64_t* bin, int64_t cols, double* acc) {
  for (int64_t m = 0; m < cols; ++m)
    if (sq[m] < 0.0f) {
      acc[bin[m]] += tiny_square(sq[m]);
      sq[m] = 0.0f;
    }
}

void add_to_bins(const float* sq, const int64_t* bin, int64_t cols, double* acc) {
  for (int64_t m = 0; m < cols;) {
    const int64_t b = bin[m];
    int64_t e = m + 1;
    while (e < cols && bin[e] == b) ++e;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t k = m;
    for (; k + 4 <= e; k += 4)
      for (int j = 0; j < 4; ++j) s[j] += sq[k + j];
    for (; k < e; ++k) s[0] += sq[k];
    acc[b] += (s[0] + s[1]) + (s[2] + s[3]);
    m = e;
  }
}

void gram_squared_norms(const float* a, const float* c, float* out, const GramNormsProblem& pb, int num_threads,
                        bool root) {
  const int64_t plane = pb.rows * pb.cols;
#pragma omp parallel for schedule(dynamic, 4) num_threads(thread_count(num_threads))
  for (int64_t r = 0; r < pb.rows; ++r) {
    float* row = out + r * pb.cols;
    const bool tiny = row_squared_norms(a + r * pb.cols, plane, c, pb.h, pb.cols, row);
    if (root && tiny)
      decode_roots(row, pb.cols, row);
    else if (root)
      for (int64_t m = 0; m < pb.cols; ++m) row[m] = std::sqrt(row[m]);  // vectorised (-fno-math-errno); NaN stays
    else if (tiny)  // float32 squares: a tiny one as the nearest float32 (roots taken in Python)
      for (int64_t m = 0; m < pb.cols; ++m) row[m] = decoded_square(row[m]);
  }
}

void gram_grid_norms(const float* a, const float* c, const int64_t* row_bin, const int64_t* col_bin, double* out,
                     int64_t out_rows, int64_t out_cols, const GramNormsProblem& pb, int num_threads) {
  (void)out_rows;
  const int64_t plane = pb.rows * pb.cols;
  const int threads = static_cast<int>(std::min<int64_t>(thread_count(num_threads), std::max<int64_t>(1, pb.rows)));
#pragma omp parallel num_threads(threads)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    // Each thread takes a contiguous range of rows and sums into its own copy of the bins it touches.
    const int64_t r_begin = pb.rows * t / nt, r_end = pb.rows * (t + 1) / nt;
    if (r_begin < r_end) {
      int64_t b_lo = row_bin[r_begin], b_hi = row_bin[r_begin];
      for (int64_t r = r_begin; r < r_end; ++r) {
        b_lo = std::min(b_lo, row_bin[r]);
        b_hi = std::max(b_hi, row_bin[r]);
      }
      std::vector<double> local(static_cast<size_t>((b_hi - b_lo + 1) * out_cols), 0.0);
      std::vector<float> sq(static_cast<size_t>(pb.cols));
      for (int64_t r = r_begin; r < r_end; ++r) {
        if (row_squared_norms(a + r * pb.cols, plane, c, pb.h, pb.cols, sq.data()))
          add_tiny_to_bins(sq.data(), col_bin, pb.cols, local.data() + (row_bin[r] - b_lo) * out_cols);
        add_to_bins(sq.data(), col_bin, pb.cols, local.data() + (row_bin[r] - b_lo) * out_cols);
      }
#pragma omp critical(duat_gram_grid_norms)
      for (int64_t b = b_lo; b <= b_hi; ++b)
        for (int64_t k = 0; k < out_cols; ++k) out[b * out_cols + k] += local[(b - b_lo) * out_cols + k];
    }
  }
}

}  // namespace duat

// Gram-weighted squared norms over rows of A (see attention_norms.h).
//
// Roofline. Each column m costs h loads of A and h^2 FMAs (y = C alpha) plus h FMAs (||y||^2): for
// h = 12 the FMAs dominate unless A streams from DRAM faster than ~12 FMAs per float.
// Micro-kernel: kCols columns at once (kVecs vectors of kLanes floats); for each output row j of C,
// the kVecs accumulators of y_j take one broadcast C[j, i] and kVecs loads of alpha_i per head i,
// and ||y||^2 is kept in kVecs more registers (9 live vectors: fits every ISA's register file).
// Column groups whose h coefficients are all zero (the upper triangle of causal attention) cost h
// loads only. Plain GCC/Clang vector extensions, no intrinsics; a scalar loop does the ragged tail.
#include "attention_norms.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace duat {
namespace {

constexpr int kLanes = 8;
constexpr int kVecs = 4;
constexpr int64_t kCols = kLanes * kVecs;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

// sq[m] = ||C a[:, m]||^2 for one row: a_row points at a[0, r, 0], head stride `plane`.
void row_squared_norms(const float* a_row, int64_t plane, const float* c, int64_t h, int64_t cols, float* sq) {
  int64_t m = 0;
  for (; m + kCols <= cols; m += kCols) {
    VecI nonzero = {};
    for (int64_t i = 0; i < h; ++i)
      for (int v = 0; v < kVecs; ++v) nonzero |= (load(a_row + i * plane + m + v * kLanes) != 0);
    bool any = false;
    for (int l = 0; l < kLanes; ++l) any |= nonzero[l] != 0;
    if (!any) {
      std::fill(sq + m, sq + m + kCols, 0.0f);
      continue;
    }
    VecF norm[kVecs] = {};
    for (int64_t j = 0; j < h; ++j) {
      VecF y[kVecs] = {};
      const float* cj = c + j * h;
      for (int64_t i = 0; i < h; ++i) {
        const VecF cji = VecF{} + cj[i];
        const float* ai = a_row + i * plane + m;
        for (int v = 0; v < kVecs; ++v) y[v] += cji * load(ai + v * kLanes);
      }
      for (int v = 0; v < kVecs; ++v) norm[v] += y[v] * y[v];
    }
    for (int v = 0; v < kVecs; ++v) store(sq + m + v * kLanes, norm[v]);
  }
  for (; m < cols; ++m) {
    float norm = 0.0f;
    for (int64_t j = 0; j < h; ++j) {
      float y = 0.0f;
      for (int64_t i = 0; i < h; ++i) y += c[j * h + i] * a_row[i * plane + m];
      norm += y * y;
    }
    sq[m] = norm;
  }
}

int thread_count(int requested) { return std::max(1, requested); }

}  // namespace

void gram_squared_norms(const float* a, const float* c, float* out, const GramNormsProblem& pb, int num_threads) {
  const int64_t plane = pb.rows * pb.cols;
#pragma omp parallel for schedule(dynamic, 4) num_threads(thread_count(num_threads))
  for (int64_t r = 0; r < pb.rows; ++r) row_squared_norms(a + r * pb.cols, plane, c, pb.h, pb.cols, out + r * pb.cols);
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
        row_squared_norms(a + r * pb.cols, plane, c, pb.h, pb.cols, sq.data());
        double* acc = local.data() + (row_bin[r] - b_lo) * out_cols;
        for (int64_t m = 0; m < pb.cols; ++m) acc[col_bin[m]] += sq[m];
      }
#pragma omp critical(duat_gram_grid_norms)
      for (int64_t b = b_lo; b <= b_hi; ++b)
        for (int64_t k = 0; k < out_cols; ++k) out[b * out_cols + k] += local[(b - b_lo) * out_cols + k];
    }
  }
}

}  // namespace duat

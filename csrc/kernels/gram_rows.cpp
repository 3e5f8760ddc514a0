// The hot loop of the Gram-weighted block norms (csrc/attention_norms.cpp), compiled per ISA.
//
// Roofline. Each column m costs h loads of A and h^2 multiply-adds (y = C alpha; h(h+1)/2 for an upper-
// triangular C) plus h (||y||^2):
// for h = 12 the arithmetic dominates unless A streams from DRAM faster than ~12 flops per float.
// Micro-kernel: kVecs vectors of columns at once; for each output row j of C, the kVecs
// accumulators of y_j take one broadcast C[j, i] and kVecs loads of alpha_i per head i, and ||y||^2
// is kept in kVecs more registers (9 live vectors: fits every ISA's register file). Column groups
// whose h coefficients are all zero (the upper triangle of causal attention) cost h loads only.
#include <cstring>

#include "attention_norms.h"
#include "simd.h"

DUAT_ISA_BEGIN
namespace {

constexpr int kVecs = 4;

inline VF load_vf(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ||C α||² of column m in float64, where the float32 squares lost bits (below kTinySquare), written as
// -(||C α||² · kTinyScale) (attention_norms.h): float64 products of floats are exact, and the scaled
// square fits float32 (< 2^-100 · 2^224 = 2^124).
float tiny_square_code(const float* a_col, int64_t plane, const float* c, int64_t h, bool upper) {
  bool nonzero = false;  // an all-zero α keeps its square, 0
  for (int64_t i = 0; i < h; ++i) nonzero |= a_col[i * plane] != 0.0f;
  if (!nonzero) return 0.0f;
  double norm = 0.0;
  for (int64_t j = 0; j < h; ++j) {
    double y = 0.0;
    for (int64_t i = upper ? j : 0; i < h; ++i) y += static_cast<double>(c[j * h + i]) * a_col[i * plane];
    norm += y * y;
  }
  return norm > 0.0 ? static_cast<float>(-(norm * kTinyScale)) : 0.0f;  // no -0 (a code)
}

}  // namespace

// sq[m] = ||C a[:, m]||^2 for one row of A: a_row points at a[0, r, 0], head stride `plane`. A column with
// nonzero α whose float32 square fell below kTinySquare (α entries ~1e-19 and less: the squares of y lose
// bits, below ~1e-25 they vanish) is recomputed in float64 and written as a negative code
// (attention_norms.h); returns whether the row has any.
bool gram_row_squared_norms(const float* a_row, int64_t plane, const float* c, int64_t h, int64_t cols, float* sq) {
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
  constexpr int64_t kLanes = Vec<float>::kLanes, kCols = kLanes * kVecs;
  // An upper-triangular C (what linalg.gram_factor gives) needs only the products i >= j: h(h+1)/2
  // multiply-adds per column instead of h². Every α_i still meets row 0, so NaN and Inf in α still make
  // ||C α||² non-finite (an Inf may give Inf where the skipped 0 · Inf would give NaN; block_norms
  // recomputes every non-finite result exactly).
  bool upper = true;
  for (int64_t j = 1; j < h; ++j)
    for (int64_t i = 0; i < j; ++i) upper &= c[j * h + i] == 0.0f;
  VI tiny = {};  // lanes of a column group with nonzero α and a square below kTinySquare
  int64_t m = 0;
  for (; m + kCols <= cols; m += kCols) {
    VI nonzero[kVecs] = {};
    for (int64_t i = 0; i < h; ++i)
      for (int v = 0; v < kVecs; ++v) nonzero[v] |= (load_vf(a_row + i * plane + m + v * kLanes) != 0);
    VI nonzero_all = nonzero[0];
    for (int v = 1; v < kVecs; ++v) nonzero_all |= nonzero[v];
    bool any = false;
    for (int l = 0; l < kLanes; ++l) any |= nonzero_all[l] != 0;
    if (!any) {
      for (int64_t k = 0; k < kCols; ++k) sq[m + k] = 0.0f;
      continue;
    }
    VF norm[kVecs] = {};
    for (int64_t j = 0; j < h; ++j) {
      VF y[kVecs] = {};
      const float* cj = c + j * h;
      for (int64_t i = upper ? j : 0; i < h; ++i) {
        const VF cji = splat(cj + i);
        const float* ai = a_row + i * plane + m;
        for (int v = 0; v < kVecs; ++v) y[v] = madd(cji, load_vf(ai + v * kLanes), y[v]);
      }
      for (int v = 0; v < kVecs; ++v) norm[v] = madd(y[v], y[v], norm[v]);
    }
    for (int v = 0; v < kVecs; ++v) std::memcpy(sq + m + v * kLanes, &norm[v], sizeof(VF));
    for (int v = 0; v < kVecs; ++v) tiny |= (norm[v] < kTinySquare) & nonzero[v];
  }
  bool tiny_any = false;
  for (int l = 0; l < kLanes; ++l) tiny_any |= tiny[l] != 0;
  if (tiny_any)  // rare: α entries below ~2^-50 / max|C| (the lanes are reduced once per row)
    for (int64_t k = 0; k < m; ++k)
      if (sq[k] < kTinySquare) sq[k] = tiny_square_code(a_row + k, plane, c, h, upper);
  for (; m < cols; ++m) {
    float norm = 0.0f;
    for (int64_t j = 0; j < h; ++j) {
      float y = 0.0f;
      for (int64_t i = upper ? j : 0; i < h; ++i) y = madd(c[j * h + i], a_row[i * plane + m], y);
      norm = madd(y, y, norm);
    }
    if (norm < kTinySquare) {
      norm = tiny_square_code(a_row + m, plane, c, h, upper);
      tiny_any |= norm < 0.0f;
    }
    sq[m] = norm;
  }
  return tiny_any;
}

DUAT_ISA_END

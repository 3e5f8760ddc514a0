// Gram-weighted squared block norms of W' read straight from rows of the attention probabilities.
//
// For one row n of A (h heads) and every column m, alpha = A[:, n, m] (h,) and the squared
// Frobenius norm of the block B_nm = sum_i alpha_i OV_i is ||C alpha||^2, C (h x h) the Gram factor
// (C^T C = G, G_ij = <OV_i, OV_j>_F). One pass over A; nothing of size rows x cols is written in the
// grid variant, which sums the squared norms into super-blocks (row_bin[r], col_bin[m]).
#pragma once

#include <cmath>
#include <cstdint>

namespace duat {

// Squared norms below kTinySquare (with nonzero α) are recomputed in float64 by the row pass and written as
// the code -(||C α||² · kTinyScale), which float32 holds where the square itself underflows (below 2^-149:
// α entries ~1e-25 gave norms of 0). Ordinary columns keep their float32 square: a code is always < 0.
constexpr float kTinySquare = 0x1p-100f;
constexpr double kTinyScale = 0x1p224, kTinyUnscale = 0x1p-224, kTinyRootUnscale = 0x1p-112;

// The squared norm a code stands for, in float64.
inline double tiny_square(float code) { return -static_cast<double>(code) * kTinyUnscale; }
// The norm a code stands for, in float32 (exact roots: 2^224 is an even power of two).
inline float tiny_norm(float code) { return static_cast<float>(std::sqrt(-static_cast<double>(code)) * kTinyRootUnscale); }
// sq itself where it is no code (a square, or NaN), else the nearest float32 of the square its code stands for.
inline float decoded_square(float sq) { return sq < 0.0f ? static_cast<float>(tiny_square(sq)) : sq; }

// Where sq[m] is a code: norms[m] = its norm, else sqrt(sq[m]) (sq and norms may alias).
void decode_roots(const float* sq, int64_t cols, float* norms);
// Where sq[m] is a code: acc[bin[m]] += its square and sq[m] = 0 (then add_to_bins adds the rest).
void add_tiny_to_bins(float* sq, const int64_t* bin, int64_t cols, double* acc);

struct GramNormsProblem {
  int64_t h;     // heads
  int64_t rows;  // rows of A in this call
  int64_t cols;  // columns of A in this call
};

// a: (h, rows, cols) float32, C-contiguous; c: (h, h) float32 row-major; out: (rows, cols) float32,
// out[r, m] = ||C a[:, r, m]||^2, or its square root with root (taken per row while the row is in cache).
void gram_squared_norms(const float* a, const float* c, float* out, const GramNormsProblem& pb, int num_threads,
                        bool root = false);

// acc[bin[m]] += sq[m] for m < cols, a run of equal bins at a time with four partial sums (adding each
// entry into acc[bin] directly made every add wait for the one before: the grid passes' reduction).
void add_to_bins(const float* sq, const int64_t* bin, int64_t cols, double* acc);

// As above, but out (out_rows, out_cols) float64 accumulates out[row_bin[r], col_bin[m]] += ||C a[:, r, m]||^2;
// every bin index must lie in range (checked by the caller).
void gram_grid_norms(const float* a, const float* c, const int64_t* row_bin, const int64_t* col_bin, double* out,
                     int64_t out_rows, int64_t out_cols, const GramNormsProblem& pb, int num_threads);

}  // namespace duat

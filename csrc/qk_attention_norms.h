// Gram-weighted squared block norms of W' (and Aᵀ U for rmatvec) straight from queries and keys: A is
// never written.
//
// For a block of query rows the pass forms the logits scale·q kᵀ (soft-capped, masked), the softmax
// numerators exp(s - max) in a per-thread buffer (h, rows, keys), and for every row n and key m
// ||C' e[:, n, m]||² with C' = C diag(1 / Σ_m e_i[n, m]), i.e. ||C α||² with α = A[:, n, m]; the row's
// squared norms go to the (N, N) output or are summed into (R, C) super-blocks in float64.
// Memory: threads x h x rows-per-block x N floats (<= 64 MiB per thread) plus kᵀ of one batch.
//
// Masks, as QKAttention (duat_kernels/attention_source.py): key m is attended by query n when
// (not causal or m <= n) and (no window or (n - m < window and (causal or m - n < window))) and
// key_mask[b, m] != 0; a row that attends no key is a zero row of A.
#pragma once

#include <cstdint>

namespace duat {

struct QkNormsProblem {
  int64_t batch, h, h_kv, n, d;  // q (batch, h, n, d), k (batch, h_kv, n_k, d); head i reads key head i / (h / h_kv)
  float scale;                   // logits scale · q·k
  float softcap;                 // > 0: logits softcap · tanh(logits / softcap); 0: none
  bool causal;
  int64_t window;                // > 0: sliding window; 0: none
  int64_t n_k;                   // keys of k (batch, h_kv, n_k, d): n for self-attention; n_k != n (cross-attention)
                                 // only without causal mask and window
};

// out (batch, n, n) float32: out[b, n, m] = ||C A[b, :, n, m]||². q, k, c (h, h) float32 C-contiguous;
// key_mask (batch, n) bytes (0 = masked) or null. The caller validates every argument. A square that float32
// cannot hold (tiny α: attention_norms.h) is written as the negative of its norm with tiny_roots, else as its
// nearest float32; returns whether there is any.
bool qk_gram_squared_norms(const float* q, const float* k, const uint8_t* key_mask, const float* c, float* out,
                           const QkNormsProblem& pb, int num_threads, bool tiny_roots = false);

// out (batch, out_rows, out_cols) float64 accumulates out[b, row_bin[n], col_bin[m]] += ||C A[b, :, n, m]||²;
// every bin index must lie in range.
void qk_gram_grid_norms(const float* q, const float* k, const uint8_t* key_mask, const float* c, const int64_t* row_bin,
                        const int64_t* col_bin, double* out, int64_t out_rows, int64_t out_cols, const QkNormsProblem& pb,
                        int num_threads);

// out (batch, h, n, e) = A_iᵀ u_i per head for u (batch, h, n, e) float32 C-contiguous (what rmatvec needs):
// per head and row block, the logits and softmax numerators as above, then out[keys] += Pᵀ (u rows / Σ).
void qk_mix_transposed(const float* q, const float* k, const uint8_t* key_mask, const float* u, float* out, int64_t e,
                       const QkNormsProblem& pb, int num_threads);

// out (batch, h, n, e) = A_i v_{i / (h / h_kv)} for values (batch, h_kv, n, e) float32 C-contiguous (matvec
// where torch's sdpa cannot compute A, i.e. with a soft-cap): per head and row block, P V a key tile at a time.
void qk_mix(const float* q, const float* k, const uint8_t* key_mask, const float* values, float* out, int64_t e,
            const QkNormsProblem& pb, int num_threads);

}  // namespace duat

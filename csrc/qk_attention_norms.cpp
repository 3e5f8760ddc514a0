// The threaded drivers of the fused q/k passes (see qk_attention_norms.h): block norms and Aᵀ U. The
// per-ISA pieces are csrc/kernels/qk_rows.cpp (logits and Pᵀ U micro-kernels, softmax numerators) and
// gram_rows.cpp (||C α||²).
//
// One pass, one row block per task: logits of the block for every head go into the thread's buffer
// (h, rows, keys), a key tile (kKeyTile keys x d of kᵀ, 32 KiB at d = 64) at a time so that the tile
// stays in L1 across the block's row groups; then per row, per head, the softmax numerators in place
// (the row, at most 4·N bytes, stays in L2), and the Gram pass with the normalisation folded into C.
// Causal blocks are taken largest first (dynamic schedule) so the threads finish together.
#include "qk_attention_norms.h"

#include "attention_norms.h"
#include "isa.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace duat {
namespace {

constexpr int64_t kKeyTile = 128;               // keys per logits tile
constexpr int64_t kGroupRows = 6;               // query rows per micro-kernel call (kRows of every ISA)
constexpr int64_t kBufferBytes = int64_t(64) << 20;  // per-thread logits buffer budget
constexpr int64_t kMaxBlockRows = 192;
constexpr int64_t kPad = 64;  // key columns of kᵀ and of the buffer past the end: whole vectors everywhere

int64_t key_lo(const QkNormsProblem& pb, int64_t n) { return pb.window > 0 ? std::max<int64_t>(0, n - pb.window + 1) : 0; }
int64_t key_hi(const QkNormsProblem& pb, int64_t n) {
  if (pb.causal) return n + 1;
  return pb.window > 0 ? std::min(pb.n, n + pb.window) : pb.n_k;
}

int64_t block_rows(const QkNormsProblem& pb) {
  const int64_t per_row = 4 * pb.h * std::max<int64_t>(1, pb.n_k);
  return std::max<int64_t>(1, std::min(kMaxBlockRows, kBufferBytes / per_row));
}

// Rows per block when one head's logits are in the buffer at a time (the mix drivers).
int64_t head_block_rows(const QkNormsProblem& pb) {
  return std::max<int64_t>(1, std::min(kMaxBlockRows, kBufferBytes / (4 * std::max<int64_t>(1, pb.n_k))));
}

// kt (h_kv, d, n_k + kPad) = k[b] transposed per key head (zero padding): one key per lane in the logits
// micro-kernel.
void transpose_keys(const float* k, const QkNormsProblem& pb, int64_t b, float* kt, int threads) {
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (pb.n_k + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t job = 0; job < pb.h_kv * chunks; ++job) {
    const int64_t kv = job / chunks, m0 = (job % chunks) * kChunk, m1 = std::min(pb.n_k, m0 + kChunk);
    const float* src = k + (b * pb.h_kv + kv) * pb.n_k * pb.d;
    float* dst = kt + kv * pb.d * (pb.n_k + kPad);
    for (int64_t t = 0; t < pb.d; ++t)
      for (int64_t m = m0; m < m1; ++m) dst[t * (pb.n_k + kPad) + m] = src[m * pb.d + t];
  }
}

// The keys of batch element b as the drivers read them: kᵀ per key head (transpose_keys) and the
// additive key-mask bias (0 or -inf per key; empty without a mask).
struct Keys {
  std::vector<float> kt, bias;
  Keys(const QkNormsProblem& pb, bool masked)
      : kt(static_cast<size_t>(pb.h_kv * pb.d * (pb.n_k + kPad)), 0.0f), bias(masked ? static_cast<size_t>(pb.n_k) : 0) {}
  void load(const float* k, const uint8_t* key_mask, const QkNormsProblem& pb, int64_t b, int threads) {
    transpose_keys(k, pb, b, kt.data(), threads);
    for (int64_t m = 0; key_mask && m < pb.n_k; ++m) bias[m] = key_mask[b * pb.n_k + m] ? 0.0f : -INFINITY;
  }
  const float* mask_bias() const { return bias.empty() ? nullptr : bias.data(); }
  const float* head(const QkNormsProblem& pb, int64_t i) const {  // kᵀ of query head i's key head
    return kt.data() + (i / (pb.h / pb.h_kv)) * pb.d * (pb.n_k + kPad);
  }
};

// Logits of one head for rows [r0, r1) into si (rows, width), columns from key cb0 = key_lo(r0); only the
// keys each row group attends are computed (rounded up to whole vector blocks, into the slack).
void head_logits(const float* qi, const float* kti, const QkNormsProblem& pb, int64_t r0, int64_t r1, int64_t width,
                 float* si) {
  const IsaKernels& isa = active();
  const int64_t rows = r1 - r0, cb0 = key_lo(pb, r0), cb1 = key_hi(pb, r1 - 1), ldk = pb.n_k + kPad;
  for (int64_t t0 = cb0; t0 < cb1; t0 += kKeyTile) {
    const int64_t t1 = std::min(cb1, t0 + kKeyTile);
    for (int64_t g0 = 0; g0 < rows; g0 += kGroupRows) {
      const int64_t g1 = std::min(rows, g0 + kGroupRows);
      const int64_t lo = std::max(t0, key_lo(pb, r0 + g0)), hi = std::min(t1, key_hi(pb, r0 + g1 - 1));
      if (lo >= hi) continue;
      // Rounded up to whole vector blocks: the extra keys (padding or keys the rows do not attend)
      // land in the buffer's slack and are never read.
      const int64_t hi_round = lo + (hi - lo + kPad - 1) / kPad * kPad;
      isa.qk_logits(qi + g0 * pb.d, pb.d, g1 - g0, pb.d, kti, ldk, lo, hi_round, pb.scale, si + g0 * width + (lo - cb0),
                    width);
    }
  }
}

// Rows [r0, r1) of head i of batch b as probabilities without their normalisation: buf (rows, width)
// holds exp(s - max) over each row's keys and zeros elsewhere, w[r] = 1 / Σ (0 for a row without
// keys, whose buffer row is all zeros: a zero row of A). Columns start at key cb0 = key_lo(r0).
void head_numerators(const float* q, const Keys& keys, const QkNormsProblem& pb, int64_t b, int64_t i, int64_t r0,
                     int64_t r1, int64_t width, float* buf, float* w) {
  const IsaKernels& isa = active();
  const int64_t cb0 = key_lo(pb, r0), cb1 = key_hi(pb, r1 - 1);
  head_logits(q + ((b * pb.h + i) * pb.n + r0) * pb.d, keys.head(pb, i), pb, r0, r1, width, buf);
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const int64_t n = r0 + r, lo = key_lo(pb, n), hi = key_hi(pb, n);
    float* row = buf + r * width;
    const float* bias = keys.mask_bias();
    const float sum = isa.softmax_numerator(row + (lo - cb0), hi - lo, bias ? bias + lo : nullptr, pb.softcap);
    w[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    std::fill(row, row + (lo - cb0), 0.0f);  // keys the row does not attend: A = 0
    std::fill(row + (hi - cb0), row + (cb1 - cb0), 0.0f);
    if (!(sum > 0.0f)) std::fill(row, row + (cb1 - cb0), 0.0f);
  }
}

// Rows [r0, r1) of batch b: the squared norms of each row go to sink.row(n, sq, lo, hi, tiny) (sq[m - lo] for
// keys m in [lo, hi); sq == nullptr for a row without keys; tiny: sq holds codes of tiny squares, attention_norms.h).
template <class Sink>
void process_block(const float* q, const Keys& keys, const float* c, const QkNormsProblem& pb, int64_t b, int64_t r0,
                   int64_t r1, std::vector<float>& buf, std::vector<float>& sq, std::vector<float>& cs, Sink& sink) {
  const IsaKernels& isa = active();
  const int64_t rows = r1 - r0, cb0 = key_lo(pb, r0), cb1 = key_hi(pb, r1 - 1), width = cb1 - cb0 + kPad;
  const float* bias = keys.mask_bias();
  for (int64_t i = 0; i < pb.h; ++i)
    head_logits(q + ((b * pb.h + i) * pb.n + r0) * pb.d, keys.head(pb, i), pb, r0, r1, width,
                buf.data() + i * rows * width);
  std::vector<float> inv(static_cast<size_t>(pb.h));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r0 + r, lo = key_lo(pb, n), hi = key_hi(pb, n);
    bool empty = false;
    for (int64_t i = 0; i < pb.h && !empty; ++i) {
      float* x = buf.data() + (i * rows + r) * width + (lo - cb0);
      const float sum = isa.softmax_numerator(x, hi - lo, bias ? bias + lo : nullptr, pb.softcap);
      empty = !(sum > 0.0f);  // every head sees the same keys: all -inf in one head means in all
      inv[i] = 1.0f / sum;
    }
    if (empty) {
      sink.row(n, nullptr, lo, hi, false);
      continue;
    }
    for (int64_t j = 0; j < pb.h; ++j)
      for (int64_t i = 0; i < pb.h; ++i) cs[j * pb.h + i] = c[j * pb.h + i] * inv[i];  // C diag(1 / Σ)
    const bool tiny =
        isa.gram_row_squared_norms(buf.data() + r * width + (lo - cb0), rows * width, cs.data(), pb.h, hi - lo, sq.data());
    sink.row(n, sq.data(), lo, hi, tiny);
  }
}

// The pass over every batch and row block; make_sink(b) builds a thread's sink for batch b, and
// sink.begin(r0, r1) / sink.end() bracket each block.
template <class MakeSink>
void qk_pass(const float* q, const float* k, const uint8_t* key_mask, const float* c, const QkNormsProblem& pb,
             int num_threads, MakeSink make_sink) {
  const int threads = std::max(1, num_threads);
  const int64_t rb = block_rows(pb), blocks = (pb.n + rb - 1) / rb;
  Keys keys(pb, key_mask != nullptr);
  for (int64_t b = 0; b < pb.batch; ++b) {
    keys.load(k, key_mask, pb, b, threads);
#pragma omp parallel num_threads(threads)
    {
      auto sink = make_sink(b);
      std::vector<float> buf, sq(static_cast<size_t>(pb.n_k)), cs(static_cast<size_t>(pb.h * pb.h));
#pragma omp for schedule(dynamic, 1)
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t blk = pb.causal ? blocks - 1 - j : j;  // largest causal blocks first
        const int64_t r0 = blk * rb, r1 = std::min(pb.n, r0 + rb);
        const size_t need = static_cast<size_t>(pb.h * (r1 - r0) * (key_hi(pb, r1 - 1) - key_lo(pb, r0) + kPad));
        if (buf.size() < need) buf.resize(need);
        sink.begin(r0, r1);
        process_block(q, keys, c, pb, b, r0, r1, buf, sq, cs, sink);
        sink.end();
      }
    }
  }
}

// Writes whole rows of the (n, n_k) output: zeros outside the row's keys, the squared norms, and a tiny one
// (whose float32 square underflows) as the negative of its norm with tiny_roots, else as the nearest float32.
struct DenseSink {
  float* out;  // out[b] (n, n_k)
  int64_t n;   // n_k, the row length
  bool tiny_roots;
  std::atomic<bool>* any_tiny;
  void begin(int64_t, int64_t) {}
  void end() {}
  void row(int64_t r, const float* sq, int64_t lo, int64_t hi, bool tiny) {
    float* o = out + r * n;
    std::fill(o, o + lo, 0.0f);
    if (sq && tiny) {
      for (int64_t m = 0; m < hi - lo; ++m)
        o[lo + m] = tiny_roots && sq[m] < 0.0f ? -tiny_norm(sq[m]) : decoded_square(sq[m]);
      any_tiny->store(true, std::memory_order_relaxed);
    }
    else if (sq) std::copy(sq, sq + (hi - lo), o + lo);
    else std::fill(o + lo, o + hi, 0.0f);
    std::fill(o + hi, o + n, 0.0f);
  }
};

// Sums a block's rows into a private copy of the super-block rows it touches, then adds it to out[b].
struct GridSink {
  double* out;  // out[b] (out_rows, out_cols)
  const int64_t *row_bin, *col_bin;
  int64_t out_cols;
  int64_t b_lo = 0, b_hi = -1;
  std::vector<double> local;
  void begin(int64_t r0, int64_t r1) {
    b_lo = b_hi = row_bin[r0];
    for (int64_t r = r0; r < r1; ++r) {
      b_lo = std::min(b_lo, row_bin[r]);
      b_hi = std::max(b_hi, row_bin[r]);
    }
    local.assign(static_cast<size_t>((b_hi - b_lo + 1) * out_cols), 0.0);
  }
  void row(int64_t r, float* sq, int64_t lo, int64_t hi, bool tiny) {
    if (!sq) return;
    double* acc = local.data() + (row_bin[r] - b_lo) * out_cols;
    if (tiny) add_tiny_to_bins(sq, col_bin + lo, hi - lo, acc);
    add_to_bins(sq, col_bin + lo, hi - lo, acc);
  }
  void end() {
#pragma omp critical(duat_qk_grid_norms)
    for (int64_t bb = b_lo; bb <= b_hi; ++bb)
      for (int64_t kk = 0; kk < out_cols; ++kk) out[bb * out_cols + kk] += local[(bb - b_lo) * out_cols + kk];
  }
};

}  // namespace

void qk_mix_transposed(const float* q, const float* k, const uint8_t* key_mask, const float* u, float* out, int64_t e,
                       const QkNormsProblem& pb, int num_threads) {
  const int threads = std::max(1, num_threads);
  const IsaKernels& isa = active();
  const int64_t rb = head_block_rows(pb), blocks = (pb.n + rb - 1) / rb, head_size = pb.n * e, key_size = pb.n_k * e;
  Keys keys(pb, key_mask != nullptr);
  for (int64_t b = 0; b < pb.batch; ++b) {
    keys.load(k, key_mask, pb, b, threads);
    // One head per task: its output rows belong to it alone, so nothing is reduced across threads.
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> buf, us(static_cast<size_t>(rb * e)), w(static_cast<size_t>(rb));
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < pb.h; ++i) {
        float* oi = out + (b * pb.h + i) * key_size;  // out (B, h, N_k, e), u (B, h, N, e)
        const float* ui = u + (b * pb.h + i) * head_size;
        std::fill(oi, oi + key_size, 0.0f);
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t r0 = blk * rb, r1 = std::min(pb.n, r0 + rb), rows = r1 - r0;
          const int64_t cb0 = key_lo(pb, r0), cb1 = key_hi(pb, r1 - 1), width = cb1 - cb0 + kPad;
          if (buf.size() < static_cast<size_t>(rows * width)) buf.resize(static_cast<size_t>(rows * width));
          head_numerators(q, keys, pb, b, i, r0, r1, width, buf.data(), w.data());
          for (int64_t r = 0; r < rows; ++r)  // U rows with 1 / Σ folded in
            for (int64_t j = 0; j < e; ++j) us[r * e + j] = ui[(r0 + r) * e + j] * w[r];
          isa.pt_u_accumulate(buf.data(), width, rows, us.data(), e, oi + cb0 * e, cb1 - cb0);
        }
      }
    }
  }
}

void qk_mix(const float* q, const float* k, const uint8_t* key_mask, const float* values, float* out, int64_t e,
            const QkNormsProblem& pb, int num_threads) {
  const int threads = std::max(1, num_threads);
  const IsaKernels& isa = active();
  const int64_t rb = head_block_rows(pb), blocks = (pb.n + rb - 1) / rb, g = pb.h / pb.h_kv;
  Keys keys(pb, key_mask != nullptr);
  for (int64_t b = 0; b < pb.batch; ++b) {
    keys.load(k, key_mask, pb, b, threads);
    // One (head, row block) per task: its output rows belong to it alone.
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> buf, part(static_cast<size_t>(rb * e)), w(static_cast<size_t>(rb));
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < pb.h * blocks; ++job) {
        const int64_t i = job / blocks, blk = pb.causal ? blocks - 1 - job % blocks : job % blocks;
        const int64_t r0 = blk * rb, r1 = std::min(pb.n, r0 + rb), rows = r1 - r0;
        const int64_t cb0 = key_lo(pb, r0), cb1 = key_hi(pb, r1 - 1), width = cb1 - cb0 + kPad;
        if (buf.size() < static_cast<size_t>(rows * width)) buf.resize(static_cast<size_t>(rows * width));
        head_numerators(q, keys, pb, b, i, r0, r1, width, buf.data(), w.data());
        // out rows = diag(w) P V, a key tile of V (kKeyTile x e, in L1/L2) at a time for all the rows.
        float* o = out + ((b * pb.h + i) * pb.n + r0) * e;
        std::fill(o, o + rows * e, 0.0f);
        const float* vi = values + (b * pb.h_kv + i / g) * pb.n_k * e;
        for (int64_t t0 = cb0; t0 < cb1; t0 += kKeyTile) {
          const int64_t t1 = std::min(cb1, t0 + kKeyTile);
          isa.qk_logits(buf.data() + (t0 - cb0), width, rows, t1 - t0, vi + t0 * e, e, 0, e, 1.0f, part.data(), e);
          for (int64_t x = 0; x < rows * e; ++x) o[x] += part[x];
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < e; ++j) o[r * e + j] *= w[r];
      }
    }
  }
}

bool qk_gram_squared_norms(const float* q, const float* k, const uint8_t* key_mask, const float* c, float* out,
                           const QkNormsProblem& pb, int num_threads, bool tiny_roots) {
  std::atomic<bool> any_tiny(false);
  qk_pass(q, k, key_mask, c, pb, num_threads,
          [&](int64_t b) { return DenseSink{out + b * pb.n * pb.n_k, pb.n_k, tiny_roots, &any_tiny}; });
  return any_tiny.load();
}

void qk_gram_grid_norms(const float* q, const float* k, const uint8_t* key_mask, const float* c, const int64_t* row_bin,
                        const int64_t* col_bin, double* out, int64_t out_rows, int64_t out_cols, const QkNormsProblem& pb,
                        int num_threads) {
  qk_pass(q, k, key_mask, c, pb, num_threads, [&](int64_t b) {
    GridSink s;
    s.out = out + b * out_rows * out_cols;
    s.row_bin = row_bin;
    s.col_bin = col_bin;
    s.out_cols = out_cols;
    return s;
  });
}

}  // namespace duat

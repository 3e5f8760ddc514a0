// The per-ISA pieces of the fused q/k pass (csrc/qk_attention_norms.cpp): logits of a group of query
// rows against a range of keys, and the in-place softmax numerator of one row.
//
// Logits. S[r, m] = scale · q_r · k_m for r < rows (<= kRows), m in [m0, m1): a register-blocked
// micro-kernel over kRows x kNV vectors of keys (24 accumulators on AVX-512, 12 on AVX2/SSE2; see
// simd.h), the keys read transposed (kt = kᵀ (d, ldk), one key per lane) so that a step t of the
// d-loop is kNV vector loads of kt[t, m:m+kNV·L] and kRows broadcasts of q[r, t]. The caller keeps
// the key range one tile wide (d x kKeyTile floats stay in L1/L2 across the row groups).
//
// Transposed product. out[m, :] += Σ_r p[r, m] · us[r, :] (Aᵀ U of one head for a row block, the
// normalisation folded into us): kRows keys x kNV vectors of the value width in registers, the
// inner loop over the block's rows (one vector load of us[r] per kRows broadcasts of p[r, m]).
//
// Exponential. exp(x) = 2^n · p(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite, two constants),
// p the degree-6 Cephes polynomial (about 1 ulp on [-ln2/2, ln2/2]); 2^n is applied as two factors so
// that subnormal results and exp(x) up to FLT_MAX are exact to rounding. x < -103.98 (below half the
// smallest subnormal) gives +0, including -inf (masked logits); x > ln(FLT_MAX) gives +inf; NaN stays NaN.
#include <cstring>

#include "simd.h"

DUAT_ISA_BEGIN
namespace {

constexpr int kRows = kAccumulators / kNV;  // query rows per micro-kernel (6 on every ISA)
typedef int32_t VI __attribute__((vector_size(kVecBytes)));
constexpr int64_t kL = Vec<float>::kLanes;

inline VF load_v(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_v(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
inline VF splat_v(float x) { return VF{} + x; }

inline VF vexp(VF x) {
  const VF hi = splat_v(88.72283935546875f), lo = splat_v(-103.97208f);
  VF xc = x > hi ? hi : x;  // comparisons are false for NaN: NaN passes through
  xc = xc < lo ? lo : xc;
  const VF magic = splat_v(12582912.0f);  // 1.5 · 2^23: adding it rounds to an integer
  const VF t = madd(xc, splat_v(1.44269504088896341f), magic);
  const VF n = t - magic;
  VI ni;
  {
    VI tb, mb;
    std::memcpy(&tb, &t, sizeof(tb));
    const VF mv = magic;
    std::memcpy(&mb, &mv, sizeof(mb));
    ni = tb - mb;
  }
  VF r = madd(n, splat_v(-0.693359375f), xc);
  r = madd(n, splat_v(2.12194440e-4f), r);
  VF p = splat_v(1.9875691500e-4f);
  p = madd(p, r, splat_v(1.3981999507e-3f));
  p = madd(p, r, splat_v(8.3334519073e-3f));
  p = madd(p, r, splat_v(4.1665795894e-2f));
  p = madd(p, r, splat_v(1.6666665459e-1f));
  p = madd(p, r, splat_v(5.0000001201e-1f));
  p = madd(p, r * r, r + splat_v(1.0f));
  const VI n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 64]: 2^n1 and 2^n2 are normal floats
  const VI e1 = (n1 + 127) << 23, e2 = (n2 + 127) << 23;
  VF s1, s2;
  std::memcpy(&s1, &e1, sizeof(s1));
  std::memcpy(&s2, &e2, sizeof(s2));
  VF y = p * s1 * s2;
  y = x < lo ? splat_v(0.0f) : y;
  y = x > hi ? splat_v(__builtin_inff()) : y;
  return y;
}

inline float sexp(float x) {
  VF v = splat_v(x);
  return vexp(v)[0];
}

// c · tanh(x / c) = c · (1 - 2 / (exp(2x / c) + 1)): ±c at the overflow ends, NaN stays NaN.
inline VF vsoftcap(VF x, float cap) {
  const VF e = vexp(x * splat_v(2.0f / cap));
  return splat_v(cap) * (splat_v(1.0f) - splat_v(2.0f) / (e + splat_v(1.0f)));
}

template <int R, int V>
inline void logits_block(const float* q, int64_t ldq, int64_t d, const float* kt, int64_t ldk, int64_t m, float scale, float* s,
                         int64_t lds) {
  VF acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = VF{};
  for (int64_t t = 0; t < d; ++t) {
    VF kv[V];
    const float* kr = kt + t * ldk + m;
    for (int v = 0; v < V; ++v) kv[v] = load_v(kr + v * kL);
    for (int r = 0; r < R; ++r) {
      const VF qb = splat(q + r * ldq + t);
      for (int v = 0; v < V; ++v) acc[r][v] = madd(qb, kv[v], acc[r][v]);
    }
  }
  const VF sc = splat_v(scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store_v(s + r * lds + v * kL, acc[r][v] * sc);
}

template <int R>
void logits_rows_fixed(const float* q, int64_t ldq, int64_t d, const float* kt, int64_t ldk, int64_t m0, int64_t m1,
                       float scale, float* s, int64_t lds) {
  int64_t m = m0;
  for (; m + kNV * kL <= m1; m += kNV * kL) logits_block<R, kNV>(q, ldq, d, kt, ldk, m, scale, s + (m - m0), lds);
  for (; m + kL <= m1; m += kL) logits_block<R, 1>(q, ldq, d, kt, ldk, m, scale, s + (m - m0), lds);
  for (; m < m1; ++m)
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t t = 0; t < d; ++t) acc = madd(q[r * ldq + t], kt[t * ldk + m], acc);
      s[r * lds + (m - m0)] = acc * scale;
    }
}

template <int KM, int V>
inline void ptu_block(const float* p, int64_t ldp, int64_t rows, const float* us, int64_t e, int64_t j, float* out) {
  VF acc[KM][V];
  for (int km = 0; km < KM; ++km)
    for (int v = 0; v < V; ++v) acc[km][v] = VF{};
  for (int64_t r = 0; r < rows; ++r) {
    VF uv[V];
    for (int v = 0; v < V; ++v) uv[v] = load_v(us + r * e + j + v * kL);
    for (int km = 0; km < KM; ++km) {
      const VF pb = splat(p + r * ldp + km);
      for (int v = 0; v < V; ++v) acc[km][v] = madd(pb, uv[v], acc[km][v]);
    }
  }
  for (int km = 0; km < KM; ++km)
    for (int v = 0; v < V; ++v) {
      float* o = out + km * e + j + v * kL;
      store_v(o, load_v(o) + acc[km][v]);
    }
}

template <int KM>
void ptu_keys_fixed(const float* p, int64_t ldp, int64_t rows, const float* us, int64_t e, float* out) {
  int64_t j = 0;
  for (; j + kNV * kL <= e; j += kNV * kL) ptu_block<KM, kNV>(p, ldp, rows, us, e, j, out);
  for (; j + kL <= e; j += kL) ptu_block<KM, 1>(p, ldp, rows, us, e, j, out);
  for (; j < e; ++j)
    for (int km = 0; km < KM; ++km) {
      float acc = 0.0f;
      for (int64_t r = 0; r < rows; ++r) acc = madd(p[r * ldp + km], us[r * e + j], acc);
      out[km * e + j] += acc;
    }
}

}  // namespace

// out[m * e + j] += Σ_r p[r * ldp + m] · us[r * e + j] for m < keys, j < e.
void pt_u_accumulate(const float* p, int64_t ldp, int64_t rows, const float* us, int64_t e, float* out, int64_t keys) {
  for (int64_t m = 0; m < keys; m += kRows) {
    const float* pm = p + m;
    float* om = out + m * e;
    switch (keys - m < kRows ? keys - m : kRows) {
      case 1: ptu_keys_fixed<1>(pm, ldp, rows, us, e, om); break;
      case 2: ptu_keys_fixed<2>(pm, ldp, rows, us, e, om); break;
      case 3: ptu_keys_fixed<3>(pm, ldp, rows, us, e, om); break;
      case 4: ptu_keys_fixed<4>(pm, ldp, rows, us, e, om); break;
      case 5: ptu_keys_fixed<5>(pm, ldp, rows, us, e, om); break;
      default: ptu_keys_fixed<kRows>(pm, ldp, rows, us, e, om); break;
    }
  }
}

// s[r * lds + (m - m0)] = scale · Σ_t q[r * ldq + t] · kt[t * ldk + m] for r < rows, m in [m0, m1). The
// same product is P V (rows of P, values V (keys, e)) with q = P, d = keys, kt = V, ldk = e.
void qk_logits(const float* q, int64_t ldq, int64_t rows, int64_t d, const float* kt, int64_t ldk, int64_t m0,
               int64_t m1, float scale, float* s, int64_t lds) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const float* qr = q + r0 * ldq;
    float* sr = s + r0 * lds;
    switch (rows - r0 < kRows ? rows - r0 : kRows) {
      case 1: logits_rows_fixed<1>(qr, ldq, d, kt, ldk, m0, m1, scale, sr, lds); break;
      case 2: logits_rows_fixed<2>(qr, ldq, d, kt, ldk, m0, m1, scale, sr, lds); break;
      case 3: logits_rows_fixed<3>(qr, ldq, d, kt, ldk, m0, m1, scale, sr, lds); break;
      case 4: logits_rows_fixed<4>(qr, ldq, d, kt, ldk, m0, m1, scale, sr, lds); break;
      case 5: logits_rows_fixed<5>(qr, ldq, d, kt, ldk, m0, m1, scale, sr, lds); break;
      default: logits_rows_fixed<kRows>(qr, ldq, d, kt, ldk, m0, m1, scale, sr, lds); break;
    }
  }
}

// One row of logits x (n,), in place: x = softcap(x) (cap > 0) + bias (bias may be null; 0 or -inf
// per key), then x = exp(x - max x). Returns Σ x; 0 (and x untouched) when every entry is -inf.
float softmax_numerator(float* x, int64_t n, const float* bias, float cap) {
  VF vmax = splat_v(-__builtin_inff());
  int64_t m = 0;
  for (; m + kL <= n; m += kL) {
    VF v = load_v(x + m);
    if (cap > 0.0f) v = vsoftcap(v, cap);
    if (bias) v = v + load_v(bias + m);
    store_v(x + m, v);
    vmax = v > vmax ? v : vmax;
  }
  float mx = -__builtin_inff();
  for (int l = 0; l < kL; ++l) mx = vmax[l] > mx ? vmax[l] : mx;
  for (; m < n; ++m) {
    float v = x[m];
    if (cap > 0.0f) v = vsoftcap(splat_v(v), cap)[0];
    if (bias) v += bias[m];
    x[m] = v;
    mx = v > mx ? v : mx;
  }
  if (mx == -__builtin_inff()) return 0.0f;
  const VF vm = splat_v(mx);
  VF vsum = VF{};
  for (m = 0; m + kL <= n; m += kL) {
    const VF e = vexp(load_v(x + m) - vm);
    store_v(x + m, e);
    vsum = vsum + e;
  }
  float sum = 0.0f;
  for (int l = 0; l < kL; ++l) sum += vsum[l];
  for (; m < n; ++m) {
    x[m] = sexp(x[m] - mx);
    sum += x[m];
  }
  return sum;
}

// y[m] = exp(x[m]) for m < n (exposed for tests of the exponential).
void exp_f32(const float* x, int64_t n, float* y) {
  int64_t m = 0;
  for (; m + kL <= n; m += kL) store_v(y + m, vexp(load_v(x + m)));
  for (; m < n; ++m) y[m] = sexp(x[m]);
}

DUAT_ISA_END

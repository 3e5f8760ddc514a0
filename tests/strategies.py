"""Hypothesis strategies for the public API's input space, and the IEEE-aware comparison.

A drawn layer has random sizes (an empty batch, M_in = 0 and M_out = 0 included), GQA, zero blocks
(causal masks) and zero heads, non-finite values sprinkled into attn / w_v / w_o, a dtype, and
strides (column-major, transposed, flipped, sliced; an attention map expanded over the batch).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from duat_kernels import reference

SPECIALS = (float("nan"), float("inf"), float("-inf"))
STRIDES = ("contiguous", "column_major", "transposed", "flipped", "sliced")
# Unit roundoff of the accumulation dtype and one ulp (relative) of each output dtype (as in conftest).
ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
OUT_ULP = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def restride(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t in another memory layout: column-major (same values), transposed (a view with swapped
    strides), flipped, or every other column of a wider buffer (same values)."""
    if t.dim() < 2 or kind == "contiguous":
        return t.contiguous()
    if kind == "column_major":
        return t.mT.contiguous().mT
    if kind == "transposed" and t.shape[-1] == t.shape[-2]:
        return t.mT
    if kind == "flipped":
        return t.flip(-1)
    if kind == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@st.composite
def layers(draw, max_batch=2, max_heads=3, max_tokens=4, max_width=4, dtypes=(torch.float32, torch.float64),
           empty=True, specials=True):
    """dict(attn, w_v, w_o, num_kv_heads, heads) with attn (B, h, N, N) or (h, N, N)."""
    batch = draw(st.integers(0 if empty else 1, max_batch))
    heads = draw(st.integers(1, max_heads))
    kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    n = draw(st.integers(1, max_tokens))
    d = draw(st.integers(1, 2))
    m_in = draw(st.integers(0 if empty else 1, max_width))
    m_out = draw(st.integers(0 if empty else 1, max_width))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    same_batch = draw(st.booleans())  # one attention map repeated over the batch, stored expanded
    attn = torch.rand(1 if same_batch else batch, heads, n, n, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        attn = attn.tril()  # causal: zero blocks
    w_v = torch.randn(kv * d, m_in, generator=g, dtype=torch.float64)
    w_o = torch.randn(m_out, heads * d, generator=g, dtype=torch.float64)
    if draw(st.booleans()) and m_in:
        w_v[:, draw(st.integers(0, m_in - 1))] = 0  # a zero column of every OV
    if draw(st.booleans()):
        w_o[:, :d] = 0  # a head with OV = 0
    if specials and draw(st.booleans()):
        for name in draw(st.lists(st.sampled_from(["attn", "w_v", "w_o"]), min_size=1, max_size=2)):
            t = {"attn": attn, "w_v": w_v, "w_o": w_o}[name]
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    dtype = draw(st.sampled_from(dtypes))
    stride = draw(st.sampled_from(STRIDES))
    attn = attn.to(dtype)
    attn = attn.expand(batch, -1, -1, -1) if same_batch else restride(attn, stride)
    batched = batch != 1 or draw(st.booleans())
    return dict(attn=attn if batched else attn[0], w_v=restride(w_v.to(dtype), stride),
                w_o=restride(w_o.to(dtype), draw(st.sampled_from(STRIDES))), num_kv_heads=kv, heads=heads)


def dense_reference(attn, w_v, w_o, num_kv_heads, layout, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', magnitude) in the accumulation dtype acc, with attn's batch axis (if any).

    magnitude = Σ|A_i| ⊗ |OV_i| + (d/h)·Σ|A_i| ⊗ (|Wo_i||Wv_i|): 2h·u·magnitude is then the error of
    the length-h sums of W' plus that of OV's own length-d dot products (each side forms OV itself:
    the C++ backend with its kernel, the reference with torch.bmm), as in conftest."""
    attn4 = attn if attn.dim() == 4 else attn.unsqueeze(0)
    h = attn4.shape[1]
    ov = reference.ov_circuits(w_v.to(acc), w_o.to(acc), h, num_kv_heads)
    exact = reference.hvo_matrix(attn4.to(acc), ov, layout)
    magnitude = reference.hvo_matrix(attn4.to(acc).abs(), ov.abs(), layout)
    if h and w_o.shape[1]:
        ov_magnitude = reference.ov_circuits(w_v.to(acc).abs(), w_o.to(acc).abs(), h, num_kv_heads)
        magnitude = magnitude + (w_o.shape[1] // h) / h * reference.hvo_matrix(attn4.to(acc).abs(), ov_magnitude, layout)
    return (exact, magnitude) if attn.dim() == 4 else (exact[0], magnitude[0])


def assert_ieee_close(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, *, exact_nan: bool = True,
                      what: str = "") -> None:
    """got equals expected: NaN where expected is NaN, the same infinities, and finite entries within
    bound (exact_nan=False: non-finite exactly where expected is, NaN and Inf interchangeable, for
    results computed in another order, where Inf - Inf may happen at another step)."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    got, expected, bound = got.double(), expected.double(), bound.double().expand_as(expected)
    if exact_nan:
        checks = [("NaN", got.isnan(), expected.isnan()), ("+Inf", got == float("inf"), expected == float("inf")),
                  ("-Inf", got == float("-inf"), expected == float("-inf"))]
    else:
        checks = [("non-finite", ~got.isfinite(), ~expected.isfinite())]
    for name, g, e in checks:
        if not torch.equal(g, e):
            idx = tuple(i.item() for i in (g != e).nonzero()[0])
            raise AssertionError(f"{what}: {name} pattern differs first at {idx}: got {got[idx].item()!r}, "
                                 f"reference {expected[idx].item()!r}")
    fin = expected.isfinite() & bound.isfinite()
    bad = fin & ((got - expected).abs() > bound)
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} entries off; first at {idx}: got {got[idx].item()!r}, "
                             f"reference {expected[idx].item()!r}, bound {bound[idx].item():.3g}")


def materialise_bound(exact: torch.Tensor, magnitude: torch.Tensor, heads: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The forward error bound of a length-h dot product, twice, plus one ulp of the output (conftest's rule)."""
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    bound = 2 * heads * ROUNDOFF[acc] * magnitude.double() + OUT_ULP[out_dtype] * exact.double().abs()
    return bound + torch.finfo(out_dtype).tiny


@st.composite
def qk_layers(draw, max_batch=2, max_heads=2, max_tokens=4, dtypes=(torch.float32, torch.float64)):
    """dict(q, k, w_v, w_o, options) for HVOOperator.from_qk: q/k with NaN, ±Inf, huge and zero entries,
    causal, soft-cap, sliding window, key masks with rows (or batch elements) attending no key."""
    batch, heads = draw(st.integers(1, max_batch)), draw(st.integers(1, max_heads))
    kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    n, hd, d = draw(st.integers(1, max_tokens)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    m_in, m_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    q = torch.randn(batch, heads, n, hd, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv, n, hd, generator=g, dtype=torch.float64)
    for t in draw(st.lists(st.sampled_from([q, k]), max_size=2)):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([*SPECIALS, 1e30, -1e30, 0.0]))
    options = dict(causal=draw(st.booleans()), softcap=draw(st.sampled_from([None, 0.5, 5.0])),
                   sliding_window=draw(st.sampled_from([None, 1, 2, 10])))
    if draw(st.booleans()):
        mask = torch.rand(batch, n, generator=g) > 0.4
        if draw(st.booleans()):
            mask[0] = False  # a batch element that attends no key
        options["attention_mask"] = mask
    batched = batch != 1 or draw(st.booleans())
    unbatch = (lambda t: t) if batched else (lambda t: t[0])  # noqa: E731
    if "attention_mask" in options:
        options["attention_mask"] = unbatch(options["attention_mask"])
    w_v = torch.randn(kv * d, m_in, generator=g, dtype=torch.float64).to(dtype)
    w_o = torch.randn(m_out, heads * d, generator=g, dtype=torch.float64).to(dtype)
    return dict(q=unbatch(q).to(dtype), k=unbatch(k).to(dtype), w_v=w_v, w_o=w_o, num_kv_heads=kv, options=options)


def softmax_attention(q, k, *, causal=False, softcap=None, sliding_window=None, attention_mask=None):
    """A = softmax(q kᵀ / sqrt(d) soft-capped, masked) in float64 for q (B, h, N, d), k (B, h_kv, N, d):
    (B, h, N, N); rows that attend no key are zero (as HVOOperator.from_qk documents)."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = q @ k.mT * q.shape[-1] ** -0.5
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    n = q.shape[2]
    i = torch.arange(n)
    allowed = torch.ones(q.shape[0], 1, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & (i[None, :] <= i[:, None])
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - sliding_window < i[None, :])
        if not causal:
            allowed = allowed & (i[None, :] < i[:, None] + sliding_window)
    if attention_mask is not None:
        allowed = allowed & attention_mask.reshape(q.shape[0], 1, 1, n)
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.where(allowed, attn, 0.0)  # also zero for rows with no key (softmax of all -Inf is NaN)

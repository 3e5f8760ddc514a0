"""HVOOperator.from_qk against the operator on the explicitly computed A: every method, on small
causal / bidirectional GQA cases with padding, soft-capping and sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import duat_kernels as dk
from duat_kernels import attention_source, qk_attention
from duat_kernels.linalg import stats

CASES = {  # name: (causal, padded, softcap, sliding_window)
    "causal_padded": (True, True, None, None),
    "bidirectional_padded": (False, True, None, None),
    "softcap": (True, False, 2.0, None),
    "causal_window": (True, True, None, 3),
    "bidirectional_window": (False, False, None, 4),
}


def _inputs(batch=2, heads=4, kv_heads=2, tokens=11, d=5, m=6, dtype=torch.float64, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, kv_heads, tokens, d, generator=g, dtype=torch.float64).to(dtype)
    w_v = torch.randn(kv_heads * d, m, generator=g, dtype=torch.float64).to(dtype) / m ** 0.5
    w_o = torch.randn(m, heads * d, generator=g, dtype=torch.float64).to(dtype) / (heads * d) ** 0.5
    b_v = torch.randn(kv_heads * d, generator=g, dtype=torch.float64).to(dtype)
    b_o = torch.randn(m, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    if padded:
        mask[-1, :4] = False  # left padding: under causal masking the first rows see no key
        mask[0, -2:] = False  # right padding
    return q, k, w_v, w_o, b_v, b_o, mask if padded else None


def _explicit_attention(q, k, causal, mask, softcap, window, scale=None):
    """softmax(scale·q kᵀ + masks) with full N x N masks; rows without keys are zero."""
    heads, kv_heads, n, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    s = q @ k.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) * (scale or d ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = torch.ones(n, n, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window:
        ok &= (i - j < window) & ((j - i < window) | causal)
    ok = ok[None, None] & (mask[:, None, None, :] if mask is not None else True)
    p = s.masked_fill(~ok, float("-inf")).softmax(-1)
    return torch.nan_to_num(p, nan=0.0)


def _pair(name, dtype=torch.float64, batched=True, layout="token"):
    causal, padded, softcap, window = CASES[name]
    q, k, w_v, w_o, b_v, b_o, mask = _inputs(dtype=dtype, padded=padded)
    if not batched:
        q, k, mask = q[-1], k[-1], None if mask is None else mask[-1]
    attn = _explicit_attention(q if batched else q[None], k if batched else k[None], causal,
                               None if mask is None else (mask if batched else mask[None]), softcap, window)
    explicit = dk.HVOOperator(attn if batched else attn[0], w_v, w_o, num_kv_heads=2, b_v=b_v, b_o=b_o, layout=layout)
    from_qk = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=causal, attention_mask=mask, b_v=b_v, b_o=b_o,
                                     layout=layout, softcap=softcap, sliding_window=window)
    return explicit, from_qk


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(attention_source, "BLOCK_ENTRIES", 3 * 2 * 4 * 11)  # three rows per step: several blocks


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_products_and_bias_match_explicit(name, layout):
    explicit, from_qk = _pair(name, layout=layout)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, explicit.shape[-1], generator=g, dtype=torch.float64)
    y = torch.randn(2, explicit.shape[-2], generator=g, dtype=torch.float64)
    xs = torch.randn(2, explicit.shape[-1], 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(from_qk.matvec(x), explicit.matvec(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_qk.rmatvec(y), explicit.rmatvec(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_qk.matmat(xs), explicit.matmat(xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_qk.bias(), explicit.bias(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_qk.to_dense(), explicit.to_dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_qk.attn, explicit.attn, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_blocks_and_tiles_match_explicit(name, layout):
    explicit, from_qk = _pair(name, layout=layout)
    rows, cols = explicit.shape[-2:]
    for n, m in [(0, 0), (5, 2), (10, 10), (3, 9)]:
        torch.testing.assert_close(from_qk.block(n, m), explicit.block(n, m), rtol=1e-12, atol=1e-14)
    for r, c in [(slice(0, rows), slice(0, cols)), (slice(7, 9), slice(3, 40)), (slice(20, 53), slice(61, 66))]:
        torch.testing.assert_close(from_qk.tile(r, c), explicit.tile(r, c), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norms_trace_and_samples_match_explicit(name, dtype):
    explicit, from_qk = _pair(name, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(from_qk.block_norms(), explicit.block_norms(), **tol)
    torch.testing.assert_close(from_qk.block_norms(grid=(4, 3)), explicit.block_norms(grid=(4, 3)), **tol)
    torch.testing.assert_close(from_qk.frobenius_norm(), explicit.frobenius_norm(), **tol)
    torch.testing.assert_close(from_qk.trace(), explicit.trace(), **tol)
    for b in range(2):
        gen = [torch.Generator().manual_seed(7) for _ in range(2)]
        ov = dk.ov_circuits(explicit.w_v, explicit.w_o, 4, 2).to(dtype)
        got = stats.sample_entries(from_qk.source, ov, 500, gen[0], b)
        want = stats.sample_entries(explicit.source, ov, 500, gen[1], b)
        torch.testing.assert_close(got, want, **tol)
    est = [op.fraction_above(0.05, samples=2000, batch=1) for op in (from_qk, explicit)]
    assert est[0].fraction == est[1].fraction


@pytest.mark.parametrize("name", ["causal_padded", "softcap", "bidirectional_window"])
def test_spectrum_and_save_dense_match_explicit(name, tmp_path):
    explicit, from_qk = _pair(name, batched=False)
    np.testing.assert_allclose(from_qk.singular_values(3, tol=1e-10), explicit.singular_values(3, tol=1e-10),
                               rtol=1e-9)
    assert from_qk.spectral_norm() == pytest.approx(explicit.spectral_norm(), rel=1e-6)
    paths = [dk.analysis.save_dense(op, tmp_path / f"{i}.npy", rows_per_tile=7, progress=False)
             for i, op in enumerate((from_qk, explicit))]
    np.testing.assert_allclose(np.load(paths[0]), np.load(paths[1]), rtol=1e-12, atol=1e-14)


def test_causal_matvec_is_torch_sdpa():
    """The causal unpadded matvec is scaled_dot_product_attention itself (then the projections)."""
    q, k, w_v, w_o, _, _, _ = _inputs(batch=1, dtype=torch.float32, padded=False)
    op = dk.HVOOperator.from_qk(q[0], k[0], w_v, w_o, causal=True)
    x = torch.randn(11, 6)
    vals = (x @ w_v.T).reshape(11, 2, 5).transpose(0, 1)
    heads = torch.nn.functional.scaled_dot_product_attention(q[0], k[0], vals, is_causal=True, enable_gqa=True)
    want = heads.transpose(0, 1).reshape(11, 20) @ w_o.T
    torch.testing.assert_close(op.matvec(x.reshape(-1)), want.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=torch.randn(3, 11, 5)), "multiple of h_kv"),
    (dict(k=torch.randn(2, 11, 4)), "k must have shape"),  # N_k = 10 keys is cross-attention (test_qk_attention_cross)
    (dict(num_kv_heads=4), "num_kv_heads=4"),
    # 2.0 passed as 2; "2" was refused as "num_kv_heads=2 but k has 2 heads"
    (dict(num_kv_heads=2.0), "num_kv_heads must be a positive int or None, got 2.0"),
    (dict(num_kv_heads="2"), "num_kv_heads must be a positive int or None, got '2'"),
    (dict(k=torch.randn(1, 11, 5), w_v=torch.randn(5, 6), num_kv_heads=True), "got True"),  # passed as 1
    (dict(attention_mask=torch.ones(12, dtype=torch.bool)), "attention_mask"),
    # an additive mask (0 = attend, -inf = masked) used to be read as bool: silently inverted
    (dict(attention_mask=torch.tensor([0.0] * 8 + [float("-inf")] * 3)), "additive mask"),
    (dict(attention_mask=torch.tensor([2] * 11)), "True/1 \\(attend\\) and False/0"),
    (dict(softcap=0.0), "softcap"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=True), "sliding_window"),  # was a RuntimeError from torch (bool tensor subtraction)
    (dict(softcap=float("inf")), "softcap must be a positive finite"),  # was an A of NaN (inf · tanh(s / inf))
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(q=torch.randn(4, 11, 0), k=torch.randn(2, 11, 0)), "head size d >= 1"),  # was ZeroDivisionError
])
def test_from_qk_rejects_bad_input(kwargs, match):
    args = dict(q=torch.randn(4, 11, 5), k=torch.randn(2, 11, 5), w_v=torch.randn(10, 6), w_o=torch.randn(6, 20))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dk.HVOOperator.from_qk(args.pop("q"), args.pop("k"), args.pop("w_v"), args.pop("w_o"), **args)


def test_from_qk_takes_a_numpy_sliding_window():
    # as the rest of the API takes NumPy integers (a window read from a config array, say)
    import numpy as np
    g = torch.Generator().manual_seed(0)
    q, k, w_v, w_o = torch.randn(4, 11, 5, generator=g), torch.randn(2, 11, 5, generator=g), torch.randn(10, 6), torch.randn(6, 20)
    got = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, sliding_window=np.int64(3)).to_dense()
    expected = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, sliding_window=3).to_dense()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("window", [10 ** 20, 1 << 63, 1 << 40])
@pytest.mark.parametrize("causal", [False, True])
def test_from_qk_window_of_more_keys_than_tokens_is_every_key(window, causal):
    # the int64 q/k kernels got the window as given: 10**20 failed with "int too big to convert",
    # 2**63 with "index -9223372036854775808 is out of bounds"
    g = torch.Generator().manual_seed(1)
    q, k, w_v, w_o = (torch.randn(*s, generator=g) for s in ((2, 5, 3), (2, 5, 3), (6, 4), (4, 6)))
    plain = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=causal)
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=causal, sliding_window=window)
    x = torch.randn(20, generator=g)
    torch.testing.assert_close(op.to_dense(), plain.to_dense())
    torch.testing.assert_close(op.block_norms(), plain.block_norms())
    torch.testing.assert_close(op.block_norms(grid=2), plain.block_norms(grid=2))
    torch.testing.assert_close(op.matvec(x), plain.matvec(x))
    torch.testing.assert_close(op.rmatvec(x), plain.rmatvec(x))


def test_from_qk_meta_mask_is_refused_and_meta_q_takes_masks():
    # was torch's NotImplementedError "Cannot copy out of meta tensor; no data!" at the first method
    with pytest.raises(ValueError, match="attention_mask is on meta but q and k are on cpu"):
        dk.HVOOperator.from_qk(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(6, 4), torch.randn(4, 6),
                               attention_mask=torch.ones(5, dtype=torch.bool, device="meta"))
    # meta q and k with a key mask or a sliding window failed with "Tensor.item() cannot be called on meta tensors"
    for opts in (dict(attention_mask=torch.ones(5, dtype=torch.bool)), dict(sliding_window=2)):
        meta = dk.HVOOperator.from_qk(*(torch.randn(*s, device="meta") for s in ((2, 5, 3), (2, 5, 3), (6, 4), (4, 6))),
                                      **opts)
        assert meta.matvec(torch.ones(20, device="meta")).shape == (20,)


@pytest.mark.parametrize("causal", ["no", None, 0.5])
def test_from_qk_causal_must_be_a_bool(causal):
    # a string such as "no" used to count as True
    with pytest.raises(TypeError, match="causal must be True or False"):
        dk.HVOOperator.from_qk(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(6, 4), torch.randn(4, 6),
                               causal=causal)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.bool])
def test_from_qk_takes_0_1_masks_of_any_dtype(dtype):
    q, k, w_v, w_o = torch.randn(4, 11, 5), torch.randn(2, 11, 5), torch.randn(10, 6), torch.randn(6, 20)
    keep = torch.tensor([1] * 8 + [0] * 3)
    want = dk.HVOOperator.from_qk(q, k, w_v, w_o, attention_mask=keep.bool()).attn
    torch.testing.assert_close(dk.HVOOperator.from_qk(q, k, w_v, w_o, attention_mask=keep.to(dtype)).attn, want)


@pytest.mark.parametrize("name", ["scale", "softcap"])
def test_from_qk_names_a_scale_or_softcap_that_is_not_a_number(name):
    """A string used to fail deep inside: "could not convert string to float", "'>' not supported"."""
    with pytest.raises(TypeError, match=f"{name} must be a real number or None, got str"):
        dk.HVOOperator.from_qk(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(6, 4), torch.randn(4, 6),
                               **{name: "0.5"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("head", [0, 1])
def test_nan_in_q_reaches_products_blocks_trace_and_bias(head, value):
    """A NaN in q makes its row of A NaN (softmax); matvec, block, trace and bias said otherwise: torch's
    CPU sdpa writes zeros for that row, entries() masked every head's row when head 0's log-sum-exp was not
    finite, and row_sums() assumed rows sum to one."""
    q, k, w_v, w_o = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(6, 5), torch.randn(5, 6)
    q[head, 2, 1] = value  # Inf: a row of ±Inf logits, which softmax makes all NaN (entries() gave NaN, 0, ...)
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, b_v=torch.randn(6))
    explicit = dk.HVOOperator(op.attn, w_v, w_o, b_v=op.b_v)
    assert op.attn[head, 2].isnan().all() and op.attn[1 - head].isfinite().all()
    x = torch.randn(20)
    for got, want in [(op.matvec(x), explicit.matvec(x)), (op.block(2, 1), explicit.block(2, 1)),
                      (op.trace(), explicit.trace()), (op.bias(), explicit.bias())]:
        assert got.isnan().any() and torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, equal_nan=True)


def test_masked_pairs_stay_zero_in_a_row_with_a_nan_logit():
    """Masked (query, key) pairs are exact zeros in every path, also in a row whose logits hold a NaN:
    the dense A (rows of softmax blocks) used to spread the NaN over the masked keys of the row block
    only, so to_dense and tile disagreed with entries(), trace() and the fused norms."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g)
    w_v, w_o = torch.randn(8, 5, generator=g), torch.randn(5, 8, generator=g)
    q[0, 0, 2, 1] = float("nan")
    keep = torch.ones(1, 9, dtype=torch.bool)
    keep[0, 2] = keep[0, 7] = False
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, attention_mask=keep)
    a = op.attn[0]
    allowed = torch.ones(9, 9, dtype=torch.bool).tril() & keep[0]
    assert torch.equal(a[:, ~allowed], torch.zeros_like(a[:, ~allowed]))  # exact zeros, NaN row included
    assert a[0, 2, allowed[2]].isnan().all() and a[1].isfinite().all()
    dense = op.to_dense()[0]
    # the diagonal pair (2, 2) is masked (key 2): the trace stays finite, in the dense W' as in trace()
    assert op.trace()[0].isfinite()
    torch.testing.assert_close(op.trace()[0], dense.diagonal().sum().double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(op.tile(slice(0, 45), slice(0, 45))[0].isnan(), dense[:45, :45].isnan())
    explicit = dk.HVOOperator(a, w_v, w_o)
    assert torch.equal(op.block_norms()[0].isnan(), explicit.block_norms().isnan())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_matches_the_explicit_operator(case, dtype):
    # B = 0 is accepted (as for an explicit attn), but attn, to_dense, tile and contributions failed with
    # torch's "cannot reshape tensor of 0 elements into shape [0, 2, 2, 11, -1]" and trace with "stack
    # expects a non-empty TensorList"
    causal, padded, softcap, window = CASES[case]
    q, k, w_v, w_o, b_v, b_o = _inputs(batch=2, dtype=dtype)[:6]
    mask = torch.ones(0, 11, dtype=torch.bool) if padded else None
    op = dk.HVOOperator.from_qk(q[:0], k[:0], w_v, w_o, num_kv_heads=2, causal=causal, attention_mask=mask,
                                softcap=softcap, sliding_window=window, b_v=b_v, b_o=b_o)
    explicit = dk.HVOOperator(torch.zeros(0, 4, 11, 11, dtype=dtype), w_v, w_o, num_kv_heads=2, b_v=b_v, b_o=b_o)
    x = torch.randn(0, 11, 6, dtype=dtype)
    for method in (lambda o: o.attn, lambda o: o.to_dense(), lambda o: o.tile(slice(3, 20), slice(5, 9)),
                   lambda o: o.trace(), lambda o: o.frobenius_norm(), lambda o: o.block_norms(), lambda o: o.bias(),
                   lambda o: o.block_norms(grid=3), lambda o: o.block(-1, 2), lambda o: o.matvec(x),
                   lambda o: o.rmatvec(x), lambda o: o.contributions(x), lambda o: o.contributions(x, per_head=True)):
        got, want = method(op), method(explicit)
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("causal", [True, False])
def test_tall_narrow_tile_forms_row_blocks_only(layout, causal, monkeypatch):
    # One column of W' over every row read whole rows of A for every token: (B, h, N, N) at once
    # (640 GB for N = 400000: the allocator's raw RuntimeError); now A's part is formed a row block
    # (BLOCK_ENTRIES) at a time, with the same numbers
    q, k, w_v, w_o, b_v, b_o, mask = _inputs(batch=2)
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, num_kv_heads=2, causal=causal, attention_mask=mask, layout=layout)
    dense = op.to_dense()
    monkeypatch.setattr(attention_source, "BLOCK_ENTRIES", 2 * 4 * 11 * 3)  # 3 rows of A per step
    widths = []
    real_rows = qk_attention.QKAttention.rows
    monkeypatch.setattr(qk_attention.QKAttention, "rows",
                        lambda self, r0, r1: widths.append(r1 - r0) or real_rows(self, r0, r1))
    for cols in (slice(0, 1), slice(40, 43), slice(65, 66)):
        torch.testing.assert_close(op.tile(slice(0, 66), cols), dense[:, :, cols], rtol=1e-12, atol=1e-12)
    assert widths and max(widths) <= 3


@pytest.mark.parametrize("causal", [False, True])
def test_from_qk_with_value_head_size_zero(causal):
    # w_v (0, M_in), w_o (M_out, 0): the values are empty, W' is zero. matvec, matmat and spectral_norm
    # failed in the sliced sdpa with torch's "torch.cat(): expected a non-empty list of Tensors"
    q, k = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    op = dk.HVOOperator.from_qk(q, k, torch.randn(0, 5), torch.randn(6, 0), causal=causal)
    assert torch.equal(op.matvec(torch.randn(20)), torch.zeros(24))
    assert torch.equal(op.matmat(torch.randn(20, 3)), torch.zeros(24, 3))
    assert torch.equal(op.rmatvec(torch.randn(24)), torch.zeros(20))
    assert op.spectral_norm() == 0.0


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("causal", [False, True])
def test_from_qk_logits_beyond_float32_agree_with_float64(causal, softcap):
    # finite q and k whose logits (1e40) overflow float32 came out as Inf or NaN depending on each path's
    # order of operations: to_dense, tile, block and trace had NaN rows where block_norms, rmatvec (the C++
    # passes) and the soft-capped matvec gave finite numbers. The exact A is finite (one-hot rows).
    g = torch.Generator().manual_seed(0)
    q, k, w_v, w_o = (torch.randn(*s, generator=g) for s in ((2, 4, 3), (2, 4, 3), (4, 3), (3, 4)))
    q[0, 2] *= 1e20
    k[0, 1] *= 1e20
    k[0, 3] *= -1e20
    opts = dict(causal=causal, softcap=softcap, attention_mask=torch.tensor([True, True, False, True]))
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, **opts)
    wide = dk.HVOOperator.from_qk(q.double(), k.double(), w_v.double(), w_o.double(), **opts)
    torch.testing.assert_close(op.attn.double(), wide.attn, rtol=0, atol=1e-6)
    explicit = dk.HVOOperator(op.attn, w_v, w_o)
    x = torch.randn(12, generator=g)
    for name in ("block_norms", "frobenius_norm", "trace", "bias"):
        torch.testing.assert_close(getattr(op, name)(), getattr(explicit, name)(), msg=name)
    for name in ("matvec", "rmatvec", "contributions"):
        torch.testing.assert_close(getattr(op, name)(x), getattr(explicit, name)(x), msg=name)
    torch.testing.assert_close(op.block_norms(grid=2), explicit.block_norms(grid=2))
    torch.testing.assert_close(op.block(2, 1), explicit.block(2, 1))


@pytest.mark.parametrize("where", ["w_v", "w_o"])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(sliding_window=1),
                                  dict(causal=True, sliding_window=2, attention_mask=torch.tensor([False, True, True, False])),
                                  dict(softcap=3.0, attention_mask=torch.tensor([True, False, True, True]))],
                         ids=["causal", "window", "causal-window-mask", "softcap-mask"])
def test_from_qk_nan_weights_reach_masked_pairs(where, opts):
    # 0 · NaN = NaN in the blocks of masked pairs, as in the dense W': block_norms and frobenius_norm left
    # the blocks of the columns a row block skips at 0, and matvec/rmatvec (sdpa, the C++ passes, row
    # blocks) skipped the masked pairs and zeroed rows without keys
    g = torch.Generator().manual_seed(2)
    q, k, w_v, w_o = (torch.randn(*s, generator=g) for s in ((2, 4, 3), (2, 4, 3), (4, 3), (3, 4)))
    (w_v if where == "w_v" else w_o)[1, 2] = float("nan")
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, **opts)
    explicit = dk.HVOOperator(op.attn, w_v, w_o)
    x = torch.randn(12, generator=g)
    for got, want in ((op.block_norms(), explicit.block_norms()), (op.block_norms(grid=2), explicit.block_norms(grid=2)),
                      (op.frobenius_norm(), explicit.frobenius_norm())):
        torch.testing.assert_close(got, want, equal_nan=True)
    for name in ("matvec", "rmatvec"):
        got, want = getattr(op, name)(x), getattr(explicit, name)(x)
        assert torch.equal(got.isfinite(), want.isfinite()), name
        torch.testing.assert_close(got[got.isfinite()], want[want.isfinite()])


@pytest.mark.filterwarnings("error::UserWarning")  # was: 'Converting a tensor with requires_grad=True to a scalar'
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tracked", ["q", "k", "w_o", "vector"])
def test_from_qk_products_keep_autograd(tracked, causal, softcap):
    """float32 CPU sources take the C++ q/k passes (rmatvec, soft-capped matvec), which read NumPy views:
    an input that requires grad failed there with torch's raw "Can't call numpy() on Tensor that requires
    grad" (w_o, the vector) or lost its gradient silently (q, k: requires_grad False, q.grad missing the
    term). Under autograd they take the torch row blocks; gradients equal those through the explicit A.
    Soft-capped logits were capped in place (tanh_ then mul_), so any backward through A from q or k
    failed with 'modified by an inplace operation' (to_dense, attn, matvec alike)."""
    g = torch.Generator().manual_seed(0)
    q, k, w_v, w_o = (torch.randn(*s, generator=g) for s in ((2, 5, 3), (1, 5, 3), (3, 4), (4, 6)))
    vector = torch.randn(20, generator=g)
    leaves = dict(q=q, k=k, w_o=w_o, vector=vector)
    leaves[tracked].requires_grad_()
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, num_kv_heads=1, causal=causal, softcap=softcap)
    explicit = dk.HVOOperator(op.attn, w_v, w_o, num_kv_heads=1)  # op.attn: torch operations on q and k
    for name in ("matvec", "rmatvec"):
        got, want = getattr(op, name)(vector), getattr(explicit, name)(vector)
        assert got.requires_grad, name
        torch.testing.assert_close(got, want)
        weights = torch.randn(got.shape, generator=g)
        torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), leaves[tracked]),
                                   torch.autograd.grad((want * weights).sum(), leaves[tracked], retain_graph=True),
                                   msg=name)
    with torch.no_grad():  # without autograd the C++ passes serve as before
        torch.testing.assert_close(op.rmatvec(vector), explicit.rmatvec(vector))


@pytest.mark.parametrize("dtype,size", [(torch.float64, 1e30), (torch.float64, 1e17), (torch.float32, 1e8)])
def test_entries_of_huge_equal_logits_are_the_softmax(dtype, size):
    """Two keys with the same huge logit s: A = 1/2 each. entries() (block, trace, fraction_above) formed
    exp(s - logsumexp), and logsumexp = s + log 2 rounds to s once ulp(s) > log 2: it gave 1, so
    block(n, m) was twice the dense W''s block."""
    q = torch.tensor([[[1.5], [-0.25]]], dtype=dtype)
    k = torch.full((1, 2, 1), size, dtype=dtype)
    op = dk.HVOOperator.from_qk(q, k, torch.ones(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype))
    assert torch.equal(op.attn, torch.full((1, 2, 2), 0.5, dtype=dtype))
    for n, m in ((0, 0), (0, 1), (1, 0)):
        assert op.block(n, m).item() == 0.5
    assert op.trace().item() == 1.0


@pytest.mark.parametrize("causal", [False, True])
def test_from_qk_gradients_with_rows_that_attend_no_key(causal):
    """A key mask that leaves a row without keys: its zeros were written into softmax's output in place, so
    every backward through a row block of A from q or k (tile, to_dense, attn) failed with "one of the
    variables needed for gradient computation has been modified by an inplace operation"."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 4, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, 4, 2, generator=g,
                                                                                   dtype=torch.float64)
    w_v, w_o = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])  # batch 0: query 0 attends no key under a causal mask
    leaves = (q.requires_grad_(), k.requires_grad_())
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=causal, attention_mask=mask)
    keep = mask.bool()[:, None, None, :] & (torch.ones(4, 4, dtype=torch.bool).tril() if causal else True)
    scores = (q.reshape(2, 2, 2, 4, 2) @ k[:, :, None].transpose(-1, -2)).reshape(2, 4, 4, 4) * 2 ** -0.5
    attn = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)  # rows without keys: zeros
    weight = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    got = op.tile(slice(3, 9), slice(1, 12))
    want = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=2, backend="reference")[:, 3:9, 1:12]
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad((got * weight).sum(), leaves), torch.autograd.grad((want * weight).sum(),
                                                                                           leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("opts", [dict(causal=True), dict(attention_mask=torch.tensor([1, 1, 0, 1]))])
def test_from_qk_matvec_takes_forward_mode_ad(opts):
    """matvec (torch's sdpa) under forward-mode AD failed with "Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu that does not support it"; the tangent now equals that of
    W' x' formed from the dense W' (torch row blocks)."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(2)
    q, k, tangent = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 4, 2), (2, 4, 2), (4, 4, 2)))
    w_v, w_o = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    x = torch.randn(12, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, tangent)
        got = fwAD.unpack_dual(dk.HVOOperator.from_qk(dual, k, w_v, w_o, **opts).matvec(x)).tangent
        dense = dk.HVOOperator.from_qk(dual, k, w_v, w_o, **opts).to_dense(backend="reference")
        want = fwAD.unpack_dual(dense @ x).tangent
    assert want is not None and want.abs().max() > 0
    torch.testing.assert_close(got, want)


# Options of the q/k operators under torch.func and torch.compile: causal; a key mask; soft-capping with a
# sliding window; and a causal mask whose first query attends no key (a zero row of A).
TRANSFORM_OPTS = [dict(causal=True), dict(attention_mask=torch.tensor([1, 1, 0, 1])),
                  dict(softcap=2.0, sliding_window=2), dict(causal=True, attention_mask=torch.tensor([0, 1, 1, 1]))]
TRANSFORM_IDS = ["causal", "key_mask", "softcap_window", "row_without_keys"]
# A NaN or Inf in one batch element's q or k: (tensor, index in the batch of 3, value).
NON_FINITE = {"finite": None, "q_nan": ("q", (1, 0, 2, 1), float("nan")), "q_inf": ("q", (1, 3, 1, 0), float("inf")),
              "k_nan": ("k", (1, 1, 1, 0), float("nan")), "k_-inf": ("k", (1, 0, 3, 1), float("-inf"))}


def _batched_qk(corrupt: str, seed: int = 5):
    """q (3, 4, 4, 2), k (3, 2, 4, 2), w_v (4, 3), w_o (3, 8), b_v (4,), x (12,) with NON_FINITE[corrupt] set."""
    g = torch.Generator().manual_seed(seed)
    qk = dict(q=torch.randn(3, 4, 4, 2, generator=g), k=torch.randn(3, 2, 4, 2, generator=g))
    if NON_FINITE[corrupt] is not None:
        name, index, value = NON_FINITE[corrupt]
        qk[name][index] = value
    w_v, w_o, b_v, x = (torch.randn(*s, generator=g) for s in ((4, 3), (3, 8), (4,), (12,)))
    return qk["q"], qk["k"], w_v, w_o, b_v, x


@pytest.mark.parametrize("corrupt", list(NON_FINITE))
@pytest.mark.parametrize("opts", TRANSFORM_OPTS, ids=TRANSFORM_IDS)
def test_from_qk_methods_under_torch_func_vmap(opts, corrupt):
    """vmap over q and k: the finiteness checks, the rows without keys and the logits' range branched on batched
    values ("vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow"),
    and rows() / part() wrote batched blocks into plain buffers. Then the finiteness check, skipped under vmap,
    took q and k for finite: a NaN or Inf in one element's q or k spread over masked pairs (attn, tile, norms),
    sdpa gave zeros for its NaN rows (matvec) and row sums of 1 (bias), and block_norms' torch path took the
    root of a NaN squared norm for 0; a row without keys came out NaN, not zero (the rows without keys were not
    looked for). Each result equals the per-element one, NaN where it is NaN."""
    import warnings

    qs, ks, w_v, w_o, b_v, x = _batched_qk(corrupt)
    methods = dict(matvec=lambda op: op.matvec(x), rmatvec=lambda op: op.rmatvec(x),
                   tile=lambda op: op.tile(slice(1, 7), slice(2, 11)), block_norms=lambda op: op.block_norms(),
                   block=lambda op: op.block(2, 1), bias=lambda op: op.bias(), attn=lambda op: op.attn,
                   frobenius_norm=lambda op: op.frobenius_norm(), trace=lambda op: op.trace(),
                   contributions=lambda op: op.contributions(x.reshape(4, 3)))
    for name, call in methods.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "no batching rule" performance notes
            got = torch.func.vmap(lambda q, k: call(dk.HVOOperator.from_qk(q, k, w_v, w_o, b_v=b_v, **opts)))(qs, ks)
        want = torch.stack([call(dk.HVOOperator.from_qk(q, k, w_v, w_o, b_v=b_v, **opts)) for q, k in zip(qs, ks)])
        torch.testing.assert_close(got, want, equal_nan=True, msg=name)


@pytest.mark.parametrize("opts", TRANSFORM_OPTS, ids=TRANSFORM_IDS)
def test_from_qk_products_under_vmap_over_vectors(opts):
    """vmap over x' and y of one q/k operator: rmatvec (and matvec with soft-capping) handed vmap's batched
    vectors to the C++ q/k pass ("Cannot access data pointer of Tensor that doesn't have storage"). An Inf
    in one vector gives what that vector gives without vmap (NaN through 0 · Inf over masked pairs)."""
    q, k, w_v, w_o, _, x = _batched_qk("finite")
    xs = torch.stack([x, x.flip(0), -x])
    xs[1, 4] = float("inf")
    op = dk.HVOOperator.from_qk(q[0], k[0], w_v, w_o, **opts)
    for name in ("matvec", "rmatvec"):
        got = torch.func.vmap(getattr(op, name))(xs)
        want = torch.stack([getattr(op, name)(v) for v in xs])
        assert not want[1].isfinite().all()
        torch.testing.assert_close(got, want, equal_nan=True, msg=name)


@pytest.mark.parametrize("opts", TRANSFORM_OPTS, ids=TRANSFORM_IDS)
def test_from_qk_products_compile_with_fullgraph(opts):
    """torch.compile(fullgraph=True) of a q/k operator's matvec broke the graph on the finiteness check of q and k
    (a data-dependent branch: "Dynamo does not know how to trace ... is_functorch_wrapped_tensor"). Compiled
    (TorchDynamo's trace is what is tested: backend="eager"), matvec, rmatvec and bias give the eager results on
    finite q and k and on q or k with a NaN or Inf."""
    _, _, w_v, w_o, b_v, x = _batched_qk("finite")
    # an integer mask is checked to hold only 0 and 1, which breaks the graph: fullgraph takes a bool mask
    opts = {name: value.bool() if name == "attention_mask" else value for name, value in opts.items()}

    def products(q, k, x):
        op = dk.HVOOperator.from_qk(q, k, w_v, w_o, b_v=b_v, **opts)
        return op.matvec(x), op.rmatvec(x), op.bias()

    compiled = torch.compile(products, fullgraph=True, backend="eager")
    for corrupt in ("finite", "q_nan", "k_nan", "q_inf", "k_-inf"):
        q, k = (t[1] for t in _batched_qk(corrupt)[:2])
        want = products(q, k, x)
        assert "nan" not in corrupt or want[0].isnan().any()  # a NaN logit reaches W' x' (an Inf one may be capped)
        torch.testing.assert_close(compiled(q, k, x), want, equal_nan=True, msg=corrupt)


@pytest.mark.parametrize("mask", [[0.0, float("-inf"), 0.0, 0.0], [0.0, -1e9, -1e9, 0.0], [1.0, 0.5, 1.0, 1.0]],
                         ids=["additive-inf", "additive-large", "fraction"])
def test_from_qk_refuses_a_float_mask_batched_by_vmap(mask):
    """A floating mask batched by vmap skipped the check that it holds only 0 and 1 (Python cannot read it): an
    additive mask (0 = attend) was read as a keep mask, inverted without a word, where eager refuses it."""
    q, k, w_v, w_o, _, x = _batched_qk("finite")
    masks = torch.tensor([mask] * q.shape[0])
    with pytest.raises(ValueError, match="attention_mask must hold True/1 .* under torch.func.vmap .* bool"):
        torch.func.vmap(lambda q, k, m: dk.HVOOperator.from_qk(q, k, w_v, w_o, attention_mask=m).matvec(x))(q, k, masks)


def test_from_qk_takes_an_integer_mask_batched_by_vmap():
    """Tokenizers' int64 1/0 masks batched by vmap still work: each element as without vmap."""
    q, k, w_v, w_o, _, x = _batched_qk("finite")
    masks = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1]])
    got = torch.func.vmap(lambda q, k, m: dk.HVOOperator.from_qk(q, k, w_v, w_o, attention_mask=m).matvec(x))(q, k, masks)
    want = torch.stack([dk.HVOOperator.from_qk(a, b, w_v, w_o, attention_mask=m).matvec(x) for a, b, m in zip(q, k, masks)])
    torch.testing.assert_close(got, want)

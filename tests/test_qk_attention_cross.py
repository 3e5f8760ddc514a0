"""HVOOperator.from_qk for cross-attention (q of N queries, k of N_k != N keys) against the stored-A operator of
A = softmax(scale·q kᵀ + key mask) formed densely in float64, and the options it refuses."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp, qk_cpu
from duat_kernels.linalg import gram_norms, norms

# (batch, h, h_kv, N, N_k, d, M_in, M_out): odd N, N_k above and below N, GQA and MQA
SHAPES = [(2, 4, 2, 5, 9, 3, 4, 6), (3, 3, 1, 7, 4, 2, 5, 3), (1, 2, 2, 3, 11, 4, 3, 5)]
CASES = {"plain": {}, "padded": dict(mask=True), "softcap": dict(softcap=1.5, scale=0.7),
         "padded_softcap": dict(mask=True, softcap=2.0)}


def _inputs(shape, opts, dtype, seed=0):
    batch, h, h_kv, n, n_k, d, m_in, m_out = shape
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(batch, h, n, d, generator=g, dtype=torch.float64)).to(dtype)
    k = (2 * torch.randn(batch, h_kv, n_k, d, generator=g, dtype=torch.float64)).to(dtype)
    w_v = torch.randn(h_kv * d, m_in, generator=g, dtype=torch.float64).to(dtype)
    w_o = torch.randn(m_out, h * d, generator=g, dtype=torch.float64).to(dtype)
    b_v, b_o = torch.randn(h_kv * d, generator=g, dtype=dtype), torch.randn(m_out, generator=g, dtype=dtype)
    opts = dict(opts)
    if opts.pop("mask", False):  # random encoder padding; the last batch row attends no key at all
        keep = torch.rand(batch, n_k, generator=g) < 0.6
        keep[0, 0] = True
        keep[-1] = False if batch > 1 else keep[-1]
        opts["attention_mask"] = keep
    return q, k, w_v, w_o, b_v, b_o, opts


def _dense_attention(q, k, attention_mask=None, scale=None, softcap=None):
    """softmax(scale·q kᵀ (soft-capped) + mask) in float64 (B, h, N, N_k); masked pairs and rows without keys are
    zeros."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if attention_mask is not None:
        keep = attention_mask.reshape(-1, 1, 1, k.shape[-2]).expand(s.shape)
        s = s.masked_fill(~keep, float("-inf"))
        # masked pairs are exact zeros, also in a row with a NaN logit (as in the square from_qk)
        return torch.where(keep & keep.any(-1, keepdim=True), s.softmax(-1), 0.0)
    return s.softmax(-1)


def _pair(shape, opts, dtype, layout, batched=True, seed=0):
    q, k, w_v, w_o, b_v, b_o, opts = _inputs(shape, opts, dtype, seed)
    if not batched:
        q, k = q[0], k[0]
        opts = {key: (val[0] if key == "attention_mask" else val) for key, val in opts.items()}
    attn = _dense_attention(q if batched else q[None], k if batched else k[None], **opts)
    attn = attn if batched else attn[0]
    kv = k.shape[-3]
    from_qk = dk.HVOOperator.from_qk(q, k, w_v, w_o, num_kv_heads=kv, b_v=b_v, b_o=b_o, layout=layout, **opts)
    dense = dk.HVOOperator(attn, w_v.double(), w_o.double(), num_kv_heads=kv, b_v=b_v.double(), b_o=b_o.double(),
                           layout=layout)
    return from_qk, dense


def _close(got, want, dtype):
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got.double(), want.double(), **tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_from_qk_matches_the_stored_dense_attention(shape, case, layout, dtype):
    op, dense = _pair(shape, CASES[case], dtype, layout, seed=SHAPES.index(shape))
    batch, n, n_k = shape[0], shape[3], shape[4]
    assert op.shape == dense.shape == (batch, n * shape[7], n_k * shape[6])
    assert op.source.keys == n_k and op.dims.keys == n_k
    _close(op.attn, dense.attn, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, op.shape[2], generator=g, dtype=torch.float64)
    y = torch.randn(batch, op.shape[1], generator=g, dtype=torch.float64)
    xs = torch.randn(batch, op.shape[2], 3, generator=g, dtype=torch.float64)
    _close(op.matvec(x.to(dtype)), dense.matvec(x), dtype)
    _close(op.rmatvec(y.to(dtype)), dense.rmatvec(y), dtype)
    _close(op.matmat(xs.to(dtype)), dense.matmat(xs), dtype)
    _close(op.bias(), dense.bias(), dtype)
    for per_head in (False, True):
        _close(op.contributions(x.to(dtype), per_head=per_head), dense.contributions(x, per_head=per_head), dtype)
    _close(op.block(n - 1, n_k - 1), dense.block(n - 1, n_k - 1), dtype)
    rows, cols = slice(1, op.shape[1] - 2), slice(2, op.shape[2] - 1)
    _close(op.tile(rows, cols), dense.tile(rows, cols), dtype)
    _close(op.to_dense(), dense.to_dense(), dtype)
    _close(op.block_norms(), dense.block_norms(), dtype)
    for grid in [(1, 1), (2, 3), (n, n_k), (1, n_k)]:
        _close(op.block_norms(grid=grid), dense.block_norms(grid=grid), dtype)
    _close(op.frobenius_norm(), dense.frobenius_norm(), dtype)
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n_k))
    for b in range(batch):
        _close(op.source.entries(b, pairs[:, 0], pairs[:, 1]), dense.attn[b][:, pairs[:, 0], pairs[:, 1]], dtype)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("case", ["plain", "padded"])
def test_cross_from_qk_unbatched_matches_the_stored_dense_attention(layout, case):
    op, dense = _pair(SHAPES[0], CASES[case], torch.float32, layout, batched=False)
    x = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert op.shape == dense.shape
    _close(op.rmatvec(x.float()), dense.rmatvec(x), torch.float32)
    _close(op.block_norms(grid=(2, 4)), dense.block_norms(grid=(2, 4)), torch.float32)
    _close(op.to_dense(), dense.to_dense(), torch.float32)
    got, want = (torch.as_tensor(o.singular_values(2)).double() for o in (op, dense))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_padded_batch_row_without_keys_is_a_zero_block_row():
    """The last batch row attends no key: its A, W', b' from A and norms are zeros, as for a square from_qk row
    without keys."""
    op, dense = _pair(SHAPES[1], CASES["padded"], torch.float64, "token")
    assert not op.source.key_mask[-1].any()
    assert torch.equal(op.attn[-1], torch.zeros_like(op.attn[-1]))
    assert torch.equal(op.block_norms()[-1], torch.zeros_like(op.block_norms()[-1]))
    assert torch.equal(op.to_dense()[-1], torch.zeros_like(op.to_dense()[-1]))
    torch.testing.assert_close(op.bias(), dense.bias())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where,value", [("q", float("nan")), ("q", float("inf")), ("k", float("nan")),
                                         ("k", float("-inf")), ("masked_k", float("nan"))])
def test_nan_and_inf_in_q_or_k_agree_with_the_dense_route(where, value, dtype):
    q, k, w_v, w_o, b_v, _, opts = _inputs(SHAPES[0], dict(mask=True), dtype, seed=4)
    keep = opts["attention_mask"]
    keep[0, 3], keep[0, 5] = True, False
    (q if where == "q" else k)[0, 1, 3 if where != "masked_k" else 5, 1] = value
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, b_v=b_v, **opts)
    explicit = dk.HVOOperator(op.attn, w_v, w_o, num_kv_heads=k.shape[1], b_v=b_v)
    want_nan = where != "masked_k"  # a masked key's NaN reaches no entry of A
    assert bool(op.attn.isnan().any()) == want_nan
    torch.testing.assert_close(op.attn, _dense_attention(q, k, **opts).to(dtype), equal_nan=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, op.shape[2], generator=g, dtype=dtype)
    y = torch.randn(2, op.shape[1], generator=g, dtype=dtype)
    for name, got, want in [("matvec", op.matvec(x), explicit.matvec(x)), ("rmatvec", op.rmatvec(y), explicit.rmatvec(y)),
                            ("bias", op.bias(), explicit.bias()), ("block_norms", op.block_norms(), explicit.block_norms()),
                            ("grid", op.block_norms(grid=(2, 3)), explicit.block_norms(grid=(2, 3))),
                            ("frobenius", op.frobenius_norm(), explicit.frobenius_norm()),
                            ("tile", op.tile(slice(0, 12), slice(0, 20)), explicit.tile(slice(0, 12), slice(0, 20)))]:
        assert torch.equal(got.isnan(), want.isnan()), name
        torch.testing.assert_close(got, want, equal_nan=True, msg=name)


needs_cpp = pytest.mark.skipif(not cpp.is_available(), reason="C++ extension not built: the fused q/k pass is absent")


@needs_cpp
@pytest.mark.parametrize("isa", cpp.supported_capabilities() if cpp.is_available() else [])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ["plain", "padded_softcap"])
def test_fused_cpu_pass_of_cross_attention_matches_the_dense_attention(isa, shape, case):
    """float32 CPU q/k of N_k != N keys take the fused C++ pass; its A V, Aᵀ U and ||C α||² (whole and in a grid)
    against the dense A in float64, in every ISA variant the CPU runs."""
    op, dense = _pair(shape, CASES[case], torch.float32, "token")
    src, a = op.source, dense.attn
    batch, h, h_kv, n, n_k = shape[:5]
    assert qk_cpu.handles(src) and gram_norms.qk_available(src)
    g = torch.Generator().manual_seed(3)
    values, u, c = (torch.randn(batch, h_kv, n_k, 21, generator=g), torch.randn(batch, h, n, 19, generator=g),
                    torch.randn(h, h, generator=g))
    sq = torch.einsum("ij,bjnm->binm", c.double(), a).square().sum(1)
    with cpp.using_capability(isa):
        _close(qk_cpu.mix(src, values), a @ values.double().repeat_interleave(h // h_kv, 1), torch.float32)
        _close(qk_cpu.mix_transposed(src, u), a.transpose(-1, -2) @ u.double(), torch.float32)
        _close(gram_norms.qk_squared_norms(src, c, None), sq, torch.float32)
        for grid in [(2, 3), (n, 1), (1, n_k)]:
            bins = norms._bins(n, grid[0], src.device), norms._bins(n_k, grid[1], src.device)
            _close(gram_norms.qk_squared_norms(src, c, grid, *bins), norms.grid_sums(sq, grid), torch.float32)


@needs_cpp
def test_fused_cpu_pass_refuses_query_position_masks_of_cross_attention():
    q, k, c = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 7, 3), torch.eye(2)
    out = torch.zeros(1, 5, 7)
    for opts in (dict(causal=True), dict(window=2)):
        with pytest.raises(ValueError, match=r"causal and window need k of N = 5 keys \(self-attention\), got k"):
            cpp._C.qk_gram_squared_norms(q.numpy(), k.numpy(), None, c.numpy(), out.numpy(), scale=1.0, **opts)
    with pytest.raises(ValueError, match=r"key_mask must be \(B, N_k\) = \(1, 7\), got shape \(1, 5\)"):
        cpp._C.qk_gram_squared_norms(q.numpy(), k.numpy(), torch.ones(1, 5, dtype=torch.bool).numpy(), c.numpy(),
                                     out.numpy(), scale=1.0)
    with pytest.raises(ValueError, match=r"out must be float32 \(B, N, N_k\) = \(1, 5, 7\)"):
        cpp._C.qk_gram_squared_norms(q.numpy(), k.numpy(), None, c.numpy(), torch.zeros(1, 5, 5).numpy(), scale=1.0)
    with pytest.raises(ValueError, match=r"col_bin must be a contiguous \(N_k,\) = \(7,\) vector"):
        cpp._C.qk_gram_grid_norms(q.numpy(), k.numpy(), None, c.numpy(), torch.zeros(5, dtype=torch.long).numpy(),
                                  torch.zeros(5, dtype=torch.long).numpy(),
                                  torch.zeros(1, 1, 1, dtype=torch.float64).numpy(), scale=1.0)
    with pytest.raises(ValueError, match=r"values must be \(B, h_kv, N_k, e\)"):
        cpp._C.qk_mix(q.numpy(), k.numpy(), None, torch.zeros(1, 2, 5, 4).numpy(), torch.zeros(1, 2, 5, 4).numpy(),
                      scale=1.0)


@pytest.mark.parametrize("opts,match", [
    (dict(causal=True), r"causal=True needs self-attention \(k of N = 5 keys, one per query\), got k of N_k = 9"),
    (dict(sliding_window=2), r"sliding_window=2 needs self-attention .* got k of N_k = 9 keys"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.bool)),
     r"attention_mask must be a key mask of shape \(N_k,\) = \(9,\) or \(B, N_k\) = \(2, 9\), True = attend, got \(2, 5\)"),
    (dict(attention_mask=torch.ones(5, dtype=torch.bool)), r"shape \(N_k,\) = \(9,\) .* got \(5,\)"),
])
def test_cross_from_qk_refuses_query_position_masks_and_query_length_masks(opts, match):
    q, k, w_v, w_o, *_ = _inputs(SHAPES[0], {}, torch.float32)
    with pytest.raises(ValueError, match=match):
        dk.HVOOperator.from_qk(q, k, w_v, w_o, **opts)


@pytest.mark.parametrize("k_shape,match", [
    ((2, 2, 9, 4), r"k must have shape \(h_kv, N_k, d\) or \(B, h_kv, N_k, d\) matching q \(2, 4, 5, 3\) in B and d, "
                   r"got \(2, 2, 9, 4\)"),
    ((1, 2, 9, 3), r"matching q \(2, 4, 5, 3\) in B and d, got \(1, 2, 9, 3\)"),
    ((2, 2, 0, 3), r"need N >= 1, N_k >= 1"),
])
def test_cross_from_qk_refuses_keys_of_another_head_size_or_batch(k_shape, match):
    q, _, w_v, w_o, *_ = _inputs(SHAPES[0], {}, torch.float32)
    with pytest.raises(ValueError, match=match):
        dk.HVOOperator.from_qk(q, torch.randn(k_shape), w_v, w_o)

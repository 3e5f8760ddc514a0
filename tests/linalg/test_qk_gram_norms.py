"""The fused C++ q/k pass of block_norms (logits, softmax, ||C α||², grid sums; A never written) against
the explicit A computed in float64 by QKAttention's torch path, in every ISA variant the CPU can run.

Tolerance: relative 1e-4 (the issue's bar) per entry, with an absolute floor of 1e-6 x the largest norm
for entries where C α nearly cancels. The float32 pass differs from float64 by the rounding of the
logits (d-term float32 dot products, ~1e-6 relative) and of the softmax, ~1e-6 in practice."""

from __future__ import annotations

import math

import pytest
import torch

from duat_kernels import cpp
from duat_kernels.linalg import gram_norms, norms
from duat_kernels.qk_attention import QKAttention

from conftest import qk_sources

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")

CAPABILITIES = cpp.supported_capabilities()


def _layer(batch, heads, kv_heads, tokens, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
    w_v = torch.randn(kv_heads * head_dim, 24, generator=g) / 5
    w_o = torch.randn(24, heads * head_dim, generator=g) / 5
    return q, k, w_v, w_o


CASES = {  # batch, h, h_kv, N, d, options
    "full": (1, 4, 4, 37, 16, {}),
    "one_token": (1, 1, 1, 1, 3, dict(causal=True)),
    "two_tokens": (2, 2, 1, 2, 5, {}),
    "causal_gqa": (2, 6, 2, 53, 24, dict(causal=True)),
    "causal_padding": (2, 6, 3, 53, 64, dict(causal=True, mask=True)),
    "window_padding": (2, 4, 2, 45, 8, dict(mask=True, sliding_window=5)),
    "causal_window_softcap": (1, 4, 2, 71, 64, dict(causal=True, softcap=2.0, sliding_window=9)),
    "long_rows": (1, 3, 1, 301, 128, dict(causal=True)),
    "fully_masked_batch": (2, 2, 2, 19, 4, dict(mask="none")),
}


def _sources(case):
    batch, h, h_kv, n, d, opts = CASES[case]
    g = torch.Generator().manual_seed(0)
    fused, exact = qk_sources(batch, h, h_kv, n, d, opts, generator=g)
    w_v = torch.randn(h_kv * d, 24, generator=g) / 5
    w_o = torch.randn(24, h * d, generator=g) / 5
    return fused, exact, w_v, w_o, h_kv


@pytest.mark.parametrize("isa", CAPABILITIES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grid", [None, (5, 3)])
def test_fused_pass_equals_explicit_attention(isa, case, grid):
    fused, exact, w_v, w_o, h_kv = _sources(case)
    assert gram_norms.qk_available(fused)
    with cpp.using_capability(isa):
        got = norms.block_norms(fused, w_v, w_o, h_kv, grid)
    want = norms.block_norms(exact.dense(), w_v.double(), w_o.double(), h_kv, grid)  # torch, float64, stored A
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    if grid is None and exact.empty_rows is not None:  # rows that attend no key are exact zero rows
        assert (got[exact.empty_rows] == 0).all()


def test_grid_cells_sum_their_rows():
    """A grid cell is the root of the summed squares of the full pass's entries in it."""
    fused, _, w_v, w_o, h_kv = _sources("causal_gqa")
    full = norms.block_norms(fused, w_v, w_o, h_kv).double()
    grid = norms.block_norms(fused, w_v, w_o, h_kv, (4, 7)).double()
    n = fused.tokens
    rows, cols = torch.arange(n) * 4 // n, torch.arange(n) * 7 // n
    want = torch.zeros(full.shape[0], 4, 7, dtype=torch.float64)
    for b in range(full.shape[0]):
        want[b].index_put_((rows[:, None].expand(n, n), cols[None].expand(n, n)), full[b].square(), accumulate=True)
    torch.testing.assert_close(grid, want.sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("isa", CAPABILITIES)
def test_vector_exp(isa):
    """Relative error <= 4e-7 (a few ulp) over the whole float range, exp(-inf) = +0, NaN stays NaN."""
    x = torch.cat([torch.linspace(-110, 90, 20011), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.72, -87.4, -103.9,
                                                                  -104.0, float("-inf"), float("inf"), float("nan")])])
    y = torch.empty_like(x)
    with cpp.using_capability(isa):
        cpp._C.vector_exp(x.numpy(), y.numpy())
    want = x.double().exp()
    normal = (want >= torch.finfo(torch.float32).tiny) & (want <= torch.finfo(torch.float32).max)
    assert ((y.double()[normal] - want[normal]).abs() / want[normal]).max() <= 4e-7
    sub = (want < torch.finfo(torch.float32).tiny) & (want > 0)  # subnormal results: absolute error of a few ulp
    assert ((y.double()[sub] - want[sub]).abs() <= 4 * 2.0 ** -149).all()
    assert y[x == float("-inf")].item() == 0.0 and y[x == -104.0].item() == 0.0
    assert math.isinf(y[x == float("inf")].item()) and math.isnan(y[-1].item())
    assert y[(x > 88.72) & (x < 88.73)].isfinite().all()


def test_nan_inputs_use_the_direct_path():
    """A NaN in q reaches the norms of its row only (through _block_norms_direct, not the fused pass)."""
    q, k, w_v, w_o = _layer(2, 2, 2, 9, 4)
    q[0, 1, 5, 2] = float("nan")
    got = norms.block_norms(QKAttention(q, k, causal=True), w_v, w_o, 2)
    assert got[0, 5, :6].isnan().all() and got[0, :5].isfinite().all() and got[1].isfinite().all()


def test_bad_buffers_are_rejected():
    q, k, _, _ = _layer(1, 4, 2, 10, 8)
    c, out = torch.eye(4), torch.zeros(1, 10, 10)
    call = cpp._C.qk_gram_squared_norms
    with pytest.raises(ValueError, match="k must be"):
        call(q.numpy(), k[..., :7].contiguous().numpy(), None, c.numpy(), out.numpy(), scale=1.0)  # N_k != N is cross-attention
    with pytest.raises(ValueError, match="multiple"):
        call(q.numpy(), torch.zeros(1, 3, 10, 8).numpy(), None, c.numpy(), out.numpy(), scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        call(q.double().numpy(), k.numpy(), None, c.numpy(), out.numpy(), scale=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        call(q.transpose(2, 3).numpy(), k.numpy(), None, c.numpy(), out.numpy(), scale=1.0)
    with pytest.raises(ValueError, match="key_mask must be"):
        call(q.numpy(), k.numpy(), torch.ones(2, 10, dtype=torch.bool).numpy(), c.numpy(), out.numpy(), scale=1.0)
    with pytest.raises(ValueError, match="softcap"):
        call(q.numpy(), k.numpy(), None, c.numpy(), out.numpy(), scale=1.0, softcap=-1.0)
    with pytest.raises(ValueError, match="out must be"):
        call(q.numpy(), k.numpy(), None, c.numpy(), torch.zeros(1, 10, 9).numpy(), scale=1.0)
    bins = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="col_bin"):
        cpp._C.qk_gram_grid_norms(q.numpy(), k.numpy(), None, c.numpy(), bins.numpy(), (bins + 3).numpy(),
                                  torch.zeros(1, 2, 2, dtype=torch.float64).numpy(), scale=1.0)

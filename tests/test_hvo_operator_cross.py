"""HVOOperator of a cross-attention A (N queries over N_k != N keys) against the dense W', and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import duat_kernels as dk

from conftest import random_layer

N, N_K, M_IN, M_OUT = 3, 5, 4, 6


def _operator(layout: str, batched: bool, grad: bool = False, dtype=torch.float64, **kw):
    lay = random_layer(2, 6, 2, N, head_dim=2, m_in=M_IN, m_out=M_OUT, keys=N_K, batched=batched, dtype=dtype, **kw)
    attn = lay["attn"].clone().requires_grad_(grad)
    op = dk.HVOOperator(attn, lay["w_v"], lay["w_o"], num_kv_heads=2, b_v=lay["b_v"], b_o=lay["b_o"], layout=layout)
    with torch.no_grad():
        dense = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout, backend="reference")
    return op, dense, lay


def _blocks(dense: torch.Tensor, layout: str) -> torch.Tensor:
    """The token-layout blocks (..., N, M_out, N_k, M_in) of a dense W' in either layout."""
    lead = dense.shape[:-2]
    if layout == "token":
        return dense.reshape(*lead, N, M_OUT, N_K, M_IN)
    return dense.reshape(*lead, M_OUT, N, M_IN, N_K).transpose(-4, -3).transpose(-2, -1)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("batched", [True, False])
def test_products_and_parts_match_dense(layout, batched):
    op, dense, lay = _operator(layout, batched)
    assert op.shape == tuple(dense.shape) == ((2,) if batched else ()) + (N * M_OUT, N_K * M_IN)
    lead = (2,) if batched else ()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, N_K * M_IN, generator=g, dtype=torch.float64)
    y = torch.randn(*lead, N * M_OUT, generator=g, dtype=torch.float64)
    xs = torch.randn(*lead, N_K * M_IN, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(x), (dense @ x[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.rmatvec(y), (dense.mT @ y[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.matmat(xs), dense @ xs, rtol=1e-12, atol=1e-12)
    x_matrix = torch.randn(*lead, N_K, M_IN, generator=g, dtype=torch.float64)  # X as (N_k, M_in) rows of tokens
    want = torch.einsum("...ncma,...ma->...nc", _blocks(dense, layout), x_matrix)  # Y as (N, M_out)
    torch.testing.assert_close(op.matvec(x_matrix), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.bias(), dk.hvo_bias(lay["attn"], lay["w_o"], lay["b_v"], lay["b_o"], num_kv_heads=2,
                                                      layout=layout))
    tiles = [(slice(0, None), slice(0, None)), (slice(4, 17), slice(3, 19)), (slice(17, None), slice(None, 1))]
    for rows, cols in tiles:
        torch.testing.assert_close(op.tile(rows, cols), dense[..., rows, cols], rtol=1e-12, atol=1e-12)
    blocks = _blocks(dense, layout)
    torch.testing.assert_close(op.block(2, 4), blocks[..., 2, :, 4, :], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.block(-1, -5), blocks[..., 2, :, 0, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])  # True: the torch path of the norms (autograd records)
def test_norms_and_contributions_match_dense(layout, dtype, grad):
    op, dense, lay = _operator(layout, True, grad=grad, dtype=dtype)
    blocks = _blocks(dense.double(), layout)
    norms = blocks.square().sum((-3, -1))  # (B, N, N_k) squared
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.block_norms().double(), norms.sqrt(), **tol)
    grid = op.block_norms(grid=(2, 4)).double()
    rows, cols = (torch.arange(N) * 2) // N, (torch.arange(N_K) * 4) // N_K  # the super-block of each token
    want = torch.zeros(2, 2, 4, dtype=torch.float64).index_put_(
        (torch.arange(2)[:, None, None], rows[None, :, None], cols[None, None, :]), norms, accumulate=True)
    torch.testing.assert_close(grid, want.sqrt(), **tol)
    torch.testing.assert_close(op.frobenius_norm(), dense.double().norm(dim=(-2, -1)), **tol)
    x = torch.randn(2, N_K, M_IN, dtype=dtype, generator=torch.Generator().manual_seed(2))
    per_input = torch.einsum("bncma,bma->bncm", blocks, x.double()).norm(dim=2)  # ||W'_nm x_m||
    torch.testing.assert_close(op.contributions(x).double(), per_input, **tol)


def test_singular_values_and_sampled_entries():
    op, dense, _ = _operator("token", False)
    want = np.linalg.svd(dense.numpy(), compute_uv=False)
    np.testing.assert_allclose(op.singular_values(3), want[:3], rtol=1e-6)
    assert op.spectral_norm() == pytest.approx(want[0], rel=1e-6)
    est = op.fraction_above(0.05, samples=20000)
    exact = float((dense.abs() > 0.05).double().mean())
    assert est.low - 0.01 <= exact <= est.high + 0.01


def test_square_only_methods_refuse_rectangular_attention():
    op, _, lay = _operator("token", True)
    q, k = torch.randn(2, 6, N, 2, dtype=torch.float64), torch.randn(2, 2, N_K, 2, dtype=torch.float64)
    for rect in (op, dk.HVOOperator.from_qk(q, k, lay["w_v"], lay["w_o"])):  # q/k: tests/test_qk_attention_cross.py
        with pytest.raises(ValueError, match=r"trace needs a square W', but A is 3 x 5 \(cross-attention"):
            rect.trace()


@pytest.mark.parametrize("call,message", [
    (lambda op: op.matvec(torch.randn(2, N * M_IN)), r"x must have last dimension N_k\*M = 5\*4 = 20"),
    (lambda op: op.rmatvec(torch.randn(2, N_K * M_OUT)), r"y must have last dimension N\*M = 3\*6 = 18"),
    (lambda op: op.block(3, 0), r"n=3 is out of range for N=3 tokens"),
    (lambda op: op.block(0, 5), r"m=5 is out of range for N_k=5 keys"),
    (lambda op: op.block_norms(grid=(4, 2)), r"grid must be \(R, C\) with R in \[1, N=3\] and C in \[1, N_k=5\]"),
    (lambda op: op.block_norms(grid=(1, 6)), r"grid must be \(R, C\) with R in \[1, N=3\] and C in \[1, N_k=5\]"),
    (lambda op: op.contributions(torch.randn(2, N, M_IN)), r"x must have last dimension N_k\*M = 5\*4 = 20"),
])
def test_bad_arguments_name_the_side(call, message):
    op, _, _ = _operator("token", True)
    with pytest.raises((ValueError, IndexError), match=message):
        call(op)

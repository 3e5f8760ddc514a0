"""contributions against the dense W' blocks and against the module's own value vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import duat_kernels as dk
from duat_kernels.linalg import norm_contributions as contrib

from conftest import random_layer


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 4), (6, 2)])
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("batched", [True, False])
def test_contributions_are_dense_blocks_times_tokens(heads, kv_heads, layout, batched, monkeypatch):
    monkeypatch.setattr(contrib, "CHUNK_ENTRIES", 40)  # several row chunks even at this size
    lay = random_layer(2, heads, kv_heads, tokens=7, head_dim=3, m_in=5, m_out=4, causal=True, batched=batched,
                       dtype=torch.float64)
    n, m_in, m_out = 7, 5, 4
    x = torch.randn(*((2,) if batched else ()), n, m_in, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads, layout=layout)
    w = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads, backend="reference")
    blocks = w.reshape(*w.shape[:-2], n, m_out, n, m_in).transpose(-3, -2)  # (..., n, m, M_out, M_in)
    expected = (blocks @ x.unsqueeze(-3).unsqueeze(-1)).squeeze(-1).norm(dim=-1)  # ||B_nm x_m||
    torch.testing.assert_close(op.contributions(x), expected, rtol=1e-10, atol=1e-12)
    flat = x.reshape(*x.shape[:-2], -1) if layout == "token" else x.transpose(-1, -2).reshape(*x.shape[:-2], -1)
    torch.testing.assert_close(op.contributions(flat), expected, rtol=1e-10, atol=1e-12)


def test_contributions_match_module_value_vectors():
    # Independent route: nn.MultiheadAttention's own value projection, mixed by A, per head.
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True).double().eval()
    x = torch.randn(1, 6, 12, dtype=torch.float64)
    _, attn = mha(x, x, x, need_weights=True, average_attn_weights=False)
    e = 12
    w_v, w_o = mha.in_proj_weight[2 * e:].detach(), mha.out_proj.weight.detach()
    values = (x[0] @ w_v.T).reshape(6, 3, 4)  # (m, head, d), without b_v
    per_pair = torch.einsum("inm,mid->nmid", attn[0].detach(), values)  # A_i[n, m] v_i[m]
    projected = torch.einsum("nmid,cid->nmic", per_pair, w_o.reshape(12, 3, 4))
    op = dk.HVOOperator(attn[0].detach(), w_v, w_o)
    torch.testing.assert_close(op.contributions(x[0]), projected.sum(2).norm(dim=-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.contributions(x[0], per_head=True), projected.norm(dim=-1).permute(2, 0, 1),
                               rtol=1e-10, atol=1e-12)


def test_contributions_rejects_wrong_shape():
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=2, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(ValueError, match=r"x must have last dimension N\*M = 3\*4 = 12"):
        op.contributions(torch.zeros(13))


@pytest.mark.parametrize("per_head,shape", [(False, r"\(1, 1024, 1024\)"), (True, r"\(1, 2, 1024, 1024\)")])
def test_contributions_that_cannot_fit_are_refused_before_allocating(per_head, shape, monkeypatch):
    # The (B, N, N) result was allocated unchecked (from q and k, A itself is never stored): the
    # allocator's raw RuntimeError for long sequences; now DenseTooLargeError naming the size.
    from duat_kernels import _memory

    monkeypatch.setattr(_memory, "available_memory", lambda device: 1 << 20)
    q, k = torch.randn(2, 1024, 1), torch.randn(2, 1024, 1)
    op = dk.HVOOperator.from_qk(q, k, torch.randn(2, 3), torch.randn(3, 2), causal=True)
    with pytest.raises(dk.DenseTooLargeError, match=f"contributions of shape {shape} needs .* but only 1.0 MiB"):
        op.contributions(torch.randn(1024, 3), per_head=per_head)


@pytest.mark.parametrize("flag", ["no", "False", torch.tensor(True), None])
def test_per_head_must_be_a_bool(flag):
    # per_head="no" (truthy) silently gave the per-head (h, N, N) result instead of (N, N)
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=2, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(TypeError, match="per_head must be True or False, got"):
        op.contributions(torch.zeros(3, 4), per_head=flag)
    assert op.contributions(torch.zeros(3, 4), per_head=np.bool_(True)).shape == (2, 3, 3)


@pytest.mark.parametrize("x,exc,message", [
    (lambda: [[0.0] * 4] * 3, TypeError, "x must be a torch.Tensor, got list"),  # 'list' has no attribute 'shape'
    (lambda: torch.zeros(1, 3, 4, dtype=torch.int64), TypeError, "x must have a floating-point dtype"),
    (lambda: torch.zeros(1, 3, 4).to_sparse(), TypeError, "x must be a dense"),
])
def test_contributions_called_directly_checks_x(x, exc, message):
    """linalg.contributions (public) took x unchecked: a list failed with "'list' object has no attribute
    'shape'", a sparse x inside torch, and integer tokens were taken where HVOOperator.contributions
    refuses them."""
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=2)
    with pytest.raises(exc, match=message):
        contrib.contributions(lay["attn"], x(), lay["w_v"], lay["w_o"], 2)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("empty", ["m_in", "m_out"])
def test_contributions_of_empty_blocks_are_zero_with_non_finite_factors(empty, per_head):
    """W'_nm x_m is an empty vector (M_out = 0) or an empty sum (M_in = 0): its norm is 0, as the
    dense W' (which has no entries to hold the NaN) says. The Gram form gave NaN: α NaN times a
    zero G_m, or Wo (NaN) times the empty sum Wv x_m."""
    lay = random_layer(1, 2, tokens=3, m_in=0 if empty == "m_in" else 2, m_out=0 if empty == "m_out" else 2,
                       batched=False, dtype=torch.float64)
    attn, w_o = lay["attn"].clone(), lay["w_o"].clone()
    attn[0, 1, 0] = float("nan")
    if w_o.numel():
        w_o[0, 0] = float("inf")
    op = dk.HVOOperator(attn, lay["w_v"], w_o)
    x = torch.randn(3 * lay["w_v"].shape[1], dtype=torch.float64)
    w = op.to_dense()
    blocks = w.reshape(3, w.shape[0] // 3, 3, w.shape[1] // 3).transpose(1, 2)
    expected = (blocks @ x.reshape(3, -1).unsqueeze(-1)).squeeze(-1).norm(dim=-1)  # zeros: no entries
    got = op.contributions(x, per_head=per_head)
    assert torch.equal(got, expected.expand(2, 3, 3) if per_head else expected)


def test_contributions_are_differentiable():
    # contributions ran under torch.no_grad (no grad_fn, zeros under torch.func.jacrev); causal zeros of A
    # give zero contributions, whose gradient is 0 (the subgradient), not NaN
    lay = random_layer(1, 4, 2, tokens=4, head_dim=2, m_in=3, m_out=3, causal=True, batched=False,
                       dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (lay["attn"], lay["w_v"], lay["w_o"], x))

    def contributions(a, wv, wo, xx):
        return dk.HVOOperator(a, wv, wo, num_kv_heads=2).contributions(xx)

    def dense(a, wv, wo, xx):  # ||W'_nm x_m|| from the dense blocks
        blocks = dk.hvo_matrix(a, wv, wo, num_kv_heads=2, backend="reference").reshape(4, 3, 4, 3)
        return torch.linalg.vector_norm(torch.einsum("ncma,ma->nmc", blocks, xx), dim=-1)

    weight = torch.rand(4, 4, dtype=torch.float64)
    got, want = contributions(*inputs), dense(*inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad((got * weight).sum(), inputs), torch.autograd.grad((want * weight).sum(),
                                                                                               inputs)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)


def test_float64_recompute_of_contributions_is_refused_before_allocating(monkeypatch):
    # A stored A far above 1 overflows the float32 squares of finite factors, and contributions computes them
    # again in float64: twice the memory of the float32 pass, which check_fits had admitted, allocated unchecked.
    from duat_kernels import _memory

    lay = random_layer(1, 2, tokens=6, m_in=4, m_out=3)
    attn, x = lay["attn"] * 1e25, torch.randn(1, 6, 4)
    op = dk.HVOOperator(attn, lay["w_v"], lay["w_o"])
    want = dk.HVOOperator(attn.double(), lay["w_v"].double(), lay["w_o"].double()).contributions(x.double())
    assert bool(want.isfinite().all())
    float32_bytes = 4 * (2 * 6 * 3 + 6 * 6 + 6 * 2 * 2)  # u (B, h, N, M_out), the result and G_m
    monkeypatch.setattr(_memory, "available_memory", lambda device: float32_bytes)
    with pytest.raises(dk.DenseTooLargeError, match="recomputed in float64 .* but only"):
        op.contributions(x)
    monkeypatch.setattr(_memory, "available_memory", lambda device: 1 << 30)
    torch.testing.assert_close(op.contributions(x).double(), want, rtol=2e-5, atol=0)


@pytest.mark.parametrize("per_head", [False, True], ids=["total", "per_head"])
@pytest.mark.parametrize("source", ["attn", "qk"])
def test_contributions_compile_with_fullgraph(source, per_head):
    # the memory check read /proc/meminfo inside the trace: "Dynamo does not know how to trace builtin operator
    # `open`"; traced, it is skipped (a compiled graph allocates at run time), as block_norms' and tile's are
    lay = random_layer(2, 4, 2, tokens=5, head_dim=2, m_in=3, m_out=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=g)
    q, k = torch.randn(2, 4, 5, 2, generator=g), torch.randn(2, 2, 5, 2, generator=g)

    def contributions(a, b, wv, wo, x):
        op = (dk.HVOOperator(a, wv, wo, num_kv_heads=2) if source == "attn"
              else dk.HVOOperator.from_qk(a, b, wv, wo, causal=True))
        return op.contributions(x, per_head)

    args = (lay["attn"], None) if source == "attn" else (q, k)
    compiled = torch.compile(contributions, fullgraph=True, backend="eager")  # TorchDynamo's trace is what is tested
    torch.testing.assert_close(compiled(*args, lay["w_v"], lay["w_o"], x), contributions(*args, lay["w_v"], lay["w_o"], x))


def test_float64_attention_far_above_one_gives_finite_contributions():
    # a stored float64 A times 1e200: Inf (float64 squares of α) where W'_nm x_m is finite
    g = torch.Generator().manual_seed(0)
    attn, w_v, w_o = (torch.rand(2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                      dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64))
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    big = dk.HVOOperator(attn * 1e200, w_v, w_o).contributions(x)
    torch.testing.assert_close(big / 1e200, dk.HVOOperator(attn, w_v, w_o).contributions(x), rtol=1e-14, atol=0)

"""Block norms, frobenius_norm and contributions of attention with tiny entries (softmax tails below ~1e-19) do not
vanish, in the fused C++ passes and in the torch paths.

Their float32 squares lose bits below ~2^-126 and vanish below 2^-149 (entries of A ~1e-25 gave norms of exactly
0); the row pass recomputes those columns in float64 (csrc/kernels/gram_rows.cpp), the torch paths scale those
columns by powers of two (linalg.norm_scaling.scaled_up). A stored A scaled by s must give s times the norms of
the unscaled A, in every ISA variant the CPU can run and on every path; q/k logits with gaps up to ~60 (products
~1e-26) must give the float64 norms."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp
from duat_kernels.linalg import gram_norms

needs_cpp = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")

CAPABILITIES = cpp.supported_capabilities()
RTOL = 1e-5  # float32 rounding of the norms (the tiny ones are formed in float64)


def _stored_layer(causal: bool):
    g = torch.Generator().manual_seed(0)
    batch, h, n, d, m = 2, 4, 70, 8, 24  # 70 columns: whole SIMD column groups and a scalar tail
    logits = torch.randn(batch, h, n, n, generator=g)
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    w_v = torch.randn(h * d, m, generator=g) / 5
    w_o = torch.randn(m, h * d, generator=g) / 5
    x = torch.randn(batch, n, m, generator=g)
    return logits.softmax(-1), w_v, w_o, x


@needs_cpp
@pytest.mark.parametrize("isa", CAPABILITIES)
@pytest.mark.parametrize("scale", [1e-25, 1e-19])
@pytest.mark.parametrize("causal", [False, True])
def test_stored_attention_scaled_to_tiny_gives_scaled_norms(isa, scale, causal):
    attn, w_v, w_o, _ = _stored_layer(causal)
    with cpp.using_capability(isa):
        ordinary, tiny = dk.HVOOperator(attn, w_v, w_o), dk.HVOOperator(attn * scale, w_v, w_o)
        for grid in (None, (5, 3)):
            expected = ordinary.block_norms(grid=grid).double() * scale
            torch.testing.assert_close(tiny.block_norms(grid=grid).double(), expected, rtol=RTOL, atol=0)
        torch.testing.assert_close(tiny.frobenius_norm().double(), ordinary.frobenius_norm().double() * scale,
                                   rtol=RTOL, atol=0)


def _tiny_tail_qk():
    """q, k (1, 3, 70, 1) whose logits q_n k_m (scale 1, exact in float32) put the first 35 keys within 10 of the
    row maximum and the others 56 to 62 below it in every head: probabilities ~1e-25 to 1e-27 there."""
    g = torch.Generator().manual_seed(1)
    n, h = 70, 3
    gaps = torch.cat([torch.randint(0, 160, (35,), generator=g), torch.randint(896, 992, (35,), generator=g)]) / 16
    gaps[0] = 0
    k = -(gaps + torch.randint(0, 3, (h, n), generator=g) / 16)  # multiples of 1/16: exact products with q
    q = torch.ones(1, h, n, 1)
    return q, k.reshape(1, h, n, 1)


@needs_cpp
@pytest.mark.parametrize("isa", CAPABILITIES)
@pytest.mark.parametrize("causal", [False, True])
def test_qk_tiny_probabilities_give_float64_norms(isa, causal):
    q, k = _tiny_tail_qk()
    g = torch.Generator().manual_seed(2)
    w_v, w_o = torch.randn(3, 16, generator=g) / 5, torch.randn(16, 3, generator=g) / 5
    exact = dk.HVOOperator.from_qk(q.double(), k.double(), w_v.double(), w_o.double(), causal=causal, scale=1.0)
    with cpp.using_capability(isa):
        fused = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=causal, scale=1.0)
        for grid in (None, (5, 3)):  # the last column super-block holds tiny probabilities only
            expected = exact.block_norms(grid=grid)
            assert (expected > 0).any() and (expected[expected > 0] < 1e-20).any()
            torch.testing.assert_close(fused.block_norms(grid=grid).double(), expected, rtol=RTOL, atol=0)
        torch.testing.assert_close(fused.frobenius_norm().double(), exact.frobenius_norm(), rtol=RTOL, atol=0)


# The torch paths: ||C α|| over row chunks of a stored A (no C++ pass: CUDA, 16-bit A, extension not built), the C++
# row pass and the torch chunks over q/k row blocks (no fused q/k pass: logits that could overflow float32), and
# autograd's αᵀGα on the whole A.
STORED_PATHS = ["chunks", "autograd"]
QK_PATHS = ["qk_rows", "qk_chunks", "qk_autograd"]


def _force_path(path: str, monkeypatch) -> None:
    if path in ("chunks", "qk_chunks", "qk_rows"):
        monkeypatch.setattr(gram_norms, "qk_available", lambda source: False)
    if path in ("chunks", "qk_chunks"):
        monkeypatch.setattr(gram_norms, "available", lambda source: False)


def _assert_scaled(tiny: torch.Tensor, ordinary: torch.Tensor, scale: float) -> None:
    assert tiny.dtype == ordinary.dtype
    assert (ordinary > 0).any()
    torch.testing.assert_close(tiny.detach().double(), ordinary.detach().double() * scale, rtol=RTOL, atol=0)


@pytest.mark.parametrize("path", STORED_PATHS)
@pytest.mark.parametrize("scale", [1e-19, 1e-25, 1e-30])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_paths_scaled_to_tiny_give_scaled_norms(path, scale, causal, monkeypatch):
    # the float32 squares of ||C α|| (chunks) or the products α_i G_ij α_j (autograd) vanished: norms of exactly 0
    _force_path(path, monkeypatch)
    attn, w_v, w_o, _ = _stored_layer(causal)
    tiny_attn = attn * scale
    ordinary = dk.HVOOperator(attn.requires_grad_(path == "autograd"), w_v, w_o)
    tiny = dk.HVOOperator(tiny_attn.requires_grad_(path == "autograd"), w_v, w_o)
    for grid in (None, (5, 3)):
        _assert_scaled(tiny.block_norms(grid=grid), ordinary.block_norms(grid=grid), scale)
    _assert_scaled(tiny.frobenius_norm(), ordinary.frobenius_norm(), scale)


@pytest.mark.parametrize("grid", [None, (5, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("causal", [False, True])
def test_autograd_gradients_of_tiny_attention(grid, causal):
    # block norms are homogeneous of degree 1 in A: the gradient in A at s·A is the one at A, in w_v s times it
    # (the vanished squares gave gradients of 0)
    attn, w_v, w_o, _ = _stored_layer(causal)
    scale = 1e-25
    grads = []
    for a in (attn, attn * scale):
        a, w = a.clone().requires_grad_(), w_v.clone().requires_grad_()
        grads.append(torch.autograd.grad(dk.HVOOperator(a, w, w_o).block_norms(grid=grid).sum(), (a, w)))
    (attn_grad, w_grad), (tiny_attn_grad, tiny_w_grad) = grads
    for got, want in ((tiny_attn_grad, attn_grad), (tiny_w_grad / scale, w_grad)):
        assert bool(want.abs().max() > 0)
        # atol: entries cancelled far below the largest keep their float32 rounding of the largest
        torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


@pytest.mark.parametrize("path", ["rows", "autograd"])
@pytest.mark.parametrize("scale", [1e-19, 1e-25, 1e-30])
@pytest.mark.parametrize("causal", [False, True])
def test_contributions_of_tiny_attention_are_scaled(path, scale, causal):
    # ||Σ_i α_i u_i[m]||² = αᵀ G_m α formed in float32 vanished for α ~1e-25 (per head: |α_i|·||u_i[m]||, no squares)
    attn, w_v, w_o, x = _stored_layer(causal)
    ordinary = dk.HVOOperator(attn.requires_grad_(path == "autograd"), w_v, w_o)
    tiny = dk.HVOOperator((attn * scale).requires_grad_(path == "autograd"), w_v, w_o)
    for per_head in (False, True):
        _assert_scaled(tiny.contributions(x, per_head), ordinary.contributions(x, per_head), scale)


@pytest.mark.parametrize("path", QK_PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_qk_torch_paths_tiny_probabilities_give_float64_norms(path, causal, monkeypatch):
    # the C++ row pass wrote float32 squares for grid=None, the torch chunks and autograd formed float32 squares
    if path == "qk_rows" and not cpp.is_available():
        pytest.skip(f"C++ extension not built: {cpp.IMPORT_ERROR}")
    _force_path(path, monkeypatch)
    q, k = _tiny_tail_qk()
    g = torch.Generator().manual_seed(2)
    w_v, w_o = torch.randn(3, 16, generator=g) / 5, torch.randn(16, 3, generator=g) / 5
    exact = dk.HVOOperator.from_qk(q.double(), k.double(), w_v.double(), w_o.double(), causal=causal, scale=1.0)
    op = dk.HVOOperator.from_qk(q.requires_grad_(path == "qk_autograd"), k, w_v, w_o, causal=causal, scale=1.0)
    for grid in (None, (5, 3)):  # the last column super-block holds tiny probabilities only
        expected = exact.block_norms(grid=grid)
        assert (expected > 0).any() and (expected[expected > 0] < 1e-20).any()
        torch.testing.assert_close(op.block_norms(grid=grid).detach().double(), expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(op.frobenius_norm().detach(), exact.frobenius_norm(), rtol=RTOL, atol=0)

"""Block norms of attention with tiny entries (softmax tails below ~1e-19) do not vanish in the fused C++ passes.

Their float32 squares lose bits below ~2^-126 and vanish below 2^-149 (entries of A ~1e-25 gave norms of exactly
0); the row pass recomputes those columns in float64 (csrc/kernels/gram_rows.cpp). A stored A scaled by s must give
s times the norms of the unscaled A, in every ISA variant the CPU can run; q/k logits with gaps up to ~60 (products
~1e-26) must give the float64 norms."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")

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

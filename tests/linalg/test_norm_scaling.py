"""Norms of float32 factors whose squares leave float32's range (linalg.norm_scaling) against float64: block_norms
on every path, frobenius_norm, trace and contributions, with huge and tiny weights, a huge stored A and a huge x."""

from __future__ import annotations

import math

import pytest
import torch

import duat_kernels as dk
from duat_kernels.linalg import gram_norms, norm_scaling
from duat_kernels.linalg import norms as bn

from conftest import random_layer

RTOL = 2e-5  # float32 norms against float64 ones: a few float32 roundings of h-term sums

# Block-norm paths: the fused C++ pass over a stored A, the torch pass over its row chunks (where the C++ pass is
# not available: CUDA, 16-bit A), the fused q/k pass, the C++ pass over q/k row blocks, and autograd's torch path.
PATHS = ["fused", "chunks", "qk", "qk_rows", "autograd"]


def _operators(path: str, w_scale: float, attn_scale: float = 1.0, wo_scale: float | None = None,
               monkeypatch=None) -> tuple[dk.HVOOperator, dk.HVOOperator]:
    """The same layer in float32 and float64 (the float32 numbers widened), weights times w_scale (w_o times
    wo_scale when given), a stored A times attn_scale."""
    lay = random_layer(2, 4, 2, tokens=9, head_dim=3, m_in=6, m_out=6, causal=True)
    w_v = (lay["w_v"].double() * w_scale).float()
    w_o = (lay["w_o"].double() * (w_scale if wo_scale is None else wo_scale)).float()
    if path == "chunks":
        monkeypatch.setattr(gram_norms, "available", lambda source: False)
    if path == "qk_rows":
        monkeypatch.setattr(gram_norms, "qk_available", lambda source: False)
    if path.startswith("qk"):
        g = torch.Generator().manual_seed(1)
        q, k = torch.randn(2, 4, 9, 3, generator=g), torch.randn(2, 2, 9, 3, generator=g)
        return (dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True),
                dk.HVOOperator.from_qk(q.double(), k.double(), w_v.double(), w_o.double(), causal=True))
    attn = (lay["attn"].double() * attn_scale).float()
    return (dk.HVOOperator(attn, w_v.requires_grad_(path == "autograd"), w_o, num_kv_heads=2),
            dk.HVOOperator(attn.double(), w_v.detach().double(), w_o.double(), num_kv_heads=2))


def _assert_float32_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    assert bool(want.isfinite().all()) and float(want.abs().max()) < torch.finfo(torch.float32).max
    torch.testing.assert_close(got.detach().double(), want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("w_scale,wo_scale", [(1e10, None), (1e-12, None), (1e25, 1e-20)],
                         ids=["huge", "tiny", "huge_w_v_tiny_w_o"])
def test_block_norms_of_huge_and_tiny_weights(path, grid, w_scale, wo_scale, monkeypatch):
    # squares of norms ~6e20 overflowed float32 (inf, from finite norms far below 3.4e38), those of ~1e-23
    # underflowed to 0; w_v 1e25 and w_o 1e-20 give ordinary norms but overflowed the torch path's float32 Gram
    op, op64 = _operators(path, w_scale, wo_scale=wo_scale, monkeypatch=monkeypatch)
    want = op64.block_norms(grid)
    assert float(want.max()) > 0
    _assert_float32_close(op.block_norms(grid), want)


@pytest.mark.parametrize("path", ["fused", "chunks", "autograd"])
@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
def test_block_norms_of_a_huge_stored_attention(path, grid, monkeypatch):
    # a stored A is not always probabilities: entries of 1e25 squared overflowed float32 (the float64 pass instead)
    op, op64 = _operators(path, 1.0, attn_scale=1e25, monkeypatch=monkeypatch)
    _assert_float32_close(op.block_norms(grid), op64.block_norms(grid))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("w_scale", [1e10, 1e-12, 1e20], ids=["huge", "tiny", "beyond_float32"])
def test_frobenius_norm_and_trace_in_float64(path, w_scale, monkeypatch):
    # frobenius_norm is float64: it was inf for norms far below float64's range (the float32 squares, then the
    # float32 root); for weights of 1e20 the norm itself (~1e40) exceeds float32, not float64
    op, op64 = _operators(path, w_scale, monkeypatch=monkeypatch)
    got, want = op.frobenius_norm(), op64.frobenius_norm()
    assert got.dtype == torch.float64 and bool(want.isfinite().all())
    torch.testing.assert_close(got.detach(), want, rtol=RTOL, atol=0)
    torch.testing.assert_close(op.trace().detach(), op64.trace(), rtol=RTOL, atol=0)
    if w_scale == 1e20:  # block norms beyond float32's range are inf in the float32 result, the others close
        norms, norms64 = op.block_norms().detach().double(), op64.block_norms()
        big = norms64 > torch.finfo(torch.float32).max
        assert bool(big.any()) and bool(norms[big].isinf().all())
        torch.testing.assert_close(norms[~big], norms64[~big], rtol=RTOL, atol=0)


@pytest.mark.parametrize("per_head", [False, True], ids=["total", "per_head"])
@pytest.mark.parametrize("path,case", [(path, case) for path in ["fused", "qk", "autograd"]
                                       for case in ["huge_weights", "tiny_weights", "huge_x", "huge_attention"]
                                       if (path, case) != ("qk", "huge_attention")])  # q/k A: probabilities
def test_contributions_of_huge_and_tiny_factors(path, per_head, case, monkeypatch):
    w_scale = {"huge_weights": 1e10, "tiny_weights": 1e-12}.get(case, 1.0)
    op, op64 = _operators(path, w_scale, attn_scale=1e25 if case == "huge_attention" else 1.0,
                          monkeypatch=monkeypatch)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2)) * (1e20 if case == "huge_x" else 1.0)
    _assert_float32_close(op.contributions(x, per_head), op64.contributions(x.double(), per_head))


@pytest.mark.parametrize("per_head", [False, True], ids=["total", "per_head"])
@pytest.mark.parametrize("path", ["fused", "qk", "autograd", "vmap"])
@pytest.mark.parametrize("token_scale", [1e22, 1e-25], ids=["huge_token", "tiny_token"])
def test_contributions_of_one_huge_or_tiny_token_beside_ordinary_ones(path, per_head, token_scale, monkeypatch):
    # One scale for all projected values: scaled down for a token of 1e22, the ordinary tokens' squares vanished
    # (contributions 0 or off by several percent where float64 has 0.098); a token of 1e-25 gave 0, not 1e-26
    op, op64 = _operators("fused" if path == "vmap" else path, 1.0, monkeypatch=monkeypatch)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2))
    x[1, 4] *= token_scale
    want = op64.contributions(x.double(), per_head)
    if path == "vmap":
        got = torch.func.vmap(lambda a, x: dk.HVOOperator(a, op.w_v, op.w_o, num_kv_heads=2).contributions(
            x, per_head), in_dims=(0, 0))(op.source.attn[:, None], x[:, None])[:, 0]
    else:
        got = op.contributions(x, per_head)
    assert float(want[want > 0].min()) < 1e-20 if token_scale < 1 else float(want.max()) > 1e20
    _assert_float32_close(got, want)


@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("path,e_v,e_o", [(path, *e) for path in PATHS for e in [(40, 10), (-30, -20)]]
                         + [("autograd", 40, -45)])  # ordinary OV: only the torch path's weights are scaled
def test_scaled_norms_are_bitwise_the_unscaled_ones(path, grid, e_v, e_o, monkeypatch):
    # the weights times 2^e_v and 2^e_o: the norms times 2^(e_v + e_o), bitwise. The factors of the unscaled
    # layer are taken as they are; those of the scaled one are scaled back (exactly), so they give the same
    # float32 roundings
    exponents = []

    def recorded(fn):
        def call(*args, **kwargs):
            exponents.append(fn(*args, **kwargs))
            return exponents[-1]
        return call

    for name in ("exponent", "exponent_of"):
        monkeypatch.setattr(norm_scaling, name, recorded(getattr(norm_scaling, name)))
    op, _ = _operators(path, 1.0, monkeypatch=monkeypatch)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2))
    norms, contributions = op.block_norms(grid).detach(), op.contributions(x).detach()
    assert not any(float(e) for e in exponents)
    big, _ = _operators(path, 2.0 ** e_v, wo_scale=2.0 ** e_o, monkeypatch=monkeypatch)
    assert torch.equal(big.block_norms(grid).detach(), norms * 2.0 ** (e_v + e_o))
    assert torch.equal(big.contributions(x).detach(), contributions * 2.0 ** (e_v + e_o))
    assert any(float(e) for e in exponents)  # the scaled path was taken


@pytest.mark.parametrize("path", ["fused", "chunks", "autograd"])
@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("bad", ["nan_attention", "inf_weight"])
def test_nan_and_inf_still_propagate_with_huge_weights(path, grid, bad, monkeypatch):
    # non-finite inputs take the path that forms the blocks: its squares of huge finite blocks overflowed too,
    # while NaN and Inf stay where the float64 computation has them
    op, op64 = _operators(path, 1e10, monkeypatch=monkeypatch)
    for o in (op, op64):
        if bad == "nan_attention":
            o.source.attn[0, 1, 5, 2] = math.nan
        else:
            o.w_v.data[1, 3] = math.inf
    got, want = op.block_norms(grid).detach().double(), op64.block_norms(grid)
    assert not bool(want.isfinite().all())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0, equal_nan=True)


@pytest.mark.parametrize("magnitude,expected", [
    (1.0, 0), (2.0 ** 32, 0), (2.0 ** -32, 0), (2.0 ** 32 * 1.5, 33), (2.0 ** 40, 41), (1e-20, -66), (0.0, 0),
    (math.inf, 0), (math.nan, 0), (1e300, 126), (1e-300, -126)])
def test_exponent(magnitude, expected):
    assert norm_scaling.exponent(magnitude, 32) == expected
    t = torch.tensor([-magnitude, 0.5 * magnitude], dtype=torch.float64)
    assert float(norm_scaling.exponent_of(t, 32)) == expected
    if expected and abs(expected) < 126:
        assert 2.0 ** (expected - 1) <= magnitude < 2.0 ** expected


def test_unscaled_keeps_intermediates_in_float32():
    # 2^200 is not a float32 (inf): applied as 2^100 · 2^100, a subnormal comes out exact, 1 overflows
    t = torch.tensor([2.0 ** -149 * 3, 2.0 ** -90, 1.0, 0.0], dtype=torch.float64).float()
    for e in (200.0, -100.0, 0.0):
        got = norm_scaling.unscaled(t, torch.tensor(e, dtype=torch.float64))
        assert torch.equal(got, (t.double() * 2.0 ** e).float())


@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("transform", ["compile", "vmap"])
def test_traced_block_norms_scale_too(grid, transform):
    # under torch.compile and vmap the scale is chosen by torch operations, not by reading the weights
    op, op64 = _operators("fused", 1e10)

    def norms(a, w_v, w_o):
        return dk.HVOOperator(a, w_v, w_o, num_kv_heads=2).block_norms(grid)

    if transform == "compile":
        got = torch.compile(norms, fullgraph=True, backend="eager")(op.source.attn, op.w_v, op.w_o)
    else:
        got = torch.func.vmap(norms, in_dims=(0, None, None))(op.source.attn[:, None], op.w_v, op.w_o)[:, 0]
    _assert_float32_close(got, op64.block_norms(grid))


# float64 weights w_v · 2^e_v and w_o · 2^e_o, the exponents far outside float32's range, and the power of two e_x
# applied to x: the Gram matrix of the weights (or the projected values' squares) overflowed or vanished in float64
FLOAT64_EXTREMES = [(0, 0, 0), (664, -698, 0), (-332, -366, 0), (500, 500, 0), (-500, -500, 0), (0, 0, -700)]


def _float64_layer(source: str, e_v: int, e_o: int, grad: bool = False):
    """The float64 layer of _operators with its weights times 2^e_v and 2^e_o (exact), and the ordinary one."""
    lay = random_layer(2, 4, 2, tokens=9, head_dim=3, m_in=6, m_out=6, causal=True, dtype=torch.float64)
    w_v, w_o = lay["w_v"] * 2.0 ** e_v, lay["w_o"] * 2.0 ** e_o
    if source == "qk":
        g = torch.Generator().manual_seed(1)
        q, k = torch.randn(2, 4, 9, 3, generator=g, dtype=torch.float64), torch.randn(2, 2, 9, 3, generator=g,
                                                                                       dtype=torch.float64)
        make = lambda wv, wo: dk.HVOOperator.from_qk(q, k, wv, wo, causal=True)  # noqa: E731
    else:
        make = lambda wv, wo: dk.HVOOperator(lay["attn"], wv, wo, num_kv_heads=2)  # noqa: E731
    return make(w_v.requires_grad_(grad), w_o), make(lay["w_v"], lay["w_o"])


def _dense_block_norms(op: dk.HVOOperator) -> torch.Tensor:
    """||B_nm||_F (B, N, N) from the dense W' (reference backend)."""
    w = op.to_dense()
    b, n = w.shape[0], op.source.tokens
    return torch.linalg.matrix_norm(w.reshape(b, n, w.shape[1] // n, n, w.shape[2] // n).transpose(2, 3))


@pytest.mark.parametrize("path", ["plain", "qk", "autograd"])
@pytest.mark.parametrize("e_v,e_o,e_x", FLOAT64_EXTREMES)
def test_float64_norms_of_weights_beyond_float32s_range(path, e_v, e_o, e_x):
    # w_v · 1e200 with w_o · 1e-210 (W' ~ 6e-11): the float64 Gram overflowed (eigh failed to converge, or NaN),
    # as the scale was capped at 2^±126. Reference: the dense W' of the ordinary weights, times 2^(e_v + e_o)
    op, ordinary = _float64_layer(path, e_v, e_o, grad=path == "autograd")
    scale = 2.0 ** (e_v + e_o)
    want = _dense_block_norms(ordinary)
    assert float(want.max()) > 0
    if e_x == 0:
        torch.testing.assert_close(op.block_norms().detach(), want * scale, rtol=1e-12, atol=0)
        sq = want.square()  # grid (2, 3): rows of blocks 0-4, 5-8; columns 0-2, 3-5, 6-8
        grid = torch.stack([torch.stack([sq[:, r0:r1, c0:c1].sum((1, 2)) for c0, c1 in ((0, 3), (3, 6), (6, 9))], -1)
                            for r0, r1 in ((0, 5), (5, 9))], -2).sqrt()
        torch.testing.assert_close(op.block_norms((2, 3)).detach(), grid * scale, rtol=1e-12, atol=0)
        torch.testing.assert_close(op.frobenius_norm().detach(), sq.sum((1, 2)).sqrt() * scale, rtol=1e-12, atol=0)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = ordinary.contributions(x)  # against the dense blocks in test_norm_contributions
    torch.testing.assert_close(op.contributions(x * 2.0 ** e_x).detach(), want * 2.0 ** (e_v + e_o + e_x),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("e_v,e_o", [(664, -698), (-500, -500)])
def test_float64_norms_with_nan_of_weights_beyond_float32s_range(grid, e_v, e_o):
    # a NaN in A takes the path that forms the blocks, from weights scaled by at most 2^±126: for weights of 2^-500
    # the OV of ~2^-748 squared vanished (norms 0); weights of 2^664 and 2^-698 give an ordinary OV (a control)
    op, ordinary = _float64_layer("plain", e_v, e_o)
    for o in (op, ordinary):
        o.source.attn[0, 1, 5, 2] = math.nan
    want = ordinary.block_norms(grid) * 2.0 ** (e_v + e_o)
    assert bool(want.isnan().any()) and bool(want.isfinite().any())
    torch.testing.assert_close(op.block_norms(grid), want, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype,most", [(torch.float32, 126), (torch.bfloat16, 126), (torch.float64, 1022)])
def test_exponent_range_of_the_computation_dtype(dtype, most):
    assert norm_scaling.max_exponent(dtype) == most
    for magnitude in (1e300, 1e-300, 2.0 ** -1070):
        want = max(-most, min(most, math.frexp(magnitude)[1]))
        assert norm_scaling.exponent(magnitude, 32, most) == want
        t = torch.tensor([magnitude], dtype=torch.float64)
        assert float(norm_scaling.exponent_of(t, 32, most=most)) == want


@pytest.mark.parametrize("dtype,tiny,ordinary", [(torch.float32, 1e-30, 1e-11), (torch.float64, 1e-200, 1e-13)])
def test_scaled_up_brings_tiny_columns_to_one_and_leaves_the_others(dtype, tiny, ordinary):
    # columns: tiny, all zero, ordinary, huge, NaN; only the tiny one is scaled (float64 keeps its squares of 1e-26)
    t = torch.tensor([[tiny, 0.0, ordinary, 1e30, math.nan], [-tiny / 3, 0.0, ordinary / 7, 1.0, 1.0]], dtype=dtype)
    scaled, e = norm_scaling.scaled_up(t, 40, (0,))
    assert e.shape == (1, 5) and e.dtype == torch.float64
    assert e[0, 0] == math.frexp(tiny)[1] and not bool(e[0, 1:].any())
    assert 0.5 <= float(scaled[:, 0].abs().max()) < 1
    assert torch.equal(scaled[:, 1:4], t[:, 1:4]) and bool(scaled[0, 4].isnan())
    assert torch.equal(norm_scaling.unscaled(scaled, e)[:, :4], t[:, :4])  # powers of two: exact
    ordinary_only, zero = norm_scaling.scaled_up(t[:, 1:3], 40, (0,))
    assert torch.equal(ordinary_only, t[:, 1:3])
    assert zero.shape == (1, 1) and not bool(zero.any())  # nothing scaled: one 0, no pass over the columns

"""Density fractions against dense W' matrices: attention (exact and sampled), Conv1d, I ⊗ W."""

from __future__ import annotations

import math

import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis.claims import density

from conftest import random_layer  # noqa: F401  (tests/conftest.py)

THRESHOLDS = (1e-3, 1e-2, 1e-1, 0.5)


def fractions(w: torch.Tensor, tokens: int, m_out: int, m_in: int, keys: int | None = None) -> tuple[dict, dict]:
    """Entry and block fractions of a dense token-layout matrix of tokens x keys blocks (keys = tokens by default)."""
    w = w.double().abs()
    blocks = w.reshape(tokens, m_out, keys or tokens, m_in).transpose(1, 2).square().sum((-1, -2)).sqrt()
    return ({str(t): (w > t * w.max()).double().mean().item() for t in THRESHOLDS},
            {str(t): (blocks > t * blocks.max()).double().mean().item() for t in THRESHOLDS})


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_fractions_are_exact(causal, monkeypatch):
    monkeypatch.setattr(density, "TILE_ENTRIES", 500)  # several tiles
    lay = random_layer(1, 4, 2, tokens=6, head_dim=3, m_in=5, m_out=4, causal=causal, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)
    entries, blocks = fractions(op.to_dense(), 6, 4, 5)
    result = density.attention_density(op, THRESHOLDS)
    assert result["method"] == "exact"
    for t in map(str, THRESHOLDS):
        assert result["entries"][t]["fraction"] == pytest.approx(entries[t], abs=1e-12)
        assert result["blocks"][t] == pytest.approx(blocks[t], abs=1e-12)


def test_cross_attention_fractions_are_exact_up_to_exact_entries():
    # W' of 7 decoder tokens over 2 encoder tokens has 7·4 x 2·5 = 280 entries: counted as 7·4 x 7·5 = 980, so
    # exact_entries=280 sampled them (with Wilson intervals) instead of counting them exactly
    lay = random_layer(1, 4, 2, tokens=7, head_dim=3, m_in=5, m_out=4, batched=False, keys=2)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)
    entries, blocks = fractions(op.to_dense(), 7, 4, 5, keys=2)
    result = density.attention_density(op, THRESHOLDS, exact_entries=7 * 4 * 2 * 5)
    assert result["method"] == "exact" and result["shape"] == [28, 10]
    for t in map(str, THRESHOLDS):
        assert result["entries"][t]["fraction"] == pytest.approx(entries[t], abs=1e-12)
        assert result["blocks"][t] == pytest.approx(blocks[t], abs=1e-12)


def test_sampled_fractions_cover_the_exact_ones():
    lay = random_layer(1, 4, 4, tokens=8, head_dim=3, m_in=6, m_out=6, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    w = op.to_dense().double().abs()
    result = density.attention_density(op, THRESHOLDS, exact_entries=0, samples=20_000)
    assert result["method"].startswith("sampled")
    for t in map(str, THRESHOLDS):
        est = result["entries"][t]
        assert 0 < est["largest_entry"] <= w.max().item() * (1 + 1e-6)  # an entry of W'
        exact = (w > float(t) * est["largest_entry"]).double().mean().item()  # the same threshold, every entry
        assert est["low"] <= exact <= est["high"]


def test_conv1d_is_banded_block_toeplitz():
    torch.manual_seed(0)
    tokens, width = 7, 5
    conv = torch.nn.Conv1d(width, width, 3, padding=1).double()
    # W' of the convolution over tokens: the Jacobian of X (N, M) -> conv(Xᵀ)ᵀ, token layout
    jac = torch.func.jacrev(lambda x: conv(x.T.unsqueeze(0))[0].T.reshape(-1))(torch.zeros(tokens, width, dtype=torch.float64))
    w = jac.reshape(tokens * width, tokens * width)
    entries, blocks = fractions(w, tokens, width, width)
    result = density.conv1d_density(conv, tokens, THRESHOLDS)
    for t in map(str, THRESHOLDS):
        assert result["entries"][t] == pytest.approx(entries[t], abs=1e-12)
        assert result["blocks"][t] == pytest.approx(blocks[t], abs=1e-12)
    with pytest.raises(ValueError, match="kernel 3 and padding 1"):
        density.conv1d_density(torch.nn.Conv1d(2, 2, 5, padding=2), 4)


def test_ffn_is_block_diagonal():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    entries, blocks = fractions(torch.kron(torch.eye(5, dtype=torch.float64), w), 5, 6, 4)
    result = density.block_diagonal_density(w, 5, THRESHOLDS)
    for t in map(str, THRESHOLDS):
        assert result["entries"][t] == pytest.approx(entries[t], abs=1e-12)
        assert result["blocks"][t] == pytest.approx(blocks[t], abs=1e-12)


@pytest.mark.parametrize("token", [0, 5], ids=["first-tile", "last-tile"])
@pytest.mark.parametrize("exact_entries", [10 ** 8, 10], ids=["exact", "sampled"])
def test_non_finite_entries_give_nan_fractions(token, exact_entries, monkeypatch):
    # NaN entries compared as "not above", and max|w| over the tiles was Python's max, which keeps a NaN
    # only when it comes first: a NaN in the first tile gave 0.0, one in the last tile 0.546; block
    # fractions were 0.0; the sampled path called fraction_above with a NaN threshold (ValueError)
    monkeypatch.setattr(density, "TILE_ENTRIES", 500)  # several tiles
    lay = random_layer(1, 4, 2, tokens=6, head_dim=3, m_in=5, m_out=4, batched=False)
    attn = lay["attn"].clone()
    attn[:, token, 0] = float("nan")
    op = dk.HVOOperator(attn, lay["w_v"], lay["w_o"], num_kv_heads=2)
    result = density.attention_density(op, THRESHOLDS, exact_entries=exact_entries, samples=500)
    for t in map(str, THRESHOLDS):
        assert all(math.isnan(result["entries"][t][k]) for k in ("fraction", "low", "high"))
        assert math.isnan(result["blocks"][t])
    assert "NaN or Inf" in result["method"]

"""The reference against independent oracles: torch.nn.MultiheadAttention's own output,
torch.func.jacrev of attention with detached probabilities, and explicit per-head formulas."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import reference

from conftest import random_layer


def _flatten(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x' from X (B, N, M): token layout x'[n·M + a], feature layout x'[a·N + n]."""
    return (x if layout == "token" else x.transpose(1, 2)).reshape(x.shape[0], -1)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("kdim", [None, 10])
def test_reproduces_multihead_attention(layout, kdim):
    torch.manual_seed(0)
    embed, heads, tokens, batch = 12, 3, 6, 2
    mha = torch.nn.MultiheadAttention(embed, heads, bias=True, batch_first=True, kdim=kdim, vdim=kdim).double().eval()
    with torch.no_grad():  # nonzero biases, so that b' is really tested
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    q = torch.randn(batch, tokens, embed, dtype=torch.float64)
    kv = q if kdim is None else torch.randn(batch, tokens, kdim, dtype=torch.float64)
    out, attn = mha(q, kv, kv, need_weights=True, average_attn_weights=False)
    if kdim is None:
        w_v, b_v = mha.in_proj_weight[2 * embed:], mha.in_proj_bias[2 * embed:]
    else:
        w_v, b_v = mha.v_proj_weight, mha.in_proj_bias[2 * embed:]
    w_o, b_o = mha.out_proj.weight, mha.out_proj.bias
    with torch.no_grad():
        w = dk.hvo_matrix(attn, w_v, w_o, layout=layout, backend="reference")
        b = dk.hvo_bias(attn, w_o, b_v, b_o, layout=layout)
        h = torch.einsum("brc,bc->br", w, _flatten(kv, layout)) + b
    torch.testing.assert_close(h, _flatten(out, layout), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
def test_is_the_jacobian_with_probabilities_detached(layout, heads, kv_heads):
    lay = random_layer(1, heads, kv_heads, tokens=5, head_dim=2, m_in=7, m_out=4, dtype=torch.float64, batched=False)
    attn, w_v, w_o = lay["attn"], lay["w_v"], lay["w_o"]
    x = torch.randn(5, 7, dtype=torch.float64)

    def layer(xp: torch.Tensor) -> torch.Tensor:  # x' -> h' with A held fixed
        xm = xp.reshape(5, 7) if layout == "token" else xp.reshape(7, 5).t()
        y = reference.attention_output(attn.detach()[None], xm[None], w_v, w_o, lay["b_v"], lay["b_o"], kv_heads)[0]
        return _flatten(y[None], layout)[0]

    jac = torch.func.jacrev(layer)(_flatten(x[None], layout)[0])
    w = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=kv_heads, layout=layout, backend="reference")
    torch.testing.assert_close(w, jac, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_gqa_output_and_bias_with_rows_not_summing_to_one(layout):
    lay = random_layer(3, 8, 2, tokens=6, head_dim=3, m_in=5, m_out=7, dtype=torch.float64)
    attn = lay["attn"].clone()
    attn[:, :, :, -2:] = 0  # padded keys: rows now sum to less than one
    attn[1, :, 0] *= 3.0  # and an attention sink with rows above one
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    expected = reference.attention_output(attn, x, lay["w_v"], lay["w_o"], lay["b_v"], lay["b_o"], 2)
    w = dk.hvo_matrix(attn, lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout, backend="reference")
    b = dk.hvo_bias(attn, lay["w_o"], lay["b_v"], lay["b_o"], num_kv_heads=2, layout=layout)
    h = torch.einsum("brc,bc->br", w, _flatten(x, layout)) + b
    torch.testing.assert_close(h, _flatten(expected, layout), rtol=1e-12, atol=1e-12)


def test_ov_circuits_are_per_head_products():
    lay = random_layer(1, 6, 3, head_dim=4, m_in=9, m_out=5, dtype=torch.float64)
    ov = dk.ov_circuits(lay["w_v"], lay["w_o"], 6, 3)
    assert ov.shape == (6, 5, 9)
    for i in range(6):
        kv = i // 2
        expected = lay["w_o"][:, i * 4:(i + 1) * 4] @ lay["w_v"][kv * 4:(kv + 1) * 4, :]
        torch.testing.assert_close(ov[i], expected, rtol=1e-14, atol=1e-14)


def test_layouts_hold_the_same_entries():
    lay = random_layer(1, 3, tokens=4, m_in=5, m_out=6, batched=False, dtype=torch.float64)
    tok = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], backend="reference")
    feat = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], layout="feature", backend="reference")
    # token (n, c), (m, a)  ->  feature (c, n), (a, m)
    permuted = tok.reshape(4, 6, 4, 5).permute(1, 0, 3, 2).reshape(24, 20)
    assert torch.equal(permuted, feat)


def test_reference_is_differentiable():
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=2, dtype=torch.float64, batched=False)
    attn = lay["attn"].requires_grad_()
    w_v = lay["w_v"].requires_grad_()
    w = dk.hvo_matrix(attn, w_v, lay["w_o"])  # backend="auto" picks the reference when grads are needed
    w.square().sum().backward()
    assert attn.grad is not None and w_v.grad is not None and attn.grad.abs().sum() > 0

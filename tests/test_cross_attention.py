"""Cross-attention: A of N decoder queries over N_k != N encoder keys, W' of shape (N·M_out, N_k·M_in).

Every backend against the reference and the reference against independent oracles: the entries
written out one by one, torch.nn.MultiheadAttention's own output over a memory of another length,
and torch.func.jacrev of the layer in the encoder states with A held fixed."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import backends, cpp, reference

from conftest import DTYPES, assert_close_to_reference, random_layer

needs_cpp = pytest.mark.skipif(not cpp.is_available(), reason="C++ extension not built")
needs_triton = pytest.mark.skipif(not backends.triton_interpreter() or not backends._TRITON_FOUND,
                                  reason="Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1)")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
SHAPES = [  # (batch, heads, kv_heads, N, N_k, m_in, m_out)
    (1, 1, 1, 1, 4, 3, 2),  # one decoder token
    (2, 4, 2, 3, 7, 5, 6),  # GQA, batch, N < N_k
    (1, 3, 3, 6, 2, 4, 5),  # N > N_k
    (3, 6, 1, 5, 9, 7, 3),  # multi-query, odd sizes
]


def _flatten(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x' from X (B, N, M): token layout x'[n·M + a], feature layout x'[a·N + n]."""
    return (x if layout == "token" else x.transpose(1, 2)).reshape(x.shape[0], -1)


def _entries(attn: torch.Tensor, ov: torch.Tensor, layout: str) -> torch.Tensor:
    """W'[(n, c), (m, a)] = Σ_i A_i[n, m] OV_i[c, a] as one einsum (no Kronecker product), permuted to the layout."""
    w = torch.einsum("binm,ica->bncma", attn, ov)
    if layout == "feature":
        w = w.permute(0, 2, 1, 4, 3)
    b, p, q, s, t = w.shape
    return w.reshape(b, p * q, s * t)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_sum_of_entries(shape, layout):
    batch, heads, kv, n, n_k, m_in, m_out = shape
    lay = random_layer(batch, heads, kv, n, head_dim=2, m_in=m_in, m_out=m_out, dtype=torch.float64, keys=n_k)
    w = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv, layout=layout, backend="reference")
    assert w.shape == (batch, n * m_out, n_k * m_in)
    ov = reference.ov_circuits(lay["w_v"], lay["w_o"], heads, kv)
    torch.testing.assert_close(w, _entries(lay["attn"], ov, layout), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_backend_matches_reference(backend, layout, shape):
    batch, heads, kv, n, n_k, m_in, m_out = shape
    dtypes = DTYPES if backend != "triton" else backends.output_dtypes("triton")
    for i, dtype in enumerate(dtypes):
        lay = random_layer(batch, heads, kv, n, head_dim=2, m_in=m_in, m_out=m_out, keys=n_k, seed=i,
                           batched=batch > 1)
        got = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv, layout=layout, backend=backend,
                            dtype=dtype)
        assert got.dtype == dtype
        assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], kv, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_and_heads(backend):
    lay = random_layer(2, 4, 2, 3, head_dim=2, m_in=5, m_out=4, keys=6, seed=3)
    out = torch.empty(2, 3 * 4, 6 * 5)
    got = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, backend=backend, out=out)
    assert got is out
    assert_close_to_reference(out, lay["attn"], lay["w_v"], lay["w_o"], 2, "token")
    with pytest.raises(ValueError, match=r"out must have shape \(2, 12, 30\), got \(2, 12, 12\)"):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, backend=backend, out=torch.empty(2, 12, 12))
    one = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, backend=backend, heads=[1])
    d = 2  # head 1 reads kv head 0 (g = 2)
    want = dk.hvo_matrix(lay["attn"][:, 1:2], lay["w_v"][:d], lay["w_o"][:, d:2 * d], backend="reference")
    torch.testing.assert_close(one, want)


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_reproduces_multihead_attention_over_a_memory(layout):
    # nn.MultiheadAttention's own output for N decoder tokens over a memory of N_k tokens of another width
    torch.manual_seed(0)
    embed, heads, kdim, n, n_k, batch = 12, 3, 10, 4, 7, 2
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True, kdim=kdim, vdim=kdim).double().eval()
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    query = torch.randn(batch, n, embed, dtype=torch.float64)
    memory = torch.randn(batch, n_k, kdim, dtype=torch.float64)
    padding = torch.zeros(batch, n_k, dtype=torch.bool)
    padding[1, 5:] = True  # the second memory is padded
    out, attn = mha(query, memory, memory, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    assert attn.shape == (batch, heads, n, n_k)
    with torch.no_grad():
        w = dk.hvo_matrix(attn, mha.v_proj_weight, mha.out_proj.weight, layout=layout, backend="reference")
        b = dk.hvo_bias(attn, mha.out_proj.weight, mha.in_proj_bias[2 * embed:], mha.out_proj.bias, layout=layout)
        h = torch.einsum("brc,bc->br", w, _flatten(memory, layout)) + b
        op = dk.HVOOperator(attn, mha.v_proj_weight, mha.out_proj.weight, b_v=mha.in_proj_bias[2 * embed:],
                            b_o=mha.out_proj.bias, layout=layout)
        h_op = op.matvec(_flatten(memory, layout)) + op.bias()
    assert b.shape == (batch, n * embed)
    torch.testing.assert_close(h, _flatten(out, layout), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_op, _flatten(out, layout), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_is_the_jacobian_in_the_encoder_states(layout, heads, kv_heads):
    # the decoder's queries attend the encoder's keys; with A detached, d(output)/d(encoder states) = W'
    g = torch.Generator().manual_seed(heads)
    n, n_k, m, d = 3, 5, 6, 2
    lay = random_layer(1, heads, kv_heads, n, head_dim=d, m_in=m, m_out=m, dtype=torch.float64, batched=False)
    w_v, w_o, b_v, b_o = lay["w_v"], lay["w_o"], lay["b_v"], lay["b_o"]
    w_q = torch.randn(heads * d, m, generator=g, dtype=torch.float64)
    w_k = torch.randn(kv_heads * d, m, generator=g, dtype=torch.float64)
    dec = torch.randn(n, m, generator=g, dtype=torch.float64)
    enc = torch.randn(n_k, m, generator=g, dtype=torch.float64)
    q = (dec @ w_q.T).reshape(n, heads, d).transpose(0, 1)
    k = (enc @ w_k.T).reshape(n_k, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    attn = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)  # (h, N, N_k)

    def layer(xp: torch.Tensor) -> torch.Tensor:  # encoder states x' -> decoder output h', A fixed
        xm = xp.reshape(n_k, m) if layout == "token" else xp.reshape(m, n_k).t()
        y = reference.attention_output(attn.detach()[None], xm[None], w_v, w_o, b_v, b_o, kv_heads)[0]
        return _flatten(y[None], layout)[0]

    x = _flatten(enc[None], layout)[0]
    jac = torch.func.jacrev(layer)(x)
    assert jac.shape == (n * m, n_k * m)
    for backend in ("reference", *(("cpp",) if cpp.is_available() else ())):
        w = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=kv_heads, layout=layout, backend=backend)
        torch.testing.assert_close(w, jac, rtol=1e-12, atol=1e-12)
    b = dk.hvo_bias(attn, w_o, b_v, b_o, num_kv_heads=kv_heads, layout=layout)
    torch.testing.assert_close(jac @ x + b, layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_gradients_through_the_op(backend):
    # the registered op's backward (ops.hvo_matrix_vjp) reshapes the incoming gradient by N and N_k
    lay = random_layer(2, 4, 2, 2, head_dim=2, m_in=3, m_out=2, dtype=torch.float64, keys=3, seed=5)
    args = [lay[k].clone().requires_grad_() for k in ("attn", "w_v", "w_o")]
    for layout in ("token", "feature"):
        assert torch.autograd.gradcheck(
            lambda a, wv, wo: dk.hvo_matrix(a, wv, wo, num_kv_heads=2, layout=layout, backend=backend), args)


def test_bias_has_one_block_per_query():
    lay = random_layer(2, 4, 2, 3, head_dim=2, m_in=5, m_out=4, dtype=torch.float64, keys=6, seed=7)
    attn = lay["attn"] * torch.rand(2, 4, 3, 1, dtype=torch.float64)  # rows that do not sum to one
    b = dk.hvo_bias(attn, lay["w_o"], lay["b_v"], lay["b_o"], num_kv_heads=2)
    u = reference.ov_circuits(lay["b_v"][:, None], lay["w_o"], 4, 2)[..., 0]  # Wo_i b_v[i // g] (h, M_out)
    want = torch.einsum("bhn,hc->bnc", attn.sum(-1), u) + lay["b_o"]
    torch.testing.assert_close(b, want.reshape(2, 12))


@pytest.mark.parametrize("attn,message", [
    (torch.rand(2, 4, 0, 5), r"attn must have shape \(h, N, N_k\) or \(B, h, N, N_k\) .*got \(2, 4, 0, 5\)"),
    (torch.rand(2, 4, 5, 0), r"with h, N, N_k >= 1, got \(2, 4, 5, 0\)"),
])
def test_empty_axes_are_refused_by_name(attn, message):
    lay = random_layer(1, 4, 2, 3, head_dim=3, m_in=5, m_out=4)
    with pytest.raises(ValueError, match=message):
        dk.hvo_matrix(attn, lay["w_v"], lay["w_o"], num_kv_heads=2)
    with pytest.raises(ValueError, match=message):
        dk.HVOOperator(attn, lay["w_v"], lay["w_o"], num_kv_heads=2)

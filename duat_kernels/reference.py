"""Reference backend: the formulas of DESIGN.md §1 in plain PyTorch, the oracle of every test.

Notation: attention probabilities A_i (N x N_k; N_k = N but for cross-attention) for query heads i < h,
per-head OV circuits
OV_i = Wo_i Wv_{i//g} (M_out x M_in), where g = h / h_kv is the GQA group size.

    token layout:   W' = sum_i A_i (x) OV_i      W'[(n, c), (m, a)] = sum_i A_i[n, m] OV_i[c, a]
    feature layout: W' = sum_i OV_i (x) A_i      W'[(c, n), (a, m)] = sum_i OV_i[c, a] A_i[n, m]
    bias:           b'[(n, c)] = sum_i (sum_m A_i[n, m]) (Wo_i b_v[i//g])[c] + b_o[c]

These functions do no validation (duat_kernels.hvo does it once) and are differentiable.
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "head_factors", "ov_circuits", "kron", "hvo_matrix", "hvo_bias", "attention_output"]


def compute_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every backend: float64 for float64 output, float32 otherwise."""
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def head_factors(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int,
                 num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head (Wo_i (h, M_out, d), Wv_{i // g} (h, d, M_in)) from w_o (M_out, h*d), w_v (h_kv*d, M_in)."""
    d = w_o.shape[1] // num_heads
    wv = w_v.reshape(num_kv_heads, d, w_v.shape[1])  # Wv_j = w_v[j*d:(j+1)*d, :]
    if num_heads != num_kv_heads:
        wv = wv.repeat_interleave(num_heads // num_kv_heads, dim=0)  # query head i reads kv head i // g
    wo = w_o.reshape(w_o.shape[0], num_heads, d).transpose(0, 1)  # Wo_i = w_o[:, i*d:(i+1)*d]
    return wo, wv


def ov_circuits(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """OV_i = Wo_i @ Wv_{i // g}: w_v (h_kv*d, M_in), w_o (M_out, h*d) -> (h, M_out, M_in)."""
    return torch.bmm(*head_factors(w_v, w_o, num_heads, num_kv_heads))


def ov_row_blocks(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int, entries: int):
    """Yield (c0, OV[:, c0:c0 + rows, :]) over the rows of OV, about `entries` entries (h·rows·M_in) at a
    time: a wide layer's whole (h, M_out, M_in) OV is never formed (h = 2, M = 100000 would be 80 GB)."""
    rows = max(1, entries // max(1, num_heads * w_v.shape[1]))
    for c0 in range(0, w_o.shape[0], rows):
        yield c0, ov_circuits(w_v, w_o[c0:c0 + rows], num_heads, num_kv_heads)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊗ b for a (P, S), b (Q, T) -> (P·Q, S·T): entry [p·Q + q, s·T + t] = a[p, s]·b[q, t], for any
    strides (torch.kron needs views it cannot always make of transposed or sliced factors)."""
    (p, s), (q, t) = a.shape, b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(p * q, s * t)


def hvo_matrix(attn: torch.Tensor, ov: torch.Tensor, layout: str = "token") -> torch.Tensor:
    """W' as a sum of Kronecker products: attn (B, h, N, N_k), ov (h, M_out, M_in) -> (B, N*M_out, N_k*M_in)."""
    batch, h, n, n_k = attn.shape
    mats = []
    for a in attn:  # batch
        if layout == "token":
            mats.append(sum(kron(a[i], ov[i]) for i in range(h)))
        else:
            mats.append(sum(kron(ov[i], a[i]) for i in range(h)))
    if not mats:  # empty batch
        return attn.new_empty(0, n * ov.shape[1], n_k * ov.shape[2], dtype=torch.promote_types(attn.dtype, ov.dtype))
    return torch.stack(mats)


def hvo_bias(attn: torch.Tensor, w_o: torch.Tensor, b_v: torch.Tensor | None, b_o: torch.Tensor | None,
             num_kv_heads: int, layout: str = "token") -> torch.Tensor:
    """b' for attn (B, h, N, N_k), w_o (M_out, h*d), b_v (h_kv*d,), b_o (M_out,) -> (B, N*M_out)."""
    batch, h, n, _ = attn.shape
    m_out = w_o.shape[0]
    bias = attn.new_zeros(batch, n, m_out)
    if b_v is not None:
        d = w_o.shape[1] // h
        bv = b_v.reshape(num_kv_heads, d).repeat_interleave(h // num_kv_heads, dim=0)  # (h, d)
        u = torch.einsum("chd,hd->hc", w_o.reshape(m_out, h, d), bv)  # u_i = Wo_i b_v[i//g]
        bias = bias + torch.einsum("bhn,hc->bnc", attn.sum(-1), u)  # rows of A need not sum to 1
    if b_o is not None:
        bias = bias + b_o
    if layout == "feature":
        bias = bias.transpose(1, 2)
    return bias.reshape(batch, n * m_out)


def attention_output(attn: torch.Tensor, x: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                     b_v: torch.Tensor | None = None, b_o: torch.Tensor | None = None,
                     num_kv_heads: int | None = None) -> torch.Tensor:
    """Multi-head attention with given probabilities, the way attention modules compute it.

    attn (B, h, N, N_k), x (B, N_k, M_in) -> (B, N, M_out): V = x w_vᵀ + b_v split into heads,
    repeated for GQA, mixed by A, concatenated and projected by w_o. The independent route to
    W' x' + b' that tests compare against (and whose Jacobian in x is W').
    """
    batch, h, n, _ = attn.shape
    h_kv = num_kv_heads or h
    d = w_o.shape[1] // h
    v = torch.nn.functional.linear(x, w_v, b_v).reshape(batch, x.shape[1], h_kv, d).transpose(1, 2)
    v = v.repeat_interleave(h // h_kv, dim=1)  # (B, h, N, d)
    heads = (attn @ v).transpose(1, 2).reshape(batch, n, h * d)
    return torch.nn.functional.linear(heads, w_o, b_o)

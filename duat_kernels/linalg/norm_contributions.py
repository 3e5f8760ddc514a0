"""Token-to-token contributions ||W'_nm x_m|| without forming W' (Kobayashi et al. 2020, norm-based).

Block (n, m) of W' applied to input token m is Σ_i A_i[n, m] u_i[m] with u_i[m] = OV_i x_m =
Wo_i (Wv_{i//g} x_m), the value vector of token m in head i projected out. Its squared norm is
αᵀ G_m α with α = A[:, n, m] and G_m[i, j] = ⟨u_i[m], u_j[m]⟩ (h x h per input token), so all N²
contributions cost O(N²h² + N·h·M_out·d) and O(N·h² + rows·N·h) memory, never (N, N, M_out).
"""

from __future__ import annotations

import torch

from duat_kernels._memory import check_fits
from duat_kernels._validation import all_finite, check_flag, check_real_dtype, has_values
from duat_kernels.attention_source import ExplicitAttention, as_source
from duat_kernels.linalg import norm_scaling
from duat_kernels.linalg.norms import TORCH_PATH_HINT, root_with_zero_subgradient, scaled_attention, tracks_gradient
from duat_kernels.reference import head_factors

# Rows of A per step: the (B, h, rows, N) chunk and its Gram product stay ~64 MiB (fp32).
CHUNK_ENTRIES = 1 << 24


def projected_values(x: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """u_i[m] = Wo_i Wv_{i//g} x_m for x (B, N, M_in) -> (B, h, N, M_out) (no biases)."""
    wo, wv = head_factors(w_v.to(x.dtype), w_o.to(x.dtype), num_heads, num_kv_heads)  # (h, M_out, d), (h, d, M_in)
    values = torch.einsum("ida,bna->bind", wv, x)  # Wv x_m per head
    return torch.einsum("icd,bind->binc", wo, values)


def contributions(attn, x: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                  per_head: bool = False) -> torch.Tensor:
    """||W'_nm x_m||₂ for attn (B, h, N, N_k) (or an AttentionSource: row blocks of A are read as
    they are needed), x (B, N_k, M_in) -> (B, N, N_k) (N_k = N but for cross-attention).

    per_head=True gives each head's own contribution ||A_i[n, m] u_i[m]|| as (B, h, N, N_k).
    """
    per_head = check_flag("per_head", per_head)
    source = as_source(attn, num_kv_heads, w_v, w_o)
    batch, h, n, n_k, num_kv_heads = source.batch, source.heads, source.tokens, source.keys, source.kv_heads
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_real_dtype("x", x)
    if tuple(x.shape) != (batch, n_k, w_v.shape[1]):
        keys = "N" if n_k == n else "N_k"  # the encoder's states for cross-attention
        raise ValueError(f"x must have shape (B, {keys}, M_in) = ({batch}, {n_k}, {w_v.shape[1]}), "
                         f"got {tuple(x.shape)}")
    ct = torch.float64 if torch.float64 in (source.dtype, x.dtype, w_v.dtype, w_o.dtype) else torch.float32
    m_out = w_o.shape[0]
    result = batch * h * n * n_k * 2 if per_head else batch * n * n_k + batch * n_k * h * h  # with |A| or G_m
    shape = (batch, h, n, n_k) if per_head else (batch, n, n_k)
    check_fits(f"contributions of shape {shape}", (batch * h * n_k * m_out + result) * ct.itemsize, source.device,
               CONTRIBUTIONS_HINT)
    if m_out == 0 or w_v.shape[1] == 0:  # W'_nm x_m is an empty vector or an empty sum: norm 0, whatever A holds
        return torch.zeros(shape, dtype=ct, device=source.device)
    out = _contributions(source, x.to(ct), w_v, w_o, per_head)
    if ct == torch.float32 and has_values(out) and not all_finite(out) and all_finite(x, w_v, w_o, *source.inputs()):
        # finite factors whose float32 squares overflowed (a stored A or an x far from 1): in float64, beside the
        # float32 result, with x in float64
        check_fits(f"contributions of shape {shape} recomputed in float64 (their float32 squares overflowed)",
                   (batch * h * n_k * m_out + result + x.numel()) * 8 + out.numel() * 4, source.device,
                   CONTRIBUTIONS_HINT)
        out = _contributions(source, x.double(), w_v, w_o, per_head).float()
    if has_values(out) and not all_finite(out) and isinstance(source, ExplicitAttention) and \
            all_finite(x, w_v, w_o, *source.inputs()):
        # finite factors whose float64 squares overflowed too: a stored A with entries far above 1 (1e160 gave Inf)
        scaled, e = scaled_attention(source, "contributions")
        out = norm_scaling.unscaled(_contributions(scaled, x.double(), w_v, w_o, per_head),
                                    torch.tensor(float(e), dtype=torch.float64, device=out.device)).to(ct)
    return out


CONTRIBUTIONS_HINT = "Analyse fewer tokens (or one batch element) at a time."


# Input tokens whose projected values have norms ||u_i[m]|| of at most 2^VALUE_LIMIT, the largest at least
# 2^-VALUE_LIMIT, are taken as they are (norm_scaling): G_m <= 2^64.
VALUE_LIMIT = 32
# Columns α = A[:, n, m] whose largest entry is at least 2^-ATTENTION_LIMIT (or 0) are taken as they are, smaller ones
# scaled up (norm_scaling.scaled_up): with G_m's largest entry at least 2^-64 (VALUE_LIMIT), the largest terms
# α_i α_j G_m[i, j] stay above 2^-126.
ATTENTION_LIMIT = (norm_scaling.MAX_EXPONENT - 2 * VALUE_LIMIT) // 2


def _contributions(source, x: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, per_head: bool) -> torch.Tensor:
    """contributions for checked arguments with M_in, M_out >= 1, computed in x's dtype from the projected values,
    scaled by a power of two per input token where their norms leave float32's safe range (norm_scaling): one
    scale for all tokens made the ordinary tokens' squares vanish beside a huge one."""
    batch, h, n, n_k, ct = source.batch, source.heads, source.tokens, source.keys, x.dtype
    u = projected_values(x, w_v, w_o, h, source.kv_heads)  # (B, h, N_k, M_out)
    e = torch.zeros((batch, 1, n_k, 1), dtype=torch.float64, device=u.device)  # per (batch element, input token m)
    norms_or_gram = _norms_or_gram(u, per_head) if has_values(u) else None
    if norms_or_gram is None or not _ordinary(norms_or_gram):  # traced: always, scaled by 2^0 where ordinary
        e = norm_scaling.exponent_of(u, VALUE_LIMIT, dims=(1, 3), most=norm_scaling.max_exponent(ct))
        u = norm_scaling.scaled(u, e)
        norms_or_gram = _norms_or_gram(u, per_head)
    e = e[..., 0]  # the scale of column m of the result (B, 1, N_k), or one 0 (1, 1, 1)
    if per_head:  # |A_i[n, m]| · ||u_i[m]||
        return norm_scaling.unscaled(source.dense().to(ct).abs() * norms_or_gram.unsqueeze(2), e.unsqueeze(1))
    gram = norms_or_gram
    # α scaled up by a power of two per (n, m) where its largest entry is tiny (a softmax tail: float32 squares of
    # ~1e-25 vanished), the roots scaled back
    if tracks_gradient(x, w_v, w_o, *source.inputs()):  # autograd, torch.func: the whole A, no in-place writes
        alpha, e_alpha = norm_scaling.scaled_up(source.dense(TORCH_PATH_HINT).to(ct), ATTENTION_LIMIT, (1,))
        sq = (alpha * torch.einsum("bmij,bjnm->binm", gram, alpha)).sum(1)
        return norm_scaling.unscaled(norm_scaling.unscaled(root_with_zero_subgradient(sq), e_alpha[:, 0]), e)
    out = torch.zeros(batch, n, n_k, dtype=ct, device=source.device)
    for r0, r1, c0, c1, alpha in source.row_blocks(max(1, CHUNK_ENTRIES // (h * n_k))):
        alpha, e_alpha = norm_scaling.scaled_up(alpha.to(ct), ATTENTION_LIMIT, (1,))  # (B, h, rows, cols)
        g_alpha = torch.einsum("bmij,bjrm->birm", gram[:, c0:c1], alpha)  # G_m α per (row, m)
        out[:, r0:r1, c0:c1] = norm_scaling.unscaled((alpha * g_alpha).sum(1).clamp_min_(0).sqrt_(), e_alpha[:, 0])
    return norm_scaling.unscaled(out, e)


def _norms_or_gram(u: torch.Tensor, per_head: bool) -> torch.Tensor:
    """||u_i[m]|| (B, h, N) for per_head, else G_m = (⟨u_i[m], u_j[m]⟩)_ij (B, N, h, h)."""
    return u.norm(dim=-1) if per_head else torch.einsum("bimc,bjmc->bmij", u, u)


def _ordinary(norms_or_gram: torch.Tensor) -> bool:
    """Whether, for every input token m, the largest ||u_i[m]|| (from _norms_or_gram: the norms, or the squares on
    G_m's diagonal) lies in [2^-VALUE_LIMIT, 2^VALUE_LIMIT] (none at all counts as ordinary)."""
    if norms_or_gram.numel() == 0:
        return True
    squares = norms_or_gram.dim() == 4
    # (B, N): per token, the largest over the heads
    largest = (norms_or_gram.diagonal(dim1=-2, dim2=-1).amax(-1) if squares else norms_or_gram.amax(1)).detach()
    limit = 2.0 ** (2 * VALUE_LIMIT if squares else VALUE_LIMIT)
    return bool(((largest >= 1 / limit) & (largest <= limit)).all())

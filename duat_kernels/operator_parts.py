"""Pieces of HVOOperator that do not depend on where A comes from: the q/k checks, b' from the row
sums of A, and the factor ranges that one tile of W' touches."""

from __future__ import annotations

import math
import numbers

import torch

from duat_kernels import _validation as v
from duat_kernels import reference
from duat_kernels._memory import check_fits
from duat_kernels.attention_source import AttentionSource
from duat_kernels.cpp import _factor_range


def check_qk(q: torch.Tensor, k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int | None,
             scale: float | None, softcap: float | None, sliding_window: int | None) -> v.HeadDims:
    """Shapes of q (h, N, d) / (B, h, N, d) and k (h_kv, N_k, d) / (B, h_kv, N_k, d) against the weights (N_k != N:
    cross-attention, whose masks QKAttention checks)."""
    v.check_tensor("q", q, (3, 4))
    v.check_tensor("k", k, (3, 4))
    v.check_tensor("w_v", w_v, (2,))
    v.check_tensor("w_o", w_o, (2,))
    if k.dim() != q.dim() or k.shape[-1] != q.shape[-1] or (q.dim() == 4 and k.shape[0] != q.shape[0]):
        raise ValueError(f"k must have shape (h_kv, N_k, d) or (B, h_kv, N_k, d) matching q {tuple(q.shape)} in B and d, "
                         f"got {tuple(k.shape)}")
    h, n, h_kv, n_k = q.shape[-3], q.shape[-2], k.shape[-3], k.shape[-2]
    if n == 0 or n_k == 0 or h == 0 or h_kv == 0 or h % h_kv:
        raise ValueError(f"need N >= 1, N_k >= 1 and h = {h} a positive multiple of h_kv = {h_kv} (q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)})")
    if q.shape[-1] == 0:
        raise ValueError(f"q and k must have a head size d >= 1 (the logits are d-term dot products), got q "
                         f"{tuple(q.shape)}")
    if num_kv_heads is not None and v.positive_int(num_kv_heads) is None:  # True and 2.0 passed as 1 and 2
        raise ValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads!r}")
    if num_kv_heads is not None and num_kv_heads != h_kv:
        raise ValueError(f"num_kv_heads={num_kv_heads} but k has {h_kv} heads")
    for name, value in (("scale", scale), ("softcap", softcap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{name} must be a real number or None, got {type(value).__name__} {value!r}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (d^-0.5), got {scale!r}")
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"softcap must be a positive finite number or None (no cap), got {softcap!r}")
    if sliding_window is not None and v.positive_int(sliding_window) is None:
        raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    kv, d = v.check_heads(h, h_kv, w_v, w_o)
    batched = q.dim() == 4
    return v.HeadDims(batch=q.shape[0] if batched else 1, heads=h, kv_heads=kv, tokens=n, head_dim=d,
                      m_in=w_v.shape[1], m_out=w_o.shape[0], batched=batched, keys=n_k)


def operator_bias(source: AttentionSource, w_o: torch.Tensor, b_v: torch.Tensor | None, b_o: torch.Tensor | None,
                  layout: str) -> torch.Tensor:
    """b' (B, N·M_out) from the row sums of A (B, h, N, N_k) (reference.hvo_bias with Σ_m A_i[n, m] given)."""
    dtype = v.resolve_dtype(None, None, torch.empty(0, dtype=source.dtype),
                            *(t for t in (w_o, b_v, b_o) if t is not None))
    ct = reference.compute_dtype(dtype)
    sums = source.row_sums().to(ct)  # (B, h, N)
    # hvo_bias reads only attn.sum(-1): a (B, h, N, 1) "attention" with those sums gives the same b'.
    bias = reference.hvo_bias(sums[..., None], w_o.to(ct), None if b_v is None else b_v.to(ct),
                              None if b_o is None else b_o.to(ct), source.kv_heads, layout)
    return bias.to(dtype)


# Products needing less than this are not checked: reading the free memory costs ~15 µs, a third of a small matvec
# (ARPACK calls it hundreds of times).
PRODUCTS_CHECKED_FROM_BYTES = 64 << 20


def check_products_fit(what: str, dims: v.HeadDims, columns: int, width_in: int, width_out: int,
                       dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, the products of W' (or W'ᵀ) with `columns` vectors per batch element whose
    vectors and per-head values would not fit: B·K·N·(width_in + 3·h·d + width_out) entries of dtype (the input
    in the compute dtype, the values, the mixed values and their copy, the result). matvec of 10^6 expanded
    (stride-0) vectors failed with the allocator's "can't allocate memory: you tried to allocate 800000000000
    bytes". Meta tensors allocate nothing; a torch.compile trace is not checked (check_fits), nor guarded on sizes."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return
    entries = dims.batch * columns * dims.tokens * (width_in + 3 * dims.heads * dims.head_dim + width_out)
    if entries * dtype.itemsize < PRODUCTS_CHECKED_FROM_BYTES:
        return
    check_fits(f"{what} of {columns:,} vector(s) per batch element (B={dims.batch}, N={dims.tokens}, h={dims.heads}, "
               f"d={dims.head_dim}, {dtype})", entries * dtype.itemsize, device,
               "Pass fewer vectors (columns of X) at a time.")


# Entries of OV (h·rows·M_in) formed per step by weighted_ov.
OV_ENTRIES_PER_STEP = 1 << 24


def weighted_ov(alpha: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int,
                num_kv_heads: int) -> torch.Tensor:
    """Σ_i α[b, i] OV_i (B, M_out, M_in) for alpha (B, h), w_v (h_kv·d, M_in), w_o (M_out, h·d), all in one
    dtype: one block of W' per batch element. OV is formed a few of its rows at a time (as a whole it is h
    blocks: h = 2, M = 100000 failed to allocate 80 GB), and a block that cannot fit is DenseTooLargeError."""
    batch, m_out, m_in = alpha.shape[0], w_o.shape[0], w_v.shape[1]
    check_fits(f"a block of W' of shape ({batch}, {m_out}, {m_in})",
               batch * m_out * m_in * alpha.dtype.itemsize, alpha.device,
               "Ask for a tile of the block instead: tile(rows, cols).")
    parts = (torch.einsum("bi,ica->bca", alpha, ov)
             for _, ov in reference.ov_row_blocks(w_v, w_o, num_heads, num_kv_heads, OV_ENTRIES_PER_STEP))
    if v.functorch_wrapped(alpha):
        # vmap cannot write batched rows into a plain buffer
        parts = list(parts)
        return torch.cat(parts, 1) if parts else alpha.new_zeros(batch, 0, m_in)
    out = torch.empty(batch, m_out, m_in, dtype=alpha.dtype, device=alpha.device)
    c0 = 0
    for part in parts:
        out[:, c0:c0 + part.shape[1]] = part
        c0 += part.shape[1]
    return out


def tile_factors(source: AttentionSource, ov_shape: tuple[int, int], layout: str, r0: int, r1: int, c0: int,
                 c1: int) -> tuple[torch.Tensor, slice, slice, int, int]:
    """The part of A (B, h, n', m') that W'[r0:r1, c0:c1] reads, the rows and columns of OV
    (M_out, M_in) = ov_shape it reads, and the tile's (row0, col0) inside the W' of those parts.
    Rows of W' are p·Q + q with (P, Q) = (N, M_out) in token layout and (M_out, N) in feature layout
    (columns alike, with N_k keys for N)."""
    token = layout == "token"
    po0, po1, pi0, pi1, row0 = _factor_range(r0, r1 - r0, ov_shape[0] if token else source.tokens)
    so0, so1, si0, si1, col0 = _factor_range(c0, c1 - c0, ov_shape[1] if token else source.keys)
    (ar0, ar1, ac0, ac1), (ov_rows, ov_cols) = ((po0, po1, so0, so1), (slice(pi0, pi1), slice(si0, si1))) if token \
        else ((pi0, pi1, si0, si1), (slice(po0, po1), slice(so0, so1)))
    return source.part(ar0, ar1, ac0, ac1), ov_rows, ov_cols, row0, col0

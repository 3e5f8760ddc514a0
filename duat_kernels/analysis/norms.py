"""Frobenius norms of all N² blocks of W' from the h x h Gram matrix of the OV circuits.

Block (n, m) is B_nm = Σ_i α_i OV_i with α = A[:, n, m], so ||B_nm||_F² = αᵀ G α with
G_ij = ⟨OV_i, OV_j⟩_F. G comes from the low-rank factors, never from OV itself:
⟨Wo_i Wv_i, Wo_j Wv_j⟩_F = Σ (Wo_iᵀ Wo_j) ⊙ (Wv_i Wv_jᵀ)  (d x d matrices).
Writing G = CᵀC (C = Λ^½ Uᵀ from G's eigendecomposition), ||B_nm||² = ||C α||², so a chunk of
rows of A is one (h x h) @ (h x rows·N) product: O(N²h²) time, O(N²) memory plus one chunk.
"""

from __future__ import annotations

import torch

from duat_kernels import reference
from duat_kernels._validation import all_finite
from duat_kernels.reference import head_factors

# Rows of A per step: the (h, rows, N) product stays ~64 MiB at N = 8192, h = 12 (fp32).
CHUNK_ENTRIES = 1 << 24


def gram_factor(w_v: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """C (h, h) in float64 with CᵀC = G, G_ij = ⟨OV_i, OV_j⟩_F, from w_v (h_kv·d, M_in), w_o (M_out, h·d)."""
    wo, wv = head_factors(w_v.double(), w_o.double(), num_heads, num_kv_heads)  # (h, M_out, d), (h, d, M_in)
    oo = torch.einsum("icd,jce->ijde", wo, wo)  # Wo_iᵀ Wo_j
    vv = torch.einsum("ida,jea->ijde", wv, wv)  # Wv_i Wv_jᵀ
    gram = (oo * vv).sum((-1, -2))
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    return evals.clamp_min(0).sqrt()[:, None] * evecs.T


def block_norms(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
    """||B_nm||_F for attn (B, h, N, N) -> (B, N, N); with grid=(R, C), the Frobenius norms of an
    R x C grid of super-blocks (rows and columns of blocks split as evenly as possible) -> (B, R, C)."""
    batch, h, n, _ = attn.shape
    if not all_finite(attn, w_v, w_o):
        return _block_norms_direct(attn, w_v, w_o, num_kv_heads, grid)
    c = gram_factor(w_v, w_o, h, num_kv_heads).to(torch.float32 if attn.dtype != torch.float64 else torch.float64)
    rows_per_step = max(1, CHUNK_ENTRIES // (h * n))
    out_rows, out_cols = grid if grid is not None else (n, n)
    out = torch.zeros(batch, out_rows, out_cols, dtype=c.dtype, device=attn.device)
    col_bins = _bins(n, out_cols, attn.device)
    row_bins = _bins(n, out_rows, attn.device)
    for b in range(batch):
        for r0 in range(0, n, rows_per_step):
            r1 = min(n, r0 + rows_per_step)
            alpha = attn[b, :, r0:r1, :].to(c.dtype).reshape(h, -1)  # (h, rows·N)
            sq = (c.to(attn.device) @ alpha).square_().sum(0).reshape(r1 - r0, n)  # ||B_nm||² for these rows
            if grid is None:
                out[b, r0:r1] = sq
            else:  # accumulate squared norms into super-blocks
                per_row = torch.zeros(r1 - r0, out_cols, dtype=sq.dtype, device=sq.device).index_add_(1, col_bins, sq)
                out[b].index_add_(0, row_bins[r0:r1], per_row)
    return out.clamp_min_(0).sqrt_()


def _block_norms_direct(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int,
                        grid: tuple[int, int] | None) -> torch.Tensor:
    """block_norms for factors with NaN or Inf: αᵀGα cannot see 0 · NaN = NaN or Inf - Inf = NaN,
    so each block Σ_i α_i OV_i is formed (a chunk at a time) and its entries summed, as in the
    dense W': O(N² h M_out M_in) time, the cost of materialising."""
    batch, h, n, _ = attn.shape
    dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
    ov = reference.ov_circuits(w_v.to(dtype), w_o.to(dtype), h, num_kv_heads)  # (h, M_out, M_in)
    cols_per_step = max(1, min(n, CHUNK_ENTRIES // max(1, ov[0].numel())))
    sq = torch.empty(batch, n, n, dtype=dtype, device=attn.device)
    for b in range(batch):
        for row in range(n):
            for m0 in range(0, n, cols_per_step):
                alpha = attn[b, :, row, m0:m0 + cols_per_step].to(dtype)  # (h, cols)
                blocks = torch.einsum("im,ica->mca", alpha, ov)
                sq[b, row, m0:m0 + cols_per_step] = blocks.square().sum((-1, -2))
    if grid is not None:  # squared norms summed into super-blocks
        rows, cols = grid
        per_row = sq.new_zeros(batch, n, cols).index_add_(2, _bins(n, cols, sq.device), sq)
        sq = sq.new_zeros(batch, rows, cols).index_add_(1, _bins(n, rows, sq.device), per_row)
    return sq.sqrt_()


def _bins(n: int, parts: int, device) -> torch.Tensor:
    """Super-block index of each of n rows when split into `parts` near-equal groups."""
    return (torch.arange(n, device=device) * parts) // n

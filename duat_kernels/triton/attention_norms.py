"""Triton kernels: Gram-weighted block norms of W' straight from q and k, A never written.

Two launches, as flash attention's forward and its statistics:
  1. row statistics: lse[b, i, n] = log Σ_m exp(s_i[n, m]) with an online max over key blocks,
     s_i = scale · q_i k_{i//g}ᵀ (soft-capped), -inf where masked (causal, window, key mask);
  2. one program per (row block, key block): for every head i, α_i = exp(s_i - lse_i) (BLOCK_M x
     BLOCK_N, recomputed), y = C α accumulated as (H_PAD, BLOCK_M, BLOCK_N), and ||y||² summed
     into the super-block of each entry (atomic adds into the (R, C) grid, float32).
Cost: twice the q kᵀ products of one attention forward plus h² FMAs per entry; memory O(grid).
The CPU tests run it in Triton's interpreter; the same tests passed compiled on an NVIDIA H200
(TRITON_INTERPRET=0 pytest tests/triton). Its speed has not been measured.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M, BLOCK_N = (16, 16) if _INTERPRET else (32, 32)  # y holds H_PAD x 32 x 32 floats per program


@triton.jit
def _logits(q_ptr, k_ptr, mask_ptr, b, i, kv, rows, cols, N, D, scale, softcap, window,
            sqb, sqh, sqn, skb, skh, skn, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_PAD: tl.constexpr):
    """s (BLOCK_M, BLOCK_N) of head i with -inf where masked."""
    d = tl.arange(0, D_PAD)
    q = tl.load(q_ptr + b * sqb + i * sqh + rows[:, None].to(tl.int64) * sqn + d[None, :],
                mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0)
    k = tl.load(k_ptr + b * skb + kv * skh + cols[:, None].to(tl.int64) * skn + d[None, :],
                mask=(cols[:, None] < N) & (d[None, :] < D), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if softcap > 0:
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap · tanh(s / softcap)
    ok = (rows[:, None] < N) & (cols[None, :] < N)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if window > 0:
        ok = ok & (rows[:, None] - cols[None, :] < window)
        if not CAUSAL:
            ok = ok & (cols[None, :] - rows[:, None] < window)
    if HAS_MASK:
        keys = tl.load(mask_ptr + b * N + cols, mask=cols < N, other=0)
        ok = ok & (keys[None, :] != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def row_lse_kernel(q_ptr, k_ptr, mask_ptr, lse_ptr, H, G, N, D, scale, softcap, window,
                   sqb, sqh, sqn, skb, skh, skn,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_PAD: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    bh = tl.program_id(0)
    b, i = bh // H, bh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    run_max = tl.full((BM,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BM,), tl.float32)
    end = N
    if CAUSAL:
        end = tl.minimum(N, (tl.program_id(1) + 1) * BM)
    for c0 in range(0, end, BN):
        cols = c0 + tl.arange(0, BN)
        s = _logits(q_ptr, k_ptr, mask_ptr, b, i, i // G, rows, cols, N, D, scale, softcap, window,
                    sqb, sqh, sqn, skb, skh, skn, CAUSAL, HAS_MASK, D_PAD)
        new_max = tl.maximum(run_max, tl.max(s, 1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(tl.where(run_max > float("-inf"), run_max - safe, float("-inf"))) + \
            tl.sum(tl.exp(s - safe[:, None]), 1)
        run_max = new_max
    lse = tl.where(run_sum > 0, run_max + tl.log(run_sum), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, lse, mask=rows < N)


@triton.jit
def gram_grid_kernel(q_ptr, k_ptr, mask_ptr, lse_ptr, c_ptr, rbin_ptr, cbin_ptr, out_ptr,
                     H, G, N, D, OUT_R, OUT_C, scale, softcap, window,
                     sqb, sqh, sqn, skb, skh, skn,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    limit = N
    if CAUSAL:
        limit = tl.minimum(N, tl.program_id(1) * BM + BM)  # key blocks above the diagonal are zero
    if tl.program_id(2) * BN < limit:
        j = tl.arange(0, H_PAD)
        y = tl.zeros((H_PAD, BM, BN), tl.float32)
        for i in range(H):
            s = _logits(q_ptr, k_ptr, mask_ptr, b, i, i // G, rows, cols, N, D, scale, softcap, window,
                        sqb, sqh, sqn, skb, skh, skn, CAUSAL, HAS_MASK, D_PAD)
            lse = tl.load(lse_ptr + (b * H + i).to(tl.int64) * N + rows, mask=rows < N, other=float("-inf"))
            lse = tl.where(lse > float("-inf"), lse, float("inf"))  # rows without keys: α = exp(-inf) = 0
            alpha = tl.exp(s - lse[:, None])
            c_col = tl.load(c_ptr + j * H + i, mask=j < H, other=0.0)  # C[:, i]
            y += c_col[:, None, None] * alpha[None, :, :]
        sq = tl.sum(y * y, 0)
        rb = tl.load(rbin_ptr + rows, mask=rows < N, other=0)
        cb = tl.load(cbin_ptr + cols, mask=cols < N, other=0)
        ok = (rows[:, None] < N) & (cols[None, :] < N)
        tl.atomic_add(out_ptr + b.to(tl.int64) * OUT_R * OUT_C + rb[:, None] * OUT_C + cb[None, :], sq, mask=ok)


def block_norms_qk(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, row_bins: torch.Tensor,
                   col_bins: torch.Tensor, grid: tuple[int, int], *, causal: bool, key_mask: torch.Tensor | None,
                   scale: float, softcap: float | None, window: int | None) -> torch.Tensor:
    """Super-block norms (B, R, C) of W' for q (B, h, N, d), k (B, h_kv, N, d) float32, c (h, h) the
    Gram factor, row_bins / col_bins (N,) int64 super-block of each token; key_mask (B, N) bool."""
    batch, h, n, d = q.shape
    q, k, c = q.contiguous().float(), k.contiguous().float(), c.contiguous().float()
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else torch.ones(1, dtype=torch.int8,
                                                                                         device=q.device)
    lse = torch.empty(batch, h, n, dtype=torch.float32, device=q.device)
    meta = dict(CAUSAL=bool(causal), HAS_MASK=key_mask is not None, D_PAD=max(16, triton.next_power_of_2(d)),
                BM=BLOCK_M, BN=BLOCK_N)
    args = (h // k.shape[1], n, d, float(scale), float(softcap or 0.0), int(window or 0),
            *q.stride()[:3], *k.stride()[:3])
    row_lse_kernel[(batch * h, triton.cdiv(n, BLOCK_M))](q, k, mask, lse, h, *args, **meta)
    out = torch.zeros(batch, *grid, dtype=torch.float32, device=q.device)
    gram_grid_kernel[(batch, triton.cdiv(n, BLOCK_M), triton.cdiv(n, BLOCK_N))](
        q, k, mask, lse, c, row_bins.contiguous(), col_bins.contiguous(), out, h, h // k.shape[1], n, d, *grid,
        float(scale), float(softcap or 0.0), int(window or 0), *q.stride()[:3], *k.stride()[:3],
        H_PAD=max(2, triton.next_power_of_2(h)), **meta)
    return out.clamp_min_(0).sqrt_()

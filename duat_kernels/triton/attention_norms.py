"""Triton kernels: Gram-weighted block norms of W' straight from q and k, A never written.

Two launches, as flash attention's forward and its statistics:
  1. row statistics: the maximum m[b, i, n] of s_i[n, :] and l[b, i, n] = Σ_m exp(s_i[n, m] - m) (an online
     max over key blocks), s_i = scale · q_i k_{i//g}ᵀ (soft-capped), -inf where masked (causal, window, key
     mask); kept apart, since m + log l rounds log l away once ulp(m) > log N (logits of 1e8);
  2. one program per (row block, key block): for every head i, α_i = exp(s_i - m_i) / l_i (BM x
     BN, recomputed), y = C α accumulated as (H_PAD, BM, BN), and ||y||² summed
     into the super-block of each entry (summed per super-block in the tile, then atomic adds into
     the (R, C) grid, float32); entries whose C α is tiny (below TINY_LIMIT) are squared scaled by TINY_SCALE
     into a second grid, added to the first in float64 after the pass.
Cost: twice the q kᵀ products of one attention forward plus h² FMAs per entry; memory O(grid).
Tile shapes are autotuned (the grid kernel's atomic sums are zeroed before each trial). The CPU
tests run it in Triton's interpreter; the same tests passed compiled on an NVIDIA H200 and, as the
kernel is now (row statistics as maximum and sum, tile shapes pruned to CUDA's grid limits), on an
NVIDIA H100 (TRITON_INTERPRET=0 pytest tests/triton);
benchmarks/bench_block_norms_gpu.py times it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tl.dot precision of the logits q kᵀ: three TF32 tensor-core products (about float32 accuracy). On an
# H200 (benchmarks/bench_block_norms_gpu.py, N = 32768, h = 12, causal) they took 76 ms against 196 ms for IEEE
# float32 dots on the CUDA cores, with the norms as close to float64 (1.4e-7 against 2.1e-7 relative).
LOGIT_PRECISION = "tf32x3"
# Entries whose largest |(C α)_j| is below TINY_LIMIT are squared times TINY_SCALE (squares of C α below 2^-80 lose
# bits in float32, below 2^-149 they vanish): scaled, those from 2^-100 up keep float32 precision, and the largest
# (2^24 scaled) cannot overflow a grid cell's sum of up to 2^42 entries.
TINY_LIMIT = 2.0 ** -40
TINY_SCALE = 2.0 ** 64
_TINY_LIMIT = tl.constexpr(TINY_LIMIT)  # the kernels' copies (Triton reads constexpr globals only)
_TINY_SCALE = tl.constexpr(TINY_SCALE)


def _configs(shapes):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in shapes]


# Tile shapes, autotuned per (D_PAD, H_PAD, log2 N, causal, precision); the interpreter (CPU tests) takes one small tile.
_ROW_STATS_CONFIGS = _configs([(16, 16, 4)] if _INTERPRET else [(32, 32, 4), (64, 32, 4), (64, 64, 4),
                                                                (128, 32, 8), (128, 64, 8)])
_GRID_CONFIGS = _configs([(16, 16, 4)] if _INTERPRET else [(32, 32, 4), (16, 32, 4), (16, 64, 4), (32, 64, 8),
                                                           (64, 32, 8), (16, 16, 4)])
# y holds H_PAD x BM x BN floats per program: tiles of more than 128 of them per thread spill registers.
_Y_PER_THREAD = 128
# CUDA launches at most 65535 programs along a grid's second and third axes: the row blocks (both kernels)
# and the key blocks (the grid kernel). The longest sequence some tile shape of each kernel launches:
MAX_GRID_AXIS = 65535
MAX_TOKENS = min(MAX_GRID_AXIS * max(c.kwargs["BM"] for c in _ROW_STATS_CONFIGS),
                 MAX_GRID_AXIS * max(min(c.kwargs["BM"], c.kwargs["BN"]) for c in _GRID_CONFIGS))


def _launchable(configs, named_args: dict, kwargs: dict, axes=("BM", "BN")):
    """The configs whose blocks along `axes` number at most MAX_GRID_AXIS for the launch's N queries (BM) and
    N_k keys (BN) (block_norms_qk refuses any N or N_k that no config launches)."""
    n = named_args.get("N", kwargs.get("N"))
    if n is None:  # a Triton that hands the pruner other arguments: nothing to judge by
        return configs
    length = {"BM": n, "BN": named_args.get("NK", kwargs.get("NK", n))}
    return [c for c in configs if all(triton.cdiv(length[a], c.kwargs[a]) <= MAX_GRID_AXIS for a in axes)]


def _prune_row_stats_configs(configs, named_args, **kwargs):
    return _launchable(configs, named_args, kwargs, ("BM",))


def _prune_grid_configs(configs, named_args, **kwargs):
    h_pad = named_args.get("H_PAD", kwargs.get("H_PAD", 16))
    configs = _launchable(configs, named_args, kwargs)
    fits = [c for c in configs if h_pad * c.kwargs["BM"] * c.kwargs["BN"] <= _Y_PER_THREAD * 32 * c.num_warps]
    return fits or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])]


@triton.jit
def _logits(q_ptr, k_ptr, mask_ptr, b, i, kv, rows, cols, N, NK, D, scale, softcap, window,
            sqb, sqh, sqn, skb, skh, skn, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_PAD: tl.constexpr,
            PRECISION: tl.constexpr):
    """s (BM, BN) of head i with -inf where masked (N queries, NK keys)."""
    d = tl.arange(0, D_PAD)
    q = tl.load(q_ptr + b * sqb + i * sqh + rows[:, None].to(tl.int64) * sqn + d[None, :],
                mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0)
    k = tl.load(k_ptr + b * skb + kv * skh + cols[:, None].to(tl.int64) * skn + d[None, :],
                mask=(cols[:, None] < NK) & (d[None, :] < D), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if softcap > 0:
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap · tanh(s / softcap)
    ok = (rows[:, None] < N) & (cols[None, :] < NK)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if window > 0:
        ok = ok & (rows[:, None] - cols[None, :] < window)
        if not CAUSAL:
            ok = ok & (cols[None, :] - rows[:, None] < window)
    if HAS_MASK:
        keys = tl.load(mask_ptr + b * NK + cols, mask=cols < NK, other=0)
        ok = ok & (keys[None, :] != 0)
    return tl.where(ok, s, float("-inf"))


@triton.autotune(configs=_ROW_STATS_CONFIGS, key=["D_PAD", "SIZE_CLASS", "CAUSAL", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_row_stats_configs})
@triton.jit
def row_stats_kernel(q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, H, G, N, NK, D, scale, softcap, window,
                   sqb, sqh, sqn, skb, skh, skn, SIZE_CLASS,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    bh = tl.program_id(0)
    b, i = bh // H, bh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    run_max = tl.full((BM,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BM,), tl.float32)
    end = NK
    if CAUSAL:  # N_k = N
        end = tl.minimum(N, (tl.program_id(1) + 1) * BM)
    for c0 in range(0, end, BN):
        cols = c0 + tl.arange(0, BN)
        s = _logits(q_ptr, k_ptr, mask_ptr, b, i, i // G, rows, cols, N, NK, D, scale, softcap, window,
                    sqb, sqh, sqn, skb, skh, skn, CAUSAL, HAS_MASK, D_PAD, PRECISION)
        new_max = tl.maximum(run_max, tl.max(s, 1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(tl.where(run_max > float("-inf"), run_max - safe, float("-inf"))) + \
            tl.sum(tl.exp(s - safe[:, None]), 1)
        run_max = new_max
    tl.store(max_ptr + bh.to(tl.int64) * N + rows, run_max, mask=rows < N)
    tl.store(sum_ptr + bh.to(tl.int64) * N + rows, run_sum, mask=rows < N)


@triton.autotune(configs=_GRID_CONFIGS, key=["D_PAD", "H_PAD", "SIZE_CLASS", "CAUSAL", "PRECISION"], reset_to_zero=["out_ptr", "tiny_ptr"],
                 prune_configs_by={"early_config_prune": _prune_grid_configs})
@triton.jit
def gram_grid_kernel(q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, c_ptr, rbin_ptr, cbin_ptr, out_ptr, tiny_ptr,
                     H, G, N, NK, D, OUT_R, OUT_C, scale, softcap, window,
                     sqb, sqh, sqn, skb, skh, skn, SIZE_CLASS,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
                     PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    limit = NK
    if CAUSAL:  # N_k = N
        limit = tl.minimum(N, tl.program_id(1) * BM + BM)  # key blocks above the diagonal are zero
    if tl.program_id(2) * BN < limit:
        j = tl.arange(0, H_PAD)
        y = tl.zeros((H_PAD, BM, BN), tl.float32)
        for i in range(H):
            s = _logits(q_ptr, k_ptr, mask_ptr, b, i, i // G, rows, cols, N, NK, D, scale, softcap, window,
                        sqb, sqh, sqn, skb, skh, skn, CAUSAL, HAS_MASK, D_PAD, PRECISION)
            row = (b * H + i).to(tl.int64) * N + rows
            top = tl.load(max_ptr + row, mask=rows < N, other=float("-inf"))
            total = tl.load(sum_ptr + row, mask=rows < N, other=0.0)
            top = tl.where(top > float("-inf"), top, float("inf"))  # rows without keys: α = exp(-inf) = 0
            alpha = tl.exp(s - top[:, None]) * (1.0 / tl.where(total > 0, total, 1.0))[:, None]
            c_col = tl.load(c_ptr + j * H + i, mask=j < H, other=0.0)  # C[:, i]
            y += c_col[:, None, None] * alpha[None, :, :]
        # Entries whose C α is tiny (a softmax tail: float32 squares of ~1e-25 vanish) are squared scaled by
        # TINY_SCALE and summed into a grid of their own, scaled back in float64 after the pass.
        tiny = tl.max(tl.abs(y), 0) < _TINY_LIMIT
        y = y * tl.where(tiny, _TINY_SCALE, 1.0)[None, :, :]
        sq = tl.sum(y * y, 0)
        rb = tl.load(rbin_ptr + rows, mask=rows < N, other=0)
        cb = tl.load(cbin_ptr + cols, mask=cols < NK, other=0)
        ok = (rows[:, None] < N) & (cols[None, :] < NK)
        offset = b.to(tl.int64) * OUT_R * OUT_C
        _add_to_grid(out_ptr + offset, tl.where(tiny, 0.0, sq), rows, cols, rb, cb, ok, N, NK, OUT_R, OUT_C)
        if tl.max(tl.where(ok & tiny, 1, 0)) > 0:
            _add_to_grid(tiny_ptr + offset, tl.where(tiny, sq, 0.0), rows, cols, rb, cb, ok, N, NK, OUT_R, OUT_C)


@triton.jit
def _add_to_grid(base, sq, rows, cols, rb, cb, ok, N, NK, OUT_R, OUT_C):
    # Bins rise with the token index, so a tile within a super-block's size spans at most 2 x 2 of them:
    # sum each part in registers and add it with one atomic, instead of BM·BN atomics on the same few
    # addresses (which serialise). Finer grids take one atomic per entry, on distinct addresses.
    r_lo = tl.min(tl.where(rows < N, rb, OUT_R))
    r_hi = tl.max(tl.where(rows < N, rb, -1))
    c_lo = tl.min(tl.where(cols < NK, cb, OUT_C))
    c_hi = tl.max(tl.where(cols < NK, cb, -1))
    if (r_hi - r_lo <= 1) & (c_hi - c_lo <= 1):
        for dr in range(2):
            for dc in range(2):
                part = tl.sum(tl.sum(tl.where(ok & (rb[:, None] == r_lo + dr) & (cb[None, :] == c_lo + dc),
                                              sq, 0.0), 1), 0)
                tl.atomic_add(base + (r_lo + dr) * OUT_C + c_lo + dc, part,
                              mask=(r_lo + dr <= r_hi) & (c_lo + dc <= c_hi))
    else:
        tl.atomic_add(base + rb[:, None] * OUT_C + cb[None, :], sq, mask=ok)


def block_norms_qk(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, row_bins: torch.Tensor,
                   col_bins: torch.Tensor, grid: tuple[int, int], *, causal: bool, key_mask: torch.Tensor | None,
                   scale: float, softcap: float | None, window: int | None) -> torch.Tensor:
    """Super-block norms (B, R, C) of W' for q (B, h, N, d), k (B, h_kv, N_k, d) float32 (N_k != N: cross-attention,
    without causal mask or window), c (h, h) the Gram factor, row_bins (N,) / col_bins (N_k,) int64 super-block of
    each query / key; key_mask (B, N_k) bool."""
    batch, h, n, d = q.shape
    n_k = k.shape[2]
    if n_k != n and (causal or window):
        raise ValueError(f"causal and window need k of N = {n} keys (self-attention), got N_k = {n_k}")
    if max(n, n_k) > MAX_TOKENS:  # norms.block_norms takes its torch route for these
        raise ValueError(f"the Triton q/k block-norm pass launches at most {MAX_TOKENS} tokens, got N = {n}"
                         + (f", N_k = {n_k}" if n_k != n else ""))
    q, k, c = q.contiguous().float(), k.contiguous().float(), c.contiguous().float()
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else torch.ones(1, dtype=torch.int8,
                                                                                         device=q.device)
    top, total = (torch.empty(batch, h, n, dtype=torch.float32, device=q.device) for _ in range(2))
    meta = dict(CAUSAL=bool(causal), HAS_MASK=key_mask is not None, D_PAD=max(16, triton.next_power_of_2(d)),
                PRECISION=LOGIT_PRECISION)
    strides = (*q.stride()[:3], *k.stride()[:3], max(n, n_k).bit_length())  # the last: the autotuners' size class
    masking = (float(scale), float(softcap or 0.0), int(window or 0))
    row_stats_kernel[lambda cfg: (batch * h, triton.cdiv(n, cfg["BM"]))](
        q, k, mask, top, total, h, h // k.shape[1], n, n_k, d, *masking, *strides, **meta)
    out, tiny = (torch.zeros(batch, *grid, dtype=torch.float32, device=q.device) for _ in range(2))
    gram_grid_kernel[lambda cfg: (batch, triton.cdiv(n, cfg["BM"]), triton.cdiv(n_k, cfg["BN"]))](
        q, k, mask, top, total, c, row_bins.contiguous(), col_bins.contiguous(), out, tiny, h, h // k.shape[1], n,
        n_k, d, *grid, *masking, *strides, H_PAD=max(2, triton.next_power_of_2(h)), **meta)
    # the tiny entries' squares were summed times TINY_SCALE²: the grid's squares in float64
    return (out.double() + tiny.double() * TINY_SCALE ** -2).clamp_min_(0).sqrt_().float()

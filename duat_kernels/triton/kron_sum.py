"""Triton kernel: any tile of W = Σ_i L_i ⊗ R_i, straight from the factors.

W[p·Q + q, s·T + t] = Σ_i L[i, p, s] · R[i, q, t]; token layout is (L, R) = (A, OV), feature
layout (OV, A). One program writes, for one q and BLOCK_P consecutive p, a patch of BLOCK_S x BLOCK_T
entries in each of the rows p·Q + q: the small-K matrix product

    patch[(p, s), t] = Σ_i L[i, p, s] · R[i, q, t]   (p in a p-block, s in an s-block, t in a t-block)

stored at columns s·T + t with int64 offsets and masks for ragged edges, as one tl.dot on the
tensor cores with K = h padded to H_PAD >= 16. Every patch takes its dot, zero slices (causal
masks) included, so NaN and Inf propagate as IEEE arithmetic says with no test of the factors.
Skipping zero patches safely needs their finiteness: a host-side check cost 80 µs per call through
its synchronisation, an in-kernel one 20-35% of the kernel's time on dense maps, and a causal map
takes the time of a dense one (H200): the writes bound the kernel, not the dots. h outer products on
the CUDA cores instead of the dot were never faster.

Roofline. Each entry is written once (4 bytes fp32, 2 bytes fp16/bf16) and costs 2h flops. The reads
are of the factors, through the L2 cache: a program reads h·BLOCK_T entries of R for BLOCK_P·BLOCK_S·BLOCK_T
entries written: with one p per program, R is read h/BLOCK_S times per entry written (BLOCK_S <= N). Where R
(OV: h·M² floats, 28 MB at h = 12, M = 768) outgrows the L2 cache, those reads come from HBM and can cost
more than the writes (the reason inferred from the measurements, not profiled). Blocking p (BLOCK_P > 1)
divides them by BLOCK_P; measured side by side on an NVIDIA H100
(benchmarks/results/nvidia-h100-80gb-hbm3/, bench_materialise_gpu.py) it took the kernel at N = 16,
M = 768, h = 12 from 1.95x to 1.28x fill_'s time for fp32 and from 2.69x to 1.93x for bf16 (at
N = 64, M = 768: 1.34x to 1.14x and 1.55x to 1.34x), and changed nothing at M = 256, where the autotuner
keeps BLOCK_P = 1 or 2. Over the four benchmark shapes the kernel takes 1.07-1.96x fill_'s time for bf16
output (TF32 dots) and 1.10-1.71x for fp32 (IEEE fp32 dots; 3xTF32 was slower).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Patch shapes (BLOCK_P rows of L, BLOCK_S, BLOCK_T), chosen per (S, T, H_PAD, dtypes) by autotuning (each one a
# compilation at a shape's first call). BLOCK_P = 1: the four fastest of a sweep on an H200. BLOCK_P > 1 reuse each
# loaded slice of R for BLOCK_P rows p, which matters where R (OV) outgrows the L2 cache and h / N is large: of five
# tried on an H100 these two were the autotuner's choice in every benchmark case that chose BLOCK_P > 1 (the
# others, (2, 32, 128), (4, 16, 128) and (4, 16, 256) with 8 warps, never). The interpreter takes one small config.
_CONFIGS = [triton.Config({"BLOCK_P": 2, "BLOCK_S": 8, "BLOCK_T": 32}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_P": bp, "BLOCK_S": bs, "BLOCK_T": bt}, num_warps=4)
    for bp, bs, bt in [(1, 32, 128), (1, 32, 256), (1, 64, 64), (1, 16, 256), (2, 16, 256), (8, 16, 64)]
]


@triton.autotune(configs=_CONFIGS, key=["S", "T", "H_PAD"])
@triton.jit
def kron_sum_kernel(
    l_ptr, r_ptr, out_ptr,
    h, Q, S, T,  # heads, and the factor sizes the index arithmetic needs
    row0, col0, rows, cols,  # the tile: global offset and extent (out is rows x cols)
    p_first, p_count, q_first, q_count,  # the rows p·Q + q that the tile touches: p and q ranges
    s_first, s_count,  # the segments (s) that the tile touches
    stride_lh, stride_lp, stride_ls, stride_rh, stride_rq, stride_rt,
    H_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # one grid dimension (up to 2^31 - 1 programs; the second and third stop at 65535): (p block, q) outer,
    # column patches inner. A program writes the rows p·Q + q of BLOCK_P consecutive p and one q: one slice
    # of R, loaded once, against BLOCK_P·BLOCK_S rows of L, in one dot.
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    n_patches = tl.cdiv(s_count, BLOCK_S) * n_t_blocks
    pid = tl.program_id(0)
    pid_r = pid // n_patches
    pid_c = pid % n_patches
    q = q_first + pid_r % q_count
    ps = tl.arange(0, BLOCK_P * BLOCK_S)  # dot rows: (p, s) pairs, s fastest
    p = p_first + (pid_r // q_count) * BLOCK_P + ps // BLOCK_S
    s = s_first + (pid_c // n_t_blocks) * BLOCK_S + ps % BLOCK_S
    t = (pid_c % n_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_local = p.to(tl.int64) * Q + q - row0  # (BLOCK_P·BLOCK_S,) rows of out
    col = s[:, None].to(tl.int64) * T + t[None, :]  # global columns of the patch
    ps_ok = (p < p_first + p_count) & (s < S) & (r_local >= 0) & (r_local < rows)
    ok = ps_ok[:, None] & (t[None, :] < T) & (col >= col0) & (col < col0 + cols)
    i = tl.arange(0, H_PAD).to(tl.int64)
    lp = tl.load(l_ptr + i[None, :] * stride_lh + p[:, None].to(tl.int64) * stride_lp + s[:, None] * stride_ls,
                 mask=(i[None, :] < h) & (p[:, None] < p_first + p_count) & (s[:, None] < S),
                 other=0.0)  # (BLOCK_P·BLOCK_S, H_PAD)
    rq = tl.load(r_ptr + i[:, None] * stride_rh + q.to(tl.int64) * stride_rq + t[None, :] * stride_rt,
                 mask=(i[:, None] < h) & (t[None, :] < T), other=0.0)  # (H_PAD, BLOCK_T)
    patch = tl.dot(lp, rq, input_precision=PRECISION)
    tl.store(out_ptr + r_local[:, None] * cols + (col - col0), patch.to(out_ptr.dtype.element_ty), mask=ok)

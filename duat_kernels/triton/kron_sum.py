"""Triton kernel: any tile of W = Σ_i L_i ⊗ R_i, straight from the factors.

W[p·Q + q, s·T + t] = Σ_i L[i, p, s] · R[i, q, t]; token layout is (L, R) = (A, OV), feature
layout (OV, A). One program writes a BLOCK_S x BLOCK_T patch of ROWS output rows: for a row
(p, q) the patch is the small-K matrix product

    patch[s, t] = Σ_i L[i, p, s] · R[i, q, t]        (s in an s-block, t in a t-block)

stored at columns s·T + t with int64 offsets and masks for ragged edges, as one tl.dot on the
tensor cores with K = h padded to H_PAD >= 16. Every patch takes its dot, zero slices (causal
masks) included, so NaN and Inf propagate as IEEE arithmetic says with no test of the factors.
Skipping zero patches safely needs their finiteness: a host-side check cost 80 µs per call through
its synchronisation, an in-kernel one 20-35% of the kernel's time on dense maps, and a causal map
takes the time of a dense one (H200): the writes bound the kernel, not the dots. h outer products on
the CUDA cores instead of the dot were never faster.

Roofline. Each entry is written once (4 bytes fp32, 2 bytes fp16/bf16) and costs 2h flops; the
reads are small and cached. Measured on an NVIDIA H200 (benchmarks/bench_materialise_gpu.py,
benchmarks/results/nvidia-h200/gpu.md), the kernel alone takes 1.06-1.98x fill_'s time for bf16
output (TF32 dots) and 1.5-2.4x for float32 output (IEEE fp32 dots; 3xTF32 was 5-13% slower).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Patch shapes, chosen per (S, T, H_PAD, dtypes) by autotuning among the fastest of a sweep on an
# H200 (one row per program beat 2 to 8 rows). The interpreter (CPU tests) takes one small config.
_CONFIGS = [triton.Config({"BLOCK_S": 16, "BLOCK_T": 32, "ROWS": 2}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_S": bs, "BLOCK_T": bt, "ROWS": 1}, num_warps=4)
    for bs, bt in [(32, 128), (32, 256), (64, 64), (16, 256)]
]


@triton.autotune(configs=_CONFIGS, key=["S", "T", "H_PAD"])
@triton.jit
def kron_sum_kernel(
    l_ptr, r_ptr, out_ptr,
    h, Q, S, T,  # heads, and the factor sizes the index arithmetic needs
    row0, col0, rows, cols,  # the tile: global offset and extent (out is rows x cols)
    s_first, s_count,  # the segments (s) that the tile touches
    stride_lh, stride_lp, stride_ls, stride_rh, stride_rq, stride_rt,
    H_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
):
    # one grid dimension (up to 2^31 - 1 programs; the second and third stop at 65535): row blocks
    # outer, column patches inner
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    n_patches = tl.cdiv(s_count, BLOCK_S) * n_t_blocks
    pid = tl.program_id(0)
    pid_r = pid // n_patches
    pid_c = pid % n_patches
    s = s_first + (pid_c // n_t_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    t = (pid_c % n_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = s[:, None].to(tl.int64) * T + t[None, :]  # global columns of the patch
    col_ok = (s[:, None] < S) & (t[None, :] < T) & (col >= col0) & (col < col0 + cols)
    for j in range(ROWS):
        r_local = pid_r * ROWS + j
        if r_local < rows:
            r = row0 + r_local.to(tl.int64)
            p = r // Q
            q = r % Q
            offs = r_local.to(tl.int64) * cols + (col - col0)
            i = tl.arange(0, H_PAD)
            lp = tl.load(l_ptr + i[None, :] * stride_lh + p * stride_lp + s[:, None] * stride_ls,
                         mask=(i[None, :] < h) & (s[:, None] < S), other=0.0)  # (BLOCK_S, H_PAD)
            rq = tl.load(r_ptr + i[:, None] * stride_rh + q * stride_rq + t[None, :] * stride_rt,
                         mask=(i[:, None] < h) & (t[None, :] < T), other=0.0)  # (H_PAD, BLOCK_T)
            patch = tl.dot(lp, rq, input_precision=PRECISION)
            tl.store(out_ptr + offs, patch.to(out_ptr.dtype.element_ty), mask=col_ok)

"""Triton kernel: any tile of W = Σ_i L_i ⊗ R_i, straight from the factors.

W[p·Q + q, s·T + t] = Σ_i L[i, p, s] · R[i, q, t]; token layout is (L, R) = (A, OV), feature
layout (OV, A). One program writes a BLOCK_S x BLOCK_T patch of ROWS output rows: for a row
(p, q) the patch is the small-K matrix product

    patch[s, t] = (L[:, p, s-block]ᵀ  @  R[:, q, t-block])      K = h, padded to H_PAD >= 16

on the tensor cores (tl.dot), stored at columns s·T + t with int64 offsets and masks for ragged
edges. Patches whose L or R slice is all zero (causal masks) are stored as zeros, without the dot,
but only when SKIP_ZERO_PATCHES (the launcher's check that every factor entry is finite): IEEE
0 · NaN = NaN, and tl.max, NaN-ignoring like IEEE maxNum (np.nanmax in the interpreter), would
call a slice of NaN and zero padding "all zero".

Roofline (H100: ~3 TB/s HBM, ~495 TFLOP/s dense TF32, ~67 TFLOP/s FP32 on CUDA cores). Each
entry is written once (4 bytes fp32, 2 bytes fp16/bf16) and costs 2h flops, reads are tiny and
cached. At 3 TB/s, fp32 output is 750 G entries/s, which needs 1.5·h TFLOP/s: with TF32/tf32x3
tensor-core dots (16-bit outputs) that is far below peak for any h, so the kernel is bound by the
stores; float32 output uses IEEE fp32 dots on the CUDA cores, which stay under the store time up
to h ~ 32-40. GPU speed has not been measured: the project's machines have no GPU.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Patch shapes: BLOCK_S x BLOCK_T >= 16 x 16 for tl.dot; the larger ones keep ~32-64 KiB of
# stores in flight per program on an H100. The interpreter (CPU tests) uses one small config.
_CONFIGS = [triton.Config({"BLOCK_S": 16, "BLOCK_T": 32, "ROWS": 2}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_S": bs, "BLOCK_T": bt, "ROWS": rows}, num_warps=w)
    for bs, bt, rows, w in [(16, 128, 4, 4), (32, 128, 4, 8), (64, 64, 2, 4), (16, 256, 2, 8), (32, 64, 8, 4)]
]


@triton.autotune(configs=_CONFIGS, key=["S", "T", "H_PAD"])
@triton.jit
def kron_sum_kernel(
    l_ptr, r_ptr, out_ptr,
    h, Q, S, T,  # heads, and the factor sizes the index arithmetic needs
    row0, col0, rows, cols,  # the tile: global offset and extent (out is rows x cols)
    s_first,  # first segment (s) that the tile touches
    stride_lh, stride_lp, stride_ls, stride_rh, stride_rq, stride_rt,
    H_PAD: tl.constexpr, PRECISION: tl.constexpr, SKIP_ZERO_PATCHES: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    s = s_first + (pid_c // n_t_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    t = (pid_c % n_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, H_PAD)
    col = s[:, None].to(tl.int64) * T + t[None, :]  # global columns of the patch
    col_ok = (s[:, None] < S) & (t[None, :] < T) & (col >= col0) & (col < col0 + cols)
    for j in range(ROWS):
        r_local = pid_r * ROWS + j
        if r_local < rows:
            r = row0 + r_local.to(tl.int64)
            p = r // Q
            q = r % Q
            lp = tl.load(l_ptr + i[None, :] * stride_lh + p * stride_lp + s[:, None] * stride_ls,
                         mask=(i[None, :] < h) & (s[:, None] < S), other=0.0)  # (BLOCK_S, H_PAD)
            rq = tl.load(r_ptr + i[:, None] * stride_rh + q * stride_rq + t[None, :] * stride_rt,
                         mask=(i[:, None] < h) & (t[None, :] < T), other=0.0)  # (H_PAD, BLOCK_T)
            offs = r_local.to(tl.int64) * cols + (col - col0)
            if SKIP_ZERO_PATCHES:
                if (tl.max(tl.abs(lp)) == 0.0) | (tl.max(tl.abs(rq)) == 0.0):
                    patch = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
                else:
                    patch = tl.dot(lp, rq, input_precision=PRECISION)
            else:
                patch = tl.dot(lp, rq, input_precision=PRECISION)
            tl.store(out_ptr + offs, patch.to(out_ptr.dtype.element_ty), mask=col_ok)

"""Triton backend: launches the tile kernel of duat_kernels/triton/kron_sum.py.

CUDA tensors; CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported). Imported lazily by duat_kernels.backends, so setting the variable before the first
triton call is enough.
"""

from __future__ import annotations

import torch
import triton

from duat_kernels.triton.kron_sum import kron_sum_kernel

# tl.dot precision per output dtype: IEEE fp32 for float32 (exact to fp32 rounding); TF32 for
# bfloat16 (operands rounded to 11 bits, 2^-10 relative per product, under bf16's 2^-8); 3xTF32
# (~fp32) for float16.
_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}
OUTPUT_DTYPES = tuple(_PRECISION)


def kron_sum_tile_(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, row0: int = 0,
                   col0: int = 0) -> torch.Tensor:
    """Write W[row0:row0+rows, col0:col0+cols] of W = Σ_i left_i ⊗ right_i into out (rows, cols).

    left (h, P, S), right (h, Q, T) float32 (any strides), out contiguous float32/float16/bfloat16.
    """
    if out.numel() == 0:
        return out
    h, _, s_size = left.shape
    _, q_size, t_size = right.shape
    rows, cols = out.shape
    s_first = col0 // t_size
    s_count = (col0 + cols - 1) // t_size + 1 - s_first
    p_first = row0 // q_size
    p_count = (row0 + rows - 1) // q_size + 1 - p_first
    # rows p·Q + q: within one p only the tile's q; across several p every q (the kernel masks the rest)
    q_first, q_count = (row0 % q_size, rows) if p_count == 1 else (0, q_size)
    h_pad = max(16, triton.next_power_of_2(h))

    def grid(meta):  # (p block, q) x column patches, flattened (the kernel's n_patches: the last two factors)
        n_t = triton.cdiv(t_size, meta["BLOCK_T"])
        return (triton.cdiv(p_count, meta["BLOCK_P"]) * q_count * triton.cdiv(s_count, meta["BLOCK_S"]) * n_t,)

    kron_sum_kernel[grid](
        left, right, out, h, q_size, s_size, t_size, row0, col0, rows, cols, p_first, p_count, q_first, q_count,
        s_first, s_count,
        *left.stride(), *right.stride(), H_PAD=h_pad, PRECISION=_PRECISION[out.dtype],
    )
    return out

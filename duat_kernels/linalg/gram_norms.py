"""The fused C++ pass of block_norms: ||C α||² for every column of a row block of A, and its grid sums.

One multithreaded read of the (h, rows, cols) block; nothing but the result is written.
"""

from __future__ import annotations

import torch

from duat_kernels import cpp


def available(source) -> bool:
    """Whether the C++ pass handles this attention source (float32 on the CPU, extension built)."""
    return (cpp.is_available() and hasattr(cpp._C, "gram_grid_norms") and source.device.type == "cpu"
            and source.dtype == torch.float32)


def squared_(alpha: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = ||C α[:, r, m]||² (rows, cols) float32 for alpha (h, rows, cols), c (h, h) float32;
    written in place when out is contiguous, else through a temporary."""
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=torch.float32)
    cpp._C.gram_squared_norms(alpha.contiguous().numpy(), c.contiguous().numpy(), target.numpy(),
                              torch.get_num_threads())
    return out if target is out else out.copy_(target)


def grid_(alpha: torch.Tensor, c: torch.Tensor, row_bins: torch.Tensor, col_bins: torch.Tensor,
          out: torch.Tensor) -> torch.Tensor:
    """out[row_bins[r], col_bins[m]] += ||C α[:, r, m]||² in place: alpha (h, rows, cols), c (h, h),
    row_bins (rows,), col_bins (cols,) int64, out (R, C) float64 contiguous."""
    cpp._C.gram_grid_norms(alpha.contiguous().numpy(), c.contiguous().numpy(), row_bins.contiguous().numpy(),
                           col_bins.contiguous().numpy(), out.numpy(), torch.get_num_threads())
    return out

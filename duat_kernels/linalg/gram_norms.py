"""The fused C++ passes of block_norms: ||C α||² for every column of a row block of A, and its grid sums.

On a stored A: one multithreaded read of the (h, rows, cols) block; nothing but the result is written.
From q and k (float32 CPU QKAttention): the logits and softmax are formed in the same pass, A never
exists (csrc/qk_attention_norms.cpp).
"""

from __future__ import annotations

import torch

from duat_kernels import cpp, qk_cpu
from duat_kernels.qk_attention import QKAttention


def available(source) -> bool:
    """Whether the C++ pass handles this attention source (float32 on the CPU, extension built)."""
    return (cpp.is_available() and hasattr(cpp._C, "gram_grid_norms") and source.device.type == "cpu"
            and source.dtype == torch.float32)


def squared_(alpha: torch.Tensor, c: torch.Tensor, out: torch.Tensor, root: bool = False) -> torch.Tensor:
    """out = ||C α[:, r, m]||² (rows, cols) float32 for alpha (h, rows, cols), c (h, h) float32, or with
    root=True ||C α[:, r, m]|| (the root taken in the same pass); written in place when out is
    contiguous, else through a temporary."""
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=torch.float32)
    cpp._C.gram_squared_norms(cpp._numpy_view(alpha.contiguous()), cpp._numpy_view(c.contiguous()), target.numpy(),
                              cpp.kernel_threads(), root)
    return out if target is out else out.copy_(target)


def grid_(alpha: torch.Tensor, c: torch.Tensor, row_bins: torch.Tensor, col_bins: torch.Tensor,
          out: torch.Tensor) -> torch.Tensor:
    """out[row_bins[r], col_bins[m]] += ||C α[:, r, m]||² in place: alpha (h, rows, cols), c (h, h),
    row_bins (rows,), col_bins (cols,) int64, out (R, C) float64 contiguous."""
    cpp._C.gram_grid_norms(cpp._numpy_view(alpha.contiguous()), cpp._numpy_view(c.contiguous()),
                           row_bins.contiguous().numpy(), col_bins.contiguous().numpy(), out.numpy(),
                           cpp.kernel_threads())
    return out


def qk_available(source) -> bool:
    """Whether the fused C++ q/k pass handles this source: a float32 CPU QKAttention with finite q and k."""
    return isinstance(source, QKAttention) and qk_cpu.handles(source) and hasattr(cpp._C, "qk_gram_grid_norms")


def qk_squared_norms(source, c: torch.Tensor, grid: tuple[int, int] | None, row_bins: torch.Tensor | None = None,
                     col_bins: torch.Tensor | None = None) -> torch.Tensor:
    """||C α||² from q and k in one C++ pass, A never written: (B, N, N_k) float32 for grid=None, else the
    super-block sums (B, R, C) float64 with row_bins (N,) / col_bins (N_k,) int64 the super-block of each query / key.
    source a QKAttention (float32, CPU), c (h, h). A float32 square that underflows (tiny α) is its nearest float32:
    qk_norms keeps those norms."""
    return _qk_pass(source, c, grid, row_bins, col_bins, False)[0]


def qk_norms(source, c: torch.Tensor) -> torch.Tensor:
    """||C α|| (B, N, N_k) float32 from q and k (qk_squared_norms' roots), with the norms of tiny α whose float32
    squares underflow (the C++ pass computes those in float64)."""
    out, tiny = _qk_pass(source, c, None, None, None, True)
    if not tiny:
        return out.clamp_min_(0).sqrt_()
    tiny_entries = out < 0  # written as -||C α||
    tiny_norms = -out[tiny_entries]
    out.clamp_min_(0).sqrt_()[tiny_entries] = tiny_norms
    return out


def _qk_pass(source, c: torch.Tensor, grid: tuple[int, int] | None, row_bins: torch.Tensor | None,
             col_bins: torch.Tensor | None, tiny_roots: bool) -> tuple[torch.Tensor, bool]:
    """The C++ q/k pass behind qk_squared_norms / qk_norms, and whether any dense entry is a negated tiny norm."""
    q, k = qk_cpu.query_keys(source)
    c32 = cpp._numpy_view(c.to(torch.float32).contiguous())
    opts = qk_cpu.kernel_options(source)
    if grid is None:
        out = torch.empty(source.batch, source.tokens, source.keys, dtype=torch.float32)
        tiny = cpp._C.qk_gram_squared_norms(q, k, qk_cpu.key_mask(source), c32, out.numpy(), **opts,
                                            tiny_roots=tiny_roots)
    else:
        out = torch.zeros(source.batch, *grid, dtype=torch.float64)
        cpp._C.qk_gram_grid_norms(q, k, qk_cpu.key_mask(source), c32, row_bins.contiguous().numpy(),
                                  col_bins.contiguous().numpy(), out.numpy(), **opts)
        tiny = False
    return out, tiny

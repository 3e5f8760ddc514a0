"""Singular values of W' through scipy's iterative solvers on the matrix-free operator."""

from __future__ import annotations

import numpy as np
import torch


def as_linear_operator(op):
    """A scipy.sparse.linalg.LinearOperator for an unbatched HVOOperator (matvec and rmatvec only)."""
    from scipy.sparse.linalg import LinearOperator

    if op.dims.batched:
        raise ValueError("as_linear_operator needs an unbatched HVOOperator (attn of shape (h, N, N)); "
                         "build one per batch element")
    dtype = torch.promote_types(op.source.dtype, torch.promote_types(op.w_v.dtype, op.w_o.dtype))
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    tdtype = torch.float64 if np_dtype == np.float64 else torch.float32

    def call(fn, x):  # x (n,) or (n, k) column-stacked, as scipy passes it
        vec = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype)).to(op.device, tdtype)
        with torch.no_grad():
            y = fn(vec) if vec.dim() == 1 else fn(vec.T).T
        return y.cpu().numpy()

    return LinearOperator(op.shape, dtype=np_dtype, matvec=lambda x: call(op.matvec, x),
                          rmatvec=lambda y: call(op.rmatvec, y),
                          matmat=lambda xs: call(op.matvec, xs), rmatmat=lambda ys: call(op.rmatvec, ys))


def singular_values(op, k: int = 1, tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The k largest singular values of W', descending (scipy svds, Lanczos/ARPACK)."""
    from scipy.sparse.linalg import svds

    lin = as_linear_operator(op)
    if not 1 <= k < min(lin.shape):
        raise ValueError(f"k must be in [1, {min(lin.shape) - 1}] for W' of shape {lin.shape}, got {k}")
    v0 = np.random.default_rng(seed).standard_normal(min(lin.shape)).astype(lin.dtype)
    s = svds(lin, k=k, tol=tol, v0=v0, return_singular_vectors=False)
    return np.sort(s)[::-1]

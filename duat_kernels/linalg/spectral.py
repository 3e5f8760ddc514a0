"""Singular values of W' through scipy's iterative solvers on the matrix-free operator."""

from __future__ import annotations

import numpy as np
import torch

from duat_kernels._validation import all_finite, check_operator, integer, numeric_array
from duat_kernels.operator_args import positive_tolerance


def as_linear_operator(op):
    """A scipy.sparse.linalg.LinearOperator for an unbatched HVOOperator (matvec and rmatvec only)."""
    from scipy.sparse.linalg import LinearOperator

    check_operator("as_linear_operator", op, data=False)
    if op.dims.batched:
        raise ValueError("as_linear_operator needs an unbatched HVOOperator (attn of shape (h, N, N_k)); "
                         "build one per batch element")
    dtype = torch.promote_types(op.source.dtype, torch.promote_types(op.w_v.dtype, op.w_o.dtype))
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    tdtype = torch.float64 if np_dtype == np.float64 else torch.float32

    def call(fn, x):  # x (n,) or (n, k) column-stacked, as scipy passes it
        x = numeric_array("x", x, complex_ok=True)
        if np.iscomplexobj(x):  # W' is real and linear: its real and imaginary parts (their imaginary part was dropped)
            return call(fn, x.real) + 1j * call(fn, x.imag)
        vec = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype)).to(op.device, tdtype)
        with torch.no_grad():
            y = fn(vec) if vec.dim() == 1 else fn(vec.T).T
        return y.cpu().numpy()

    return LinearOperator(op.shape, dtype=np_dtype, matvec=lambda x: call(op.matvec, x),
                          rmatvec=lambda y: call(op.rmatvec, y),
                          matmat=lambda xs: call(op.matvec, xs), rmatmat=lambda ys: call(op.rmatvec, ys))


def singular_values(op, k: int = 1, tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The k largest singular values of W', descending (scipy svds, Lanczos/ARPACK; the dense SVD
    when k = min(shape), which svds cannot do). NaN when W' has a NaN or Inf entry."""
    from scipy.sparse.linalg import svds

    check_operator("singular_values", op)
    lin = as_linear_operator(op)
    side = min(lin.shape)
    if integer(k, tensors=False) is None:
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    k = integer(k)
    if not 1 <= k <= side:
        raise ValueError(f"k must be in [1, {side}] for W' of shape {lin.shape}, got {k}"
                         if side else f"W' of shape {lin.shape} has no singular values (k={k})")
    positive_tolerance(tol)
    if integer(seed, tensors=False) is None:
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:  # NumPy's SeedSequence: "expected non-negative integer"
        raise ValueError(f"seed must be an int >= 0, got {seed}")
    seed = integer(seed)
    if not (op.source.finite() and all_finite(op.w_v, op.w_o)):  # a non-finite weight reaches W' (0 · Inf = NaN)
        return np.full(k, np.nan, dtype=lin.dtype)
    if k == side:
        with torch.no_grad():
            dense = op.to_dense(dtype=torch.float64 if lin.dtype == np.float64 else torch.float32)
        if not all_finite(dense):
            raise _overflow_error(lin.dtype)
        return torch.linalg.svdvals(dense).cpu().numpy()[:k].astype(lin.dtype)
    v0 = np.random.default_rng(seed).standard_normal(side).astype(lin.dtype)
    # ARPACK iterates on W'ᵀW', whose entries are squares: a zero W' (fully masked attention, zero
    # weights) stops it ("starting vector is zero"), and so do tiny entries, whose squares underflow.
    # It runs on W' scaled by max|W' x| / max|x| for a random x (no squares; 0 only for a zero W') instead,
    # divided by it (its reciprocal overflows for a subnormal W': 1 / 1e-39 is Inf in float32).
    x = np.random.default_rng(seed).standard_normal(lin.shape[1]).astype(lin.dtype)
    gain = float(np.abs(lin.matvec(x)).max()) / float(np.abs(x).max())
    if gain == 0:
        return np.zeros(k, dtype=lin.dtype)
    if not np.isfinite(gain):  # finite factors: W' x left the dtype's range (ARPACK then failed with error -9999)
        raise _overflow_error(lin.dtype)
    s = svds(_divided(lin, lin.dtype.type(gain)), k=k, tol=tol, v0=v0, return_singular_vectors=False)
    return (np.sort(s)[::-1] * gain).astype(lin.dtype)


def _overflow_error(dtype) -> ValueError:
    """The refusal of W' whose products overflow `dtype` although its factors are finite."""
    if dtype == np.float32:
        fix = ("build the HVOOperator from float64 copies (attn.double(), w_v.double(), w_o.double()), whose "
               "singular values are returned in float64")
    else:
        fix = "scale the weights down by a power of two and the singular values back up by it"
    return ValueError(f"singular_values: the entries of W' (or W' x) overflow {np.dtype(dtype).name} although "
                      f"attn, w_v and w_o are finite (singular values beyond {float(np.finfo(dtype).max):.3g}); {fix}")


def _divided(lin, scale):
    """The LinearOperator lin / scale, dividing each product (scipy's lin * (1 / scale) overflows)."""
    from scipy.sparse.linalg import LinearOperator

    return LinearOperator(lin.shape, dtype=lin.dtype, matvec=lambda x: lin.matvec(x) / scale,
                          rmatvec=lambda y: lin.rmatvec(y) / scale, matmat=lambda xs: lin.matmat(xs) / scale,
                          rmatmat=lambda ys: lin.rmatmat(ys) / scale)

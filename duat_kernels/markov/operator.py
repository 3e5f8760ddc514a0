"""The transition operator of a context-K chain over T symbols, in its structured (shift) form.

A state is s = (x_1, ..., x_K), index(s) = Σ_k x_k T^{K-k} (base T, x_1 most significant). The
only transitions are s -> (x_2, ..., x_K, y), i.e. to s' = (s mod T^{K-1})·T + y, so with
R = T^{K-1} and the state index split as s = x_1·R + r (x_1 < T, r < R):

    P[x_1·R + r, r·T + y] = Q[x_1·R + r, y]        (Q: the (T^K, T) next-symbol probabilities)

and every product with P is a contraction of Q reshaped to (T, R, T), with no index arrays:

    (P v)[x_1, r]  = Σ_y Q[x_1, r, y] · v[r, y]          (v reshaped to (R, T))
    (Pᵀ u)[r, y]   = Σ_{x_1} u[x_1, r] · Q[x_1, r, y]     (u reshaped to (T, R))
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse
import torch

from duat_kernels._memory import DenseTooLargeError, check_fits
from duat_kernels._validation import numeric_array

ROW_SUM_TOLERANCE = 1e-6  # |Σ_y Q[s, y] − 1| allowed (float32 probabilities, rounding)


def state_count(num_symbols: int, context: int) -> int:
    """T^K, the number of states, for T >= 2 symbols and context K >= 1; refused (DenseTooLargeError) when
    the (T^K, T) float64 probabilities of the chain could not be held in memory, before anything is
    computed (K = 99999 failed after loading the model with NumPy's 'Maximum allowed dimension exceeded')."""
    hint = "Use fewer symbols or a shorter context K."
    if context * math.log2(num_symbols) > 62:  # T^K itself is too long to print (4300-digit limit)
        raise DenseTooLargeError(f"a chain over T={num_symbols} symbols with context K={context} has T^K = "
                                 f"{num_symbols}^{context} (about 10^{context * math.log10(num_symbols):.0f}) "
                                 f"states, more than any memory holds. {hint}")
    states = num_symbols ** context
    check_fits(f"the table of ({states:,}, {num_symbols}) transition probabilities (T={num_symbols}, K={context})",
               states * num_symbols * 8, torch.device("cpu"), hint)
    return states


class TransitionOperator:
    """P of shape (T^K, T^K) from the next-symbol probabilities Q (T^K, T), rows summing to one.

    `.matvec(v)` is P v and `.rmatvec(u)` is Pᵀ u (so a row distribution μ evolves as
    μ P = rmatvec(μ)); both take (T^K,) or (T^K, n) arrays. `.to_csr()` is the scipy CSR matrix.
    """

    def __init__(self, probabilities: np.ndarray, num_symbols: int, context: int):
        q = numeric_array("probabilities", probabilities).astype(np.float64, copy=False)
        if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in (num_symbols, context)):
            raise TypeError(f"num_symbols and context must be ints, got {num_symbols!r} and {context!r}")
        num_symbols, context = int(num_symbols), int(context)
        if num_symbols < 2 or context < 1:
            raise ValueError(f"need num_symbols >= 2 and context >= 1, got {num_symbols} and {context}")
        if q.shape != (state_count(num_symbols, context), num_symbols):
            raise ValueError(f"probabilities must have shape (T^K, T) = ({num_symbols ** context}, {num_symbols}) "
                             f"for T={num_symbols}, K={context}, got {q.shape}")
        row_error = np.abs(q.sum(axis=1) - 1.0).max()
        if not (np.isfinite(q).all() and (q >= 0).all() and row_error <= ROW_SUM_TOLERANCE):
            bad = int(np.argmax(~np.isfinite(q).all(axis=1) | (q < 0).any(axis=1)
                                | (np.abs(q.sum(axis=1) - 1.0) > ROW_SUM_TOLERANCE)))
            raise ValueError(f"probabilities must be finite, >= 0 and sum to one in every row (P is stochastic): "
                             f"row {bad} is {q[bad].tolist()[:8]} (sum {q[bad].sum()!r})")
        self.probabilities, self.num_symbols, self.context = q, num_symbols, context
        self._q3 = q.reshape(num_symbols, num_symbols ** (context - 1), num_symbols)  # (T, R, T)

    @property
    def num_states(self) -> int:
        return self.probabilities.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_states, self.num_states)

    @property
    def dtype(self) -> np.dtype:
        return self.probabilities.dtype

    def _check(self, name: str, v) -> np.ndarray:
        v = numeric_array(name, v, complex_ok=True)  # P is linear: complex vectors are fine
        if v.ndim not in (1, 2) or v.shape[0] != self.num_states:
            raise ValueError(f"{name} must have shape ({self.num_states},) or ({self.num_states}, n), got {v.shape}")
        return v

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """P v: v (S,) or (S, n) -> same shape; (P v)[s] = E[v(next state) | s]."""
        v = self._check("v", v)
        t, r = self.num_symbols, self.num_states // self.num_symbols
        v3 = v.reshape(r, t, -1)  # (R, T_y, n)
        out = np.matmul(self._q3.transpose(1, 0, 2), v3)  # (R, T_x, n): batched over r
        return out.transpose(1, 0, 2).reshape(v.shape)

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        """Pᵀ u: u (S,) or (S, n) -> same shape; a distribution μ (as a column) evolves to μ P."""
        u = self._check("u", u)
        t, r = self.num_symbols, self.num_states // self.num_symbols
        u3 = u.reshape(t, r, -1).transpose(1, 0, 2)  # (R, T_x, n)
        out = np.matmul(self._q3.transpose(1, 2, 0), u3)  # (R, T_y, n): batched over r
        return out.reshape(u.shape)

    def to_csr(self) -> scipy.sparse.csr_matrix:
        """P as a scipy CSR matrix (T nonzeros per row; explicit zeros where Q has them)."""
        s, t = self.num_states, self.num_symbols
        first_column = (np.arange(s) % (s // t)) * t  # (s mod T^{K-1})·T
        indices = (first_column[:, None] + np.arange(t)).ravel()
        indptr = np.arange(0, s * t + 1, t)
        return scipy.sparse.csr_matrix((self.probabilities.ravel(), indices, indptr), shape=self.shape)

    def to_dense(self) -> np.ndarray:
        """P as a dense (S, S) float64 array (S² entries: for small chains and tests); refused with
        DenseTooLargeError before allocating when it would not fit (T=2, K=20 was NumPy's 'Unable to allocate
        8.00 TiB')."""
        s = self.num_states
        check_fits(f"the dense transition matrix P of shape ({s:,}, {s:,}) (float64)", s * s * 8, torch.device("cpu"),
                   "Use the structured operator: matvec/rmatvec, to_csr() (T nonzeros per row) or as_linear_operator().")
        return self.to_csr().toarray()

    def as_linear_operator(self):
        """P as a scipy.sparse.linalg.LinearOperator (matvec, rmatvec, matmat)."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self.matvec, rmatvec=self.rmatvec, matmat=self.matvec,
                              rmatmat=self.rmatvec, dtype=self.dtype)

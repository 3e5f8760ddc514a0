"""Stationary distribution, spectral gap, total-variation curves and mixing time of a chain P.

Definitions (Levin & Peres, "Markov Chains and Mixing Times"):
* π: πP = π, Σπ = 1; the residual reported is ||πP − π||₁.
* spectral gap: 1 − |λ_2|, λ_2 the eigenvalue of P of second-largest modulus (the absolute gap;
  P need not be reversible, so the eigenvalues may be complex). t_rel = 1 / gap.
* TV curve from a state s: ||δ_s P^t − π||_TV = ½ Σ_s' |P^t(s, s') − π(s')|, t = 0, 1, ...
* d(t) = max_s ||δ_s P^t − π||_TV (non-increasing in t); t_mix(ε) = min{t : d(t) <= ε}, ε = 1/4.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from duat_kernels._validation import check_index, integer, numeric_array
from duat_kernels.markov.operator import ROW_SUM_TOLERANCE, TransitionOperator
from duat_kernels.operator_args import positive_tolerance

# Up to this many states P is handled densely (an S x S float64 matrix: 32 MiB at 2048); above it,
# sparse eigensolvers and structured products only.
DENSE_MAX_STATES = 2048
MIXING_EPSILON = 0.25
# Up to this many states all eigenvalues are computed (LAPACK); above it, ARPACK's 6 largest in modulus.
EIGVALS_MAX_STATES = 256


@dataclass(frozen=True)
class Stationary:
    pi: np.ndarray  # (S,) float64, sums to one
    residual: float  # ||πP − π||₁
    method: str  # "dense solve", "eigs + power" or "eigs + sparse solve" (a periodic P)


@dataclass(frozen=True)
class SpectralGap:
    gap: float  # 1 − |λ_2|
    second_eigenvalue: complex  # λ_2
    method: str  # "dense eigvals" or "eigs"


def _check_operator(op) -> None:
    """op must be a TransitionOperator: spectral_gap(q) of the probability table failed with "'numpy.ndarray'
    object has no attribute 'to_csr'"."""
    if not isinstance(op, TransitionOperator):
        raise TypeError(f"op must be a TransitionOperator (TransitionOperator(probabilities, num_symbols, context) or "
                        f"LanguageModelChain.operator(τ)), got {type(op).__name__}")


def _check_pi(op: TransitionOperator, pi, distribution: bool = False) -> np.ndarray:
    """pi (S,) as float64; with distribution=True, entries >= 0 summing to one (ROW_SUM_TOLERANCE), as the total
    variation distances to it need: mixing_time(op, -pi) returned None (t_mix 'above max_steps'), silently."""
    _check_operator(op)
    pi = numeric_array("pi", pi).astype(np.float64, copy=False)
    if pi.shape != (op.num_states,):
        raise ValueError(f"pi must be a distribution over the {op.num_states} states, shape ({op.num_states},), "
                         f"got {pi.shape}")
    if distribution and np.isfinite(pi).all() and not ((pi >= 0).all() and abs(pi.sum() - 1.0) <= ROW_SUM_TOLERANCE):
        raise ValueError(f"pi must be a distribution over the {op.num_states} states (entries >= 0 that sum to one), "
                         f"got entries in [{pi.min():.3g}, {pi.max():.3g}] summing to {pi.sum():.6g}")
    return pi


def residual(op: TransitionOperator, pi: np.ndarray) -> float:
    """||πP − π||₁ for π (S,)."""
    pi = _check_pi(op, pi)
    return float(np.abs(op.rmatvec(pi) - pi).sum())


def closed_class_count(op: TransitionOperator) -> int:
    """The number of closed communicating classes of P: strongly connected components of the graph s -> s'
    (P[s, s'] > 0) that no edge leaves. π is unique exactly when there is one (the multiplicity of the
    eigenvalue 1); transient states around it do not matter."""
    _check_operator(op)
    from scipy.sparse.csgraph import connected_components

    graph = op.to_csr().copy()  # to_csr's entries are a view of op.probabilities, which eliminate_zeros compacts
    graph.eliminate_zeros()  # csgraph takes stored zeros for edges
    count, labels = connected_components(graph, directed=True, connection="strong")
    rows = np.repeat(np.arange(op.num_states), np.diff(graph.indptr))
    leaving = labels[rows] != labels[graph.indices]
    return count - np.unique(labels[rows[leaving]]).size


NOT_UNIQUE = ("P is not irreducible (π is not unique): some transition probabilities are exactly 0, as when a small "
              "temperature underflows them; use a larger temperature")


def _check_one_closed_class(op: TransitionOperator) -> None:
    """Refuse P with more than one closed class (closed_class_count): π is not unique, and the eigenvalue 1 is
    repeated (λ_2 = 1, a spectral gap of 0 that says nothing about mixing)."""
    if closed_class_count(op) > 1:
        raise ValueError(NOT_UNIQUE)


def stationary_distribution(op: TransitionOperator, *, power_steps: int = 1000, tol: float = 1e-13) -> Stationary:
    """π of P (S,). ValueError when π is not unique (more than one closed class: closed_class_count), on
    both paths. Dense: solve (Pᵀ − I) π = 0 with Σπ = 1 replacing one equation. Larger: ARPACK's leading
    eigenvector of Pᵀ, then power steps π <- πP until ||πP − π||₁ <= tol or power_steps is reached; if that
    leaves the residual above tol (a periodic P, whose other unit-modulus eigenvalues can take ARPACK's pick),
    the dense path's equations solved by a sparse LU instead."""
    _check_operator(op)
    if integer(power_steps, tensors=False) is None:
        raise TypeError(f"power_steps must be an int, got {type(power_steps).__name__} {power_steps!r}")
    if power_steps < 0:
        raise ValueError(f"power_steps must be an int >= 0, got {power_steps}")
    power_steps = integer(power_steps)
    positive_tolerance(tol)
    s = op.num_states
    _check_one_closed_class(op)  # ARPACK returned one of the stationary distributions without a word
    if s <= DENSE_MAX_STATES:
        a = op.to_dense().T - np.eye(s)
        a[-1] = 1.0  # normalisation row: Σπ = 1
        b = np.zeros(s)
        b[-1] = 1.0
        try:
            pi = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            raise ValueError(NOT_UNIQUE) from None
        method = "dense solve"
    else:
        from scipy.sparse.linalg import eigs

        _, vec = eigs(op.to_csr().T.tocsr(), k=1, which="LM", v0=np.full(s, 1.0 / s), tol=1e-14)
        pi = np.abs(vec[:, 0].real)
        method = "eigs + power"
    pi = np.clip(pi, 0.0, None)
    pi /= pi.sum()
    res = residual(op, pi)
    for _ in range(power_steps if method != "dense solve" else 0):
        if res <= tol:
            break
        pi = op.rmatvec(pi)
        pi /= pi.sum()
        res = residual(op, pi)
    if method != "dense solve" and res > tol:
        # a periodic P has other eigenvalues of modulus 1 (roots of unity): ARPACK may return one of their
        # eigenvectors, and πP^t cycles instead of converging; solve for π as the dense path does
        solved = _sparse_solve(op)
        solved_res = residual(op, solved)
        if solved_res < res:
            pi, res, method = solved, solved_res, "eigs + sparse solve"
    return Stationary(pi, res, method)


def _sparse_solve(op: TransitionOperator) -> np.ndarray:
    """π (S,) from (Pᵀ − I) π = 0 with Σπ = 1 replacing the last equation, by a sparse LU (SuperLU): the rows of
    Pᵀ − I sum to zero, so with one closed class the other S − 1 have rank S − 1 and the system is regular."""
    import scipy.sparse
    from scipy.sparse.linalg import spsolve

    s = op.num_states
    a = (op.to_csr().T - scipy.sparse.identity(s, format="csr")).tolil()
    a[s - 1] = np.ones(s)  # normalisation row: Σπ = 1
    b = np.zeros(s)
    b[-1] = 1.0
    pi = np.clip(spsolve(a.tocsc(), b), 0.0, None)
    return pi / pi.sum()


def token_marginal(pi: np.ndarray, num_symbols: int, context: int, position: int = -1) -> np.ndarray:
    """(T,): the distribution of x_position (default the last, the newest token) under π (S,).
    Under a stationary π every position has the same marginal (up to the residual)."""
    if integer(num_symbols) is None or integer(context) is None or num_symbols < 1 or context < 1:
        raise ValueError(f"num_symbols and context must be ints >= 1, got {num_symbols!r} and {context!r}")
    pi = numeric_array("pi", pi)
    if pi.shape != (num_symbols ** context,):
        raise ValueError(f"pi must have shape (T^K,) = ({num_symbols ** context},) for T={num_symbols}, K={context}, "
                         f"got {pi.shape}")
    position = check_index("position", position, context, f"K={context} context positions")  # 5 wrapped to 5 % K
    return pi.reshape((num_symbols,) * context).sum(axis=tuple(k for k in range(context) if k != position % context))


def spectral_gap(op: TransitionOperator) -> SpectralGap:
    """1 − |λ_2| of P; all eigenvalues for small S, the 6 largest in modulus (ARPACK) otherwise. ValueError, as
    in stationary_distribution, when P has more than one closed class (closed_class_count)."""
    _check_one_closed_class(op)  # the gap was 0 (λ_2 = 1) where stationary_distribution refused the chain
    if op.num_states <= EIGVALS_MAX_STATES:
        vals, method = np.linalg.eigvals(op.to_dense()), "dense eigvals"
    else:
        from scipy.sparse.linalg import eigs

        v0 = np.random.default_rng(0).random(op.num_states)  # seeded (reproducible); not the all-ones eigenvector
        vals = eigs(op.to_csr(), k=6, which="LM", v0=v0, return_eigenvectors=False, tol=1e-12)
        method = "eigs"
    vals = vals[np.argsort(-np.abs(vals))]
    # the leading eigenvalue is 1 (stochastic P); λ_2 is the next one in modulus
    lam2 = complex(vals[1])
    return SpectralGap(max(0.0, 1.0 - abs(lam2)), lam2, method)  # |λ_2| may round above 1


def constant_states(num_symbols: int, context: int) -> np.ndarray:
    """Indices of the T states (v, v, ..., v): v·(T^K − 1)/(T − 1)."""
    if integer(num_symbols) is None or num_symbols < 2:
        raise ValueError(f"num_symbols must be an int >= 2 (a chain over one symbol has one state), got {num_symbols!r}")
    if integer(context) is None or context < 1:
        raise ValueError(f"context must be an int >= 1, got {context!r}")
    return np.arange(num_symbols) * ((num_symbols ** context - 1) // (num_symbols - 1))


def tv_curves(op: TransitionOperator, pi: np.ndarray, starts: np.ndarray, steps: int) -> np.ndarray:
    """(len(starts), steps + 1): ||δ_s P^t − π||_TV for each start s and t = 0..steps (structured products)."""
    pi = _check_pi(op, pi, distribution=True)
    if integer(steps) is None or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    starts = numeric_array("starts", starts)
    if starts.ndim != 1 or (starts.size and starts.dtype.kind not in "iu"):  # 1.7 was truncated to state 1
        raise ValueError(f"starts must be a 1-D sequence of integer state indices, got {starts.tolist()!r:.80}")
    starts = starts.astype(np.int64)
    if starts.size and not ((starts >= 0) & (starts < op.num_states)).all():
        raise ValueError(f"starts must be state indices in [0, {op.num_states}), got {starts.tolist()[:8]}")
    dist = np.zeros((op.num_states, starts.size))
    dist[starts, np.arange(starts.size)] = 1.0
    curves = np.empty((starts.size, steps + 1))
    for t in range(steps + 1):
        curves[:, t] = 0.5 * np.abs(dist - pi[:, None]).sum(axis=0)
        if t < steps:
            dist = op.rmatvec(dist)
    return curves


def worst_tv_curve(op: TransitionOperator, pi: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """d(t) = max over all S states of ||δ_s P^t − π||_TV, and the maximising state, for t = 0..steps:
    two (steps + 1,) arrays (float64, int64); S x S work per step."""
    _check_operator(op)
    every = tv_curves(op, pi, np.arange(op.num_states), steps)
    return every.max(axis=0), every.argmax(axis=0)


def _max_tv(rows: np.ndarray, pi: np.ndarray) -> float:
    return float(0.5 * np.abs(rows - pi).sum(axis=1).max())


def mixing_time(op: TransitionOperator, pi: np.ndarray, epsilon: float = MIXING_EPSILON,
                max_steps: int = 1 << 20) -> int | None:
    """t_mix(ε) = min{t : d(t) <= ε} over all states, or None if above max_steps.

    Dense P^(2^i) by repeated squaring until d <= ε, then binary lifting down the powers (d is
    non-increasing, so the largest t with d(t) > ε is found bit by bit): O(log t) S x S products.
    Needs S <= DENSE_MAX_STATES."""
    pi = _check_pi(op, pi, distribution=True)
    s = op.num_states
    if s > DENSE_MAX_STATES:
        raise ValueError(f"mixing_time over all states needs S <= {DENSE_MAX_STATES} states, got {s}; "
                         "use tv_curves from a few starting states instead")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be a number in (0, 1), got {epsilon!r}")
    if integer(max_steps, tensors=False) is None or max_steps < 0:  # 2.5 or -1 returned None
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    if not np.isfinite(pi).all():  # d(t) would be NaN, never > ε: t_mix came out as 1
        raise ValueError("pi must be finite (a distribution over the states), got NaN or inf entries")
    if _max_tv(np.eye(s), pi) <= epsilon:
        return 0
    powers = [op.to_dense()]  # powers[i] = P^(2^i)
    while _max_tv(powers[-1], pi) > epsilon:
        if 1 << (len(powers) - 1) >= max_steps:  # d(max_steps) >= d(2^i) > ε: t_mix > max_steps
            return None  # (it stopped at 2^(i+1) > max_steps: t_mix = 3 <= max_steps = 3 gave None)
        powers.append(powers[-1] @ powers[-1])
    current, t = np.eye(s), 0  # invariant: d(t) > ε for current = P^t
    for i in range(len(powers) - 2, -1, -1):
        candidate = current @ powers[i]
        if _max_tv(candidate, pi) > epsilon:
            current, t = candidate, t + (1 << i)
    return t + 1 if t + 1 <= max_steps else None

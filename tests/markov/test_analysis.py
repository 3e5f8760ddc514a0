"""π, spectral gap, TV curves and mixing time on chains where they are known exactly, and against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from duat_kernels.markov import LanguageModelChain, TransitionOperator, analysis
from duat_kernels.markov.analysis import (mixing_time, residual, spectral_gap, stationary_distribution, tv_curves,
                                          worst_tv_curve)

from .test_operator import random_probabilities

ABS_PI = 10 * np.finfo(np.float64).eps
TWO_STATE = [(0.3, 0.1), (0.9, 0.8), (0.05, 0.02)]  # (a, b): P = [[1-a, a], [b, 1-b]]; λ₂ = 1-a-b (< 0 for the second)


def brute_force_mixing_time(p: np.ndarray, pi: np.ndarray, eps: float = 0.25) -> int:
    t, power = 0, np.eye(len(pi))
    while 0.5 * np.abs(power - pi).sum(axis=1).max() > eps:
        t, power = t + 1, power @ p
    return t


@pytest.mark.parametrize("a,b", TWO_STATE, ids=[f"a{a}-b{b}" for a, b in TWO_STATE])
def test_two_state_chain_exact(a, b):
    # K = 1 over 2 symbols, built from logits = log P at τ = 1 (so it also goes through LanguageModelChain)
    chain = LanguageModelChain(np.log([[1 - a, a], [b, 1 - b]]), ("u", "v"), 1)
    op = chain.operator(1.0)
    lam = 1 - a - b
    st = analysis.stationary_distribution(op)
    np.testing.assert_allclose(st.pi, [b / (a + b), a / (a + b)], rtol=1e-14)
    assert st.residual <= 1e-15
    gap = analysis.spectral_gap(op)
    assert gap.second_eigenvalue == pytest.approx(lam, abs=1e-14)
    assert gap.gap == pytest.approx(1 - abs(lam), abs=1e-14)
    steps = 30
    t = np.arange(steps + 1)
    curves = analysis.tv_curves(op, st.pi, np.array([0, 1]), steps)
    # δ_0 P^t − π = λ^t (a, −a)/(a+b): TV = a/(a+b)·|λ|^t; from state 1: b/(a+b)·|λ|^t
    np.testing.assert_allclose(curves, np.outer([a / (a + b), b / (a + b)], abs(lam) ** t), rtol=1e-9, atol=1e-15)
    d = max(a, b) / (a + b) * abs(lam) ** t
    worst, argmax = analysis.worst_tv_curve(op, st.pi, steps)
    np.testing.assert_allclose(worst, d, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(argmax, 0 if a > b else 1)  # the larger TV prefactor
    expected = next(s for s in range(10_000) if max(a, b) / (a + b) * abs(lam) ** s <= 0.25)
    assert analysis.mixing_time(op, st.pi) == expected


IID = [(3, 3, 1.0), (3, 3, 0.5), (2, 4, 2.0)]


@pytest.mark.parametrize("t,k,tau", IID, ids=[f"T{t}-K{k}-tau{tau}" for t, k, tau in IID])
def test_iid_chain_exact(t, k, tau):
    """Logits independent of the context: y ~ q_τ ∝ q^(1/τ) i.i.d., so π(s) = Π_k q_τ(x_k), P^K = 1π (all other
    eigenvalues 0), and from s after t < K steps the first K−t symbols are still x_{t+1..K}:
    ||δ_s P^t − π||_TV = 1 − Π_{k>t} q_τ(x_k)."""
    q = np.arange(1, t + 1, dtype=np.float64) ** 2
    chain = LanguageModelChain(np.tile(np.log(q), (t ** k, 1)), tuple("uvwz"[:t]), k, (tau,))
    op = chain.operator(tau)
    q_tau = q ** (1 / tau) / (q ** (1 / tau)).sum()
    st = analysis.stationary_distribution(op)
    product = q_tau
    for _ in range(k - 1):
        product = np.outer(product, q_tau).ravel()
    # the dense solve is backward stable: entries accurate to a few ulps of max π (<= 1) in absolute terms
    np.testing.assert_allclose(st.pi, product, rtol=1e-12, atol=ABS_PI)
    for position in range(k):
        np.testing.assert_allclose(analysis.token_marginal(st.pi, t, k, position), q_tau, rtol=1e-12, atol=ABS_PI)
    # 0 is a defective eigenvalue (Jordan blocks of size K), which rounding u moves by O(u^(1/K))
    assert analysis.spectral_gap(op).gap == pytest.approx(1.0, abs=10 * np.finfo(float).eps ** (1 / k))
    starts = analysis.constant_states(t, k)
    steps = k + 2
    expected = np.array([[1 - q_tau[v] ** (k - s) if s < k else 0.0 for s in range(steps + 1)] for v in range(t)])
    np.testing.assert_allclose(analysis.tv_curves(op, st.pi, starts, steps), expected, atol=1e-13)
    worst = np.array([1 - q_tau.min() ** (k - s) if s < k else 0.0 for s in range(steps + 1)])
    np.testing.assert_allclose(analysis.worst_tv_curve(op, st.pi, steps)[0], worst, atol=1e-13)
    assert analysis.mixing_time(op, st.pi) == next(s for s in range(k + 1) if worst[s] <= 0.25)


@pytest.mark.parametrize("n,p", [(5, 0.3), (6, 0.5), (4, 0.9)])
def test_noisy_rotation_uniform_pi_complex_gap(n, p):
    """P = (1−p) I + p·C (C the cyclic shift): doubly stochastic, so π is uniform; eigenvalues 1 − p + p ω^j."""
    q = (1 - p) * np.eye(n) + p * np.roll(np.eye(n), 1, axis=1)
    op = TransitionOperator(q, n, 1)
    st = analysis.stationary_distribution(op)
    np.testing.assert_allclose(st.pi, np.full(n, 1 / n), rtol=1e-13)
    lam = 1 - p + p * np.exp(2j * np.pi * np.arange(1, n) / n)
    gap = analysis.spectral_gap(op)
    assert gap.gap == pytest.approx(1 - np.abs(lam).max(), abs=1e-13)
    assert abs(gap.second_eigenvalue) == pytest.approx(np.abs(lam).max(), abs=1e-13)
    assert analysis.mixing_time(op, st.pi) == brute_force_mixing_time(q, st.pi)


@pytest.mark.parametrize("t,k,seed", [(3, 2, 0), (2, 5, 1), (4, 3, 2)])
def test_random_chain_against_brute_force(t, k, seed):
    # peaked rows (probabilities ∝ r^6) so that mixing takes several steps
    q = random_probabilities(t, k, seed) ** 6
    op = TransitionOperator(q / q.sum(axis=1, keepdims=True), t, k)
    p = op.to_dense()
    st = analysis.stationary_distribution(op)
    assert st.residual <= 1e-13
    assert np.abs(st.pi @ p - st.pi).sum() <= 1e-13 and st.pi.min() >= 0
    assert analysis.mixing_time(op, st.pi) == brute_force_mixing_time(p, st.pi)
    assert analysis.mixing_time(op, st.pi, max_steps=1) is None or brute_force_mixing_time(p, st.pi) <= 1
    vals = np.sort(np.abs(np.linalg.eigvals(p)))
    assert analysis.spectral_gap(op).gap == pytest.approx(1 - vals[-2], abs=1e-12)


@pytest.mark.parametrize("n,p", [(5, 0.3), (6, 0.5)])
def test_mixing_time_at_every_max_steps(n, p):
    """t_mix when t_mix <= max_steps, else None, for every max_steps around t_mix: with max_steps = 3 and
    t_mix = 3 (any max_steps that is no power of two) it returned None, as it stopped squaring at P^4 > 3."""
    q = (1 - p) * np.eye(n) + p * np.roll(np.eye(n), 1, axis=1)
    op = TransitionOperator(q, n, 1)
    pi = analysis.stationary_distribution(op).pi
    expected = brute_force_mixing_time(q, pi)
    assert expected >= 5  # several max_steps that are no power of two lie below and at t_mix
    for max_steps in range(2 * expected + 2):
        assert analysis.mixing_time(op, pi, max_steps=max_steps) == (expected if expected <= max_steps else None)


def test_sparse_paths_match_dense(monkeypatch):
    """Above the dense limits: ARPACK (+ power steps) for π and λ₂ give the dense answers."""
    q = random_probabilities(3, 5, seed=3) ** 4
    op = TransitionOperator(q / q.sum(axis=1, keepdims=True), 3, 5)  # 243 states
    dense_pi, dense_gap = analysis.stationary_distribution(op), analysis.spectral_gap(op)
    monkeypatch.setattr(analysis, "DENSE_MAX_STATES", 100)
    monkeypatch.setattr(analysis, "EIGVALS_MAX_STATES", 100)
    sparse_pi, sparse_gap = analysis.stationary_distribution(op), analysis.spectral_gap(op)
    assert (sparse_pi.method, sparse_gap.method) == ("eigs + power", "eigs")
    assert sparse_pi.residual <= 1e-13
    np.testing.assert_allclose(sparse_pi.pi, dense_pi.pi, rtol=1e-10, atol=ABS_PI)
    assert sparse_gap.gap == pytest.approx(dense_gap.gap, abs=1e-10)
    with pytest.raises(ValueError, match="mixing_time over all states needs S <= 100"):
        analysis.mixing_time(op, sparse_pi.pi)


def _two_absorbing_states() -> TransitionOperator:
    """T = 2, K = 3 (8 states): (0, 0, 0) and (1, 1, 1) repeat their symbol for ever, two closed classes."""
    q = random_probabilities(2, 3, seed=1)
    q[[0, 7]] = [[1.0, 0.0], [0.0, 1.0]]
    return TransitionOperator(q, 2, 3)


def _one_closed_class() -> TransitionOperator:
    """T = 2, K = 3: symbol 0 is never followed by 1, so the chain ends in (0, 0, 0); the other 7 states are
    transient (reducible, yet π = δ_(0,0,0) is unique)."""
    q = random_probabilities(2, 3, seed=2)
    q[:, 1] *= np.arange(8) % 2  # states ending in 0 emit 0
    return TransitionOperator(q / q.sum(axis=1, keepdims=True), 2, 3)


@pytest.mark.parametrize("what", ["stationary_distribution", "spectral_gap"])
@pytest.mark.parametrize("dense_limit", [analysis.DENSE_MAX_STATES, 2], ids=["dense", "arpack"])
@pytest.mark.parametrize("op", [TransitionOperator(np.eye(3), 3, 1), _two_absorbing_states()],
                         ids=["identity", "two-absorbing"])
def test_reducible_chain_is_refused(op, dense_limit, what, monkeypatch):
    """Identity P (every state absorbing), or two absorbing states: π is not unique. The dense solve said so;
    the ARPACK path (above DENSE_MAX_STATES) returned one of the stationary distributions, and spectral_gap
    reported a gap of 0 (the eigenvalue 1 repeated) where stationary_distribution refused the chain."""
    monkeypatch.setattr(analysis, "DENSE_MAX_STATES", dense_limit)
    monkeypatch.setattr(analysis, "EIGVALS_MAX_STATES", dense_limit)
    with pytest.raises(ValueError, match=r"P is not irreducible \(π is not unique\)"):
        getattr(analysis, what)(op)


@pytest.mark.parametrize("dense_limit", [analysis.EIGVALS_MAX_STATES, 4], ids=["dense", "arpack"])
def test_one_closed_class_has_a_gap(dense_limit, monkeypatch):
    """Transient states do not make the chain refused: λ_2 of P is that of its transient part (the closed class
    is one state), its largest eigenvalue in modulus after the 1."""
    op = _one_closed_class()
    monkeypatch.setattr(analysis, "EIGVALS_MAX_STATES", dense_limit)
    vals = np.linalg.eigvals(op.to_dense())
    lam2 = sorted(vals, key=abs)[-2]
    assert analysis.spectral_gap(op).gap == pytest.approx(1 - abs(lam2), abs=1e-10)


def test_one_closed_class_has_the_same_pi_on_both_paths(monkeypatch):
    """Transient states do not make π ambiguous: both paths give δ on the one closed class."""
    op = _one_closed_class()
    dense = analysis.stationary_distribution(op)
    monkeypatch.setattr(analysis, "DENSE_MAX_STATES", 4)
    sparse = analysis.stationary_distribution(op)
    assert (dense.method, sparse.method) == ("dense solve", "eigs + power")
    np.testing.assert_allclose(sparse.pi, np.eye(8)[0], atol=1e-12)
    np.testing.assert_allclose(dense.pi, np.eye(8)[0], atol=1e-12)


def _period_three_chain() -> TransitionOperator:
    """T = 6, K = 2 (36 states): after a symbol v comes a symbol w with w = v + 1 (mod 3), random otherwise.
    One closed class (the states whose two symbols follow that rule), period 3, a non-uniform π."""
    q = random_probabilities(6, 2, seed=0)
    last = np.arange(36) % 6
    q[(last[:, None] + 1) % 3 != np.arange(6)[None] % 3] = 0.0
    return TransitionOperator(q / q.sum(axis=1, keepdims=True), 6, 2)


@pytest.mark.parametrize("op", [TransitionOperator(np.roll(np.eye(7), 1, axis=1), 7, 1), _period_three_chain()],
                         ids=["cycle-7", "period-3"])
def test_periodic_chain_has_the_dense_pi_on_the_arpack_path(op, monkeypatch):
    """A periodic chain has other eigenvalues of modulus 1 (the p-th roots of unity): ARPACK returned the
    eigenvector of one of them, with a residual ||πP − π||₁ near 0.5 that power steps cannot lower (πP^t
    cycles), and no error. Both paths now give the dense solve's π."""
    dense = analysis.stationary_distribution(op)
    monkeypatch.setattr(analysis, "DENSE_MAX_STATES", 4)
    sparse = analysis.stationary_distribution(op)
    assert dense.method == "dense solve" and sparse.method.startswith("eigs")
    assert sparse.residual <= 1e-13
    assert sparse.residual == analysis.residual(op, sparse.pi)
    np.testing.assert_allclose(sparse.pi, dense.pi, rtol=1e-10, atol=ABS_PI)


def test_pi_starts_and_state_labels_are_checked():
    op = TransitionOperator(np.full((9, 3), 1 / 3), 3, 2)
    pi = np.full(9, 1 / 9)
    with pytest.raises(ValueError, match=r"pi must be a distribution over the 9 states, shape \(9,\), got \(3,\)"):
        analysis.mixing_time(op, pi[:3])  # was "operands could not be broadcast together"
    with pytest.raises(ValueError, match=r"pi must be a distribution over the 9 states"):
        analysis.tv_curves(op, pi[:, None], [0], 2)
    with pytest.raises(ValueError, match=r"starts must be state indices in \[0, 9\), got \[9\]"):
        analysis.tv_curves(op, pi, [9], 2)  # was numpy's IndexError
    chain = LanguageModelChain(np.zeros((9, 3)), tuple("abc"), 2)
    assert chain.state_label(np.int64(8)) == "cc"
    for bad in (9, -1, 1.0):  # 9 was labelled "aa" (wrapped around)
        with pytest.raises(ValueError, match=r"index must be a state index in \[0, 9\)"):
            chain.state_label(bad)


def test_counts_and_symbols_are_checked():
    op = TransitionOperator(np.full((9, 3), 1 / 3), 3, 2)
    with pytest.raises(ValueError, match=r"steps must be an int >= 0, got -1"):
        analysis.tv_curves(op, np.full(9, 1 / 9), [0], -1)  # was an empty array
    with pytest.raises(ValueError, match=r"num_symbols must be an int >= 2"):
        analysis.constant_states(1, 3)  # was ZeroDivisionError
    with pytest.raises(ValueError, match=r"context must be an int >= 1"):
        analysis.constant_states(3, 0)
    assert analysis.constant_states(3, 2).tolist() == [0, 4, 8]
    with pytest.raises(ValueError, match=r"symbols must be distinct, got \['a', 'a', 'b'\]"):
        LanguageModelChain(np.zeros((9, 3)), tuple("aab"), 2)  # state_index was ambiguous



def test_bad_starts_epsilon_max_steps_pi_and_position_are_refused():
    # each was taken silently: starts 1.7 / True were read as state 1, max_steps -1 or 2.5 gave None
    # (never mixes), a NaN π gave t_mix = 1 (NaN > ε is false), position 5 of K = 2 was position 1,
    # 1.5 gave a number; epsilon "0.1" and a wrong-sized π failed inside with NumPy's raw errors
    op = TransitionOperator(random_probabilities(3, 2), 3, 2)
    pi = analysis.stationary_distribution(op).pi
    for starts in ([1.7], [True], [[0, 1]]):
        with pytest.raises(ValueError, match="starts must be a 1-D sequence of integer state indices"):
            analysis.tv_curves(op, pi, starts, 2)
    with pytest.raises(TypeError, match="starts must hold real numbers, got an array of dtype <U1"):
        analysis.tv_curves(op, pi, ["a"], 2)
    for max_steps in (-1, 2.5, "3"):
        with pytest.raises(ValueError, match="max_steps must be an int >= 0"):
            analysis.mixing_time(op, pi, 0.25, max_steps)
    for eps in ("0.1", True, float("nan")):
        with pytest.raises(ValueError, match="epsilon must be a number in"):
            analysis.mixing_time(op, pi, eps)
    with pytest.raises(ValueError, match="pi must be finite"):
        analysis.mixing_time(op, np.full(9, np.nan))
    assert analysis.mixing_time(op, pi, 0.25, np.int64(1 << 20)) == analysis.mixing_time(op, pi)
    with pytest.raises(IndexError, match=r"position=5 is out of range for K=2"):
        analysis.token_marginal(pi, 3, 2, 5)
    with pytest.raises(TypeError, match="position must be an int, got float"):
        analysis.token_marginal(pi, 3, 2, 1.5)
    with pytest.raises(ValueError, match=r"pi must have shape \(T\^K,\) = \(27,\) for T=3, K=3, got \(9,\)"):
        analysis.token_marginal(pi, 3, 3)
    np.testing.assert_array_equal(analysis.token_marginal(pi, 3, 2, -2), analysis.token_marginal(pi, 3, 2, 0))


def test_stationary_arguments_and_residual_pi_are_checked(monkeypatch):
    """power_steps and tol were used unchecked: 1.5 failed in range() on the ARPACK path ('float' object
    cannot be interpreted as an integer) and was ignored on the dense one, as were -1, NaN and '1e-3';
    residual did not check π (a torch tensor failed with numpy's 'unsupported operand type(s) for -',
    a wrong size was blamed on 'u')."""
    import torch

    q = random_probabilities(3, 5, seed=3)
    op = TransitionOperator(q / q.sum(axis=1, keepdims=True), 3, 5)
    for dense_limit in (analysis.DENSE_MAX_STATES, 100):
        monkeypatch.setattr(analysis, "DENSE_MAX_STATES", dense_limit)
        for kwargs, exc, message in [(dict(power_steps=1.5), TypeError, "power_steps must be an int, got float"),
                                     (dict(power_steps=-1), ValueError, "power_steps must be an int >= 0, got -1"),
                                     (dict(tol=float("nan")), ValueError, "tol must be a finite number >= 0"),
                                     (dict(tol="1e-3"), ValueError, "tol must be a finite number >= 0")]:
            with pytest.raises(exc, match=message):
                analysis.stationary_distribution(op, **kwargs)
    pi = analysis.stationary_distribution(op, power_steps=np.int64(5)).pi
    assert analysis.residual(op, torch.from_numpy(pi)) == analysis.residual(op, pi)
    with pytest.raises(ValueError, match=r"pi must be a distribution over the 243 states, shape \(243,\), got \(3,\)"):
        analysis.residual(op, pi[:3])


@pytest.mark.parametrize("call", [
    lambda q, pi: mixing_time(q, pi), lambda q, pi: spectral_gap(q), lambda q, pi: stationary_distribution(q),
    lambda q, pi: tv_curves(q, pi, [0], 2), lambda q, pi: worst_tv_curve(q, pi, 2), lambda q, pi: residual(q, pi),
])
def test_a_probability_table_for_the_operator_is_refused_by_name(call):
    # spectral_gap(q) failed with "'numpy.ndarray' object has no attribute 'to_csr'"
    q = np.full((4, 2), 0.5)
    with pytest.raises(TypeError, match="op must be a TransitionOperator .*, got ndarray"):
        call(q, np.full(4, 0.25))


@pytest.mark.parametrize("pi", [-np.full(4, 0.25), np.full(4, 0.5), np.array([1.5, -0.5, 0.0, 0.0])])
def test_tv_distances_need_a_distribution(pi):
    # mixing_time(op, -pi) returned None ('above max_steps') and tv_curves distances to a non-distribution
    op = TransitionOperator(np.full((4, 2), 0.5), 2, 2)
    for call in (lambda: mixing_time(op, pi), lambda: tv_curves(op, pi, [0], 2), lambda: worst_tv_curve(op, pi, 2)):
        with pytest.raises(ValueError, match=r"pi must be a distribution over the 4 states \(entries >= 0 that sum"):
            call()
    assert mixing_time(op, np.full(4, 0.25)) == 2  # two steps forget the two-symbol context

"""TransitionOperator: the structured products and the CSR matrix against P built state by state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from duat_kernels.markov import TransitionOperator

SIZES = [(2, 1), (3, 1), (2, 3), (3, 2), (4, 3), (5, 2)]


def random_probabilities(t: int, k: int, seed: int = 0) -> np.ndarray:
    q = np.random.default_rng(seed).random((t ** k, t)) + 1e-3
    return q / q.sum(axis=1, keepdims=True)


def dense_by_enumeration(q: np.ndarray, t: int, k: int) -> np.ndarray:
    """P[s, s'] from the definition: s = (x_1..x_K) in lexicographic order, s' = (x_2..x_K, y)."""
    states = list(itertools.product(range(t), repeat=k))
    index = {s: i for i, s in enumerate(states)}
    p = np.zeros((len(states), len(states)))
    for i, s in enumerate(states):
        for y in range(t):
            p[i, index[s[1:] + (y,)]] += q[i, y]
    return p


@pytest.mark.parametrize("t,k", SIZES, ids=[f"T{t}-K{k}" for t, k in SIZES])
def test_products_and_csr_match_enumeration(t, k):
    q = random_probabilities(t, k)
    op = TransitionOperator(q, t, k)
    p = dense_by_enumeration(q, t, k)
    rng = np.random.default_rng(1)
    v, block = rng.standard_normal(t ** k), rng.standard_normal((t ** k, 3))
    np.testing.assert_allclose(op.matvec(v), p @ v, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(op.rmatvec(v), p.T @ v, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(op.matvec(block), p @ block, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(op.rmatvec(block), p.T @ block, rtol=1e-13, atol=1e-13)
    csr = op.to_csr()
    assert csr.shape == (t ** k, t ** k) and csr.nnz == t ** (k + 1)
    np.testing.assert_array_equal(csr.toarray(), p)
    lin = op.as_linear_operator()
    np.testing.assert_allclose(lin.rmatvec(v), p.T @ v, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lin @ block, p @ block, rtol=1e-13, atol=1e-13)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"probabilities must have shape \(T\^K, T\) = \(9, 3\)"):
        TransitionOperator(np.full((8, 3), 1 / 3), 3, 2)
    with pytest.raises(ValueError, match="num_symbols >= 2 and context >= 1"):
        TransitionOperator(np.ones((1, 1)), 1, 1)
    op = TransitionOperator(random_probabilities(2, 2), 2, 2)
    with pytest.raises(ValueError, match=r"v must have shape \(4,\) or \(4, n\)"):
        op.matvec(np.ones(5))


def test_rejects_probabilities_that_are_not_stochastic():
    """A zero, negative, NaN or unnormalised row used to be taken: stationary_distribution then returned
    a 'π' with residual 0.04 and no error."""
    q = random_probabilities(3, 2)
    for row, values in ((4, [0, 0, 0]), (0, [1.5, -0.5, 0]), (8, [np.nan, 0.5, 0.5]), (2, [0.5, 0.5, 0.5])):
        bad = q.copy()
        bad[row] = values
        with pytest.raises(ValueError, match=rf"sum to one in every row .*: row {row} is"):
            TransitionOperator(bad, 3, 2)
    TransitionOperator(q.astype(np.float32), 3, 2)  # float32 rounding of the row sums is fine
    TransitionOperator(q, np.int64(3), np.int32(2))
    with pytest.raises(TypeError, match="num_symbols and context must be ints"):
        TransitionOperator(q, 3.0, 2)


def test_non_numeric_and_complex_arrays_are_refused():
    # complex probabilities lost their imaginary part with only a ComplexWarning; string or object
    # arrays failed inside NumPy (UFuncTypeError, "could not convert string to float")
    q = random_probabilities(2, 2)
    with pytest.raises(TypeError, match="probabilities must hold real numbers, got an array of dtype complex128"):
        TransitionOperator(q.astype(complex), 2, 2)
    with pytest.raises(TypeError, match="probabilities must hold real numbers, got an array of dtype <U"):
        TransitionOperator(q.astype(str), 2, 2)
    op = TransitionOperator(q, 2, 2)
    with pytest.raises(TypeError, match="v must hold real or complex numbers, got an array of dtype <U1"):
        op.matvec(np.array(["a"] * 4))
    with pytest.raises(TypeError, match="u must hold real or complex numbers, got an array of dtype object"):
        op.rmatvec(np.array([None] * 4))
    v = np.arange(4.0)
    np.testing.assert_allclose(op.matvec(v + 1j * v), op.matvec(v) + 1j * op.matvec(v), rtol=1e-14)


def test_state_counts_beyond_memory_are_refused_by_every_constructor():
    # TransitionOperator(q, 2, 10**6) and LanguageModelChain(logits, ("a", "b"), 10**5) failed formatting their
    # own message ("Exceeds the limit (4300 digits) for integer string conversion")
    from duat_kernels.markov import LanguageModelChain
    from duat_kernels.markov.operator import state_count

    q = random_probabilities(2, 3)
    for call in (lambda: TransitionOperator(q, 2, 10 ** 6), lambda: LanguageModelChain(q, ("a", "b"), 10 ** 5),
                 lambda: state_count(2, 63)):
        with pytest.raises(MemoryError, match=r"states, more than any memory holds"):
            call()
    assert state_count(3, 2) == 9


def test_dense_matrix_beyond_memory_is_refused_before_allocating():
    # T=2, K=20: P is (2^20, 2^20) float64, 8 TiB; to_dense() failed with NumPy's "Unable to allocate 8.00 TiB"
    from duat_kernels import DenseTooLargeError

    op = TransitionOperator(np.full((2 ** 20, 2), 0.5), 2, 20)
    with pytest.raises(DenseTooLargeError, match=r"P of shape \(1,048,576, 1,048,576\) .* needs 8.0 TiB .* to_csr\(\)"):
        op.to_dense()
    np.testing.assert_array_equal(TransitionOperator(np.full((4, 2), 0.5), 2, 2).to_dense(), np.full((4, 4), 0.5) *
                                  np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]))

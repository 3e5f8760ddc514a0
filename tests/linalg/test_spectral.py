"""Singular values through scipy on the matrix-free operator against torch.linalg on the dense W'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import duat_kernels as dk
from duat_kernels import linalg

from conftest import random_layer


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm_and_top_singular_values(layout, dtype):
    lay = random_layer(1, 6, 2, tokens=10, head_dim=4, m_in=8, m_out=6, causal=True, batched=False, dtype=dtype)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout)
    dense = op.to_dense(dtype=torch.float64)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert op.spectral_norm() == pytest.approx(torch.linalg.matrix_norm(dense, 2).item(), rel=rtol)
    np.testing.assert_allclose(op.singular_values(4), torch.linalg.svdvals(dense)[:4].numpy(), rtol=rtol)


def test_linear_operator_products():
    lay = random_layer(1, 3, tokens=5, m_in=4, m_out=3, batched=False, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    lin = op.as_linear_operator()
    dense = op.to_dense().numpy()
    rng = np.random.default_rng(0)
    x, y, xs = rng.random(20), rng.random(15), rng.random((20, 3))

    def close(got, matrix, vectors):  # float64 rounding is relative to Σ |w| |x|, not to a sum that may cancel
        assert np.all(np.abs(got - matrix @ vectors) <= 1e-12 * (np.abs(matrix) @ np.abs(vectors)))

    close(lin @ x, dense, x)
    close(lin.rmatvec(y), dense.T, y)
    close(lin @ xs, dense, xs)
    close(lin.T @ y, dense.T, y)


def test_refusals():
    lay = random_layer(2, 2, tokens=3, m_in=4, m_out=3)
    with pytest.raises(ValueError, match="needs an unbatched HVOOperator"):
        dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"]).spectral_norm()
    op = dk.HVOOperator(lay["attn"][0], lay["w_v"], lay["w_o"])
    with pytest.raises(ValueError, match=r"k must be in \[1, 9\]"):
        op.singular_values(10)


def test_every_singular_value_empty_and_non_finite():
    lay = random_layer(1, 2, tokens=3, m_in=2, m_out=2, batched=False, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    np.testing.assert_allclose(op.singular_values(6), torch.linalg.svdvals(op.to_dense()).numpy(), rtol=1e-12)
    one = dk.HVOOperator(lay["attn"][:, :1, :1], lay["w_v"][:, :1], lay["w_o"][:1])  # W' is 1 x 1
    assert one.spectral_norm() == pytest.approx(abs(one.to_dense().item()), rel=1e-12)
    assert dk.HVOOperator(lay["attn"], lay["w_v"][:, :0], lay["w_o"]).spectral_norm() == 0.0  # M_in = 0
    w_o = lay["w_o"].clone()
    w_o[0, 0] = float("nan")
    assert np.isnan(dk.HVOOperator(lay["attn"], lay["w_v"], w_o).spectral_norm())
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        op.singular_values(True)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        op.spectral_norm(tol=-1.0)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e20])
def test_zero_tiny_and_large_operators(scale):
    """A zero W' (all-masked attention) has singular values 0, and W' with entries whose squares
    under- or overflow float32 has its own: ARPACK, which iterates on W'ᵀW', used to raise
    ArpackError ("starting vector is zero", "could not build an Arnoldi factorization")."""
    lay = random_layer(1, 2, tokens=3, m_in=2, m_out=2, batched=False, dtype=torch.float64)
    attn = lay["attn"] * scale
    dense = dk.HVOOperator(attn, lay["w_v"], lay["w_o"]).to_dense()
    op = dk.HVOOperator(attn.float(), lay["w_v"].float(), lay["w_o"].float())
    np.testing.assert_allclose(op.singular_values(2), torch.linalg.svdvals(dense)[:2].numpy(), rtol=1e-4)
    assert op.spectral_norm() == pytest.approx(torch.linalg.matrix_norm(dense, 2).item(), rel=1e-4)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-39), (torch.float64, 1e-309)])
def test_subnormal_operators(dtype, scale):
    """W' whose entries are subnormal: ARPACK ran on W' times 1 / max|W' x|, which overflows to Inf
    (1e39 in float32), and raised ArpackError ("could not build an Arnoldi factorization")."""
    lay = random_layer(1, 2, tokens=3, m_in=2, m_out=2, batched=False, dtype=torch.float64)
    attn = (lay["attn"] * scale).to(dtype)
    op = dk.HVOOperator(attn, lay["w_v"].to(dtype), lay["w_o"].to(dtype))
    dense = dk.HVOOperator(attn.double(), lay["w_v"].to(dtype).double(), lay["w_o"].to(dtype).double()).to_dense()
    # entries of about scale hold log2(scale / smallest subnormal) significant bits: 1e-39 in float32 has 20
    rel = 2.0 ** -20 if dtype == torch.float32 else 2.0 ** -24
    assert op.spectral_norm() == pytest.approx(torch.linalg.matrix_norm(dense, 2).item(), rel=8 * rel)


def test_meta_operator_is_refused():
    # spectral_norm failed inside with NotImplementedError "Cannot copy out of meta tensor; no data!",
    # fraction_above with RuntimeError "Tensor.item() cannot be called on meta tensors"
    lay = random_layer(1, 2, tokens=3, batched=False)
    op = dk.HVOOperator(*(lay[k].to("meta") for k in ("attn", "w_v", "w_o")))
    with pytest.raises(ValueError, match="singular_values needs an HVOOperator on tensors with data"):
        op.spectral_norm()
    with pytest.raises(ValueError, match="fraction_above needs an HVOOperator on tensors with data"):
        op.fraction_above(0.1, samples=10)


def test_numpy_k_and_tol_are_taken():
    # singular_values(np.int64(2)) was refused ("k must be an int, got int64"), tol=np.float32(...) too
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=4, batched=False, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    np.testing.assert_array_equal(op.singular_values(np.int64(2), tol=np.float32(1e-8)), op.singular_values(2, tol=1e-8))


@pytest.mark.parametrize("case", ["masked_key_nan", "softcapped_inf", "attended_nan"])
def test_spectral_norm_from_qk_non_finite_where_a_is_finite(case):
    # A NaN or Inf in q or k need not reach A: a masked key's NaN, or an Inf logit soft-capped to c.
    # spectral_norm returned NaN for every non-finite q or k, though the dense W' was finite.
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    w_v, w_o = torch.randn(3, 2, generator=g), torch.randn(2, 6, generator=g)
    opts = {"attention_mask": torch.tensor([True, False, True, True])} if case != "softcapped_inf" else {"softcap": 5.0}
    (k if case != "softcapped_inf" else q)[0, 1 if case == "masked_key_nan" else 2, 0] = \
        float("inf") if case == "softcapped_inf" else float("nan")
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, **opts)
    dense = op.to_dense(dtype=torch.float64)
    if case == "attended_nan":
        assert not bool(dense.isfinite().all()) and np.isnan(op.spectral_norm())
        assert np.isnan(op.singular_values(2)).all()
        return
    assert bool(dense.isfinite().all())
    assert op.spectral_norm() == pytest.approx(torch.linalg.matrix_norm(dense, 2).item(), rel=1e-4)
    np.testing.assert_allclose(op.singular_values(2), torch.linalg.svdvals(dense)[:2].numpy(), rtol=1e-4)


def test_linear_operator_takes_complex_vectors():
    # the imaginary part was dropped with only a ComplexWarning: lin @ x was off by 6.6 for this x
    lay = random_layer(1, 2, tokens=3, m_in=3, m_out=3, batched=False, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    lin, dense = op.as_linear_operator(), op.to_dense().numpy()
    rng = np.random.default_rng(0)
    x = rng.random(9) + 1j * rng.random(9)
    np.testing.assert_allclose(lin @ x, dense @ x, rtol=1e-12)
    np.testing.assert_allclose(lin.rmatvec(x), dense.T @ x, rtol=1e-12)
    np.testing.assert_allclose(lin @ np.stack([x, 2 * x], 1), dense @ np.stack([x, 2 * x], 1), rtol=1e-12)
    with pytest.raises(TypeError, match="x must hold real or complex numbers"):
        lin @ np.array(["a"] * 9)


@pytest.mark.parametrize("seed,exc,message", [
    (1.5, TypeError, "seed must be an int, got float 1.5"),  # NumPy's 'SeedSequence expects int or sequence of ints'
    (-1, ValueError, "seed must be an int >= 0, got -1"),  # NumPy's 'expected non-negative integer'
    (True, TypeError, "seed must be an int, got bool True"),  # taken as the seed 1
])
def test_singular_values_seed_is_named(seed, exc, message):
    from duat_kernels import linalg

    lay = random_layer(1, 2, tokens=4, head_dim=2, m_in=3, m_out=3, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(exc, match=message):
        linalg.singular_values(op, 2, seed=seed)
    np.testing.assert_allclose(linalg.singular_values(op, 2, seed=np.int64(3)), op.singular_values(2), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4, 9], ids=["spectral_norm", "some", "all"])
def test_float32_operator_whose_products_overflow_is_refused_by_name(k):
    # float32 weights of 1e20 make W' entries of ~1e40, beyond float32: ARPACK failed with a raw ArpackError
    # ("error -9999: Could not build an Arnoldi factorization"), the dense SVD (k = min(shape)) with LinAlgError.
    lay = random_layer(1, 2, tokens=3, m_in=3, m_out=4, batched=False)
    w_v, w_o = lay["w_v"] * 1e20, lay["w_o"] * 1e20
    op = dk.HVOOperator(lay["attn"], w_v, w_o)
    with pytest.raises(ValueError, match=r"overflow float32 although attn, w_v and w_o are finite .*float64 copies"):
        op.singular_values(k) if k > 1 else op.spectral_norm()
    op64 = dk.HVOOperator(lay["attn"].double(), w_v.double(), w_o.double())  # what the message says to do
    np.testing.assert_allclose(op64.singular_values(k), torch.linalg.svdvals(op64.to_dense())[:k].numpy(), rtol=1e-8)


@pytest.mark.parametrize("call", [linalg.as_linear_operator, linalg.singular_values])
def test_a_tensor_for_the_operator_is_refused_by_name(call):
    # "'Tensor' object has no attribute 'dims'"
    with pytest.raises(TypeError, match=f"{call.__name__} needs an HVOOperator .*, got Tensor"):
        call(torch.rand(2, 3, 3))

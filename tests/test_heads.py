"""heads= on hvo_matrix, hvo_bias and HVOOperator: W' of a subset of heads, against the formula
Σ_{i in heads} A_i ⊗ OV_i built from the full layer's OV circuits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import duat_kernels as dk


def _layer(batch, h, h_kv, n=5, d=3, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(*((batch,) if batch else ()), h, n, n, generator=g, dtype=torch.float64), -1)
    w_v = torch.randn(h_kv * d, m, generator=g, dtype=torch.float64)
    w_o = torch.randn(m + 1, h * d, generator=g, dtype=torch.float64)
    b_v = torch.randn(h_kv * d, generator=g, dtype=torch.float64)
    return attn, w_v, w_o, b_v


def _expected(attn, w_v, w_o, h_kv, heads):
    ov = dk.ov_circuits(w_v, w_o, attn.shape[-3], h_kv)
    a4 = attn if attn.dim() == 4 else attn.unsqueeze(0)
    w = torch.stack([sum(torch.kron(a[i], ov[i]) for i in heads) for a in a4])
    return w if attn.dim() == 4 else w[0]


@pytest.mark.parametrize("batch,h,h_kv", [(0, 4, 4), (2, 6, 2), (1, 4, 1)])
@pytest.mark.parametrize("heads", [[0], [3, 1], [-1, 0, 2]])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_subset_of_heads_is_the_sum_of_their_kronecker_products(batch, h, h_kv, heads, backend):
    attn, w_v, w_o, _ = _layer(batch, h, h_kv)
    got = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=h_kv, heads=heads, backend=backend)
    torch.testing.assert_close(got, _expected(attn, w_v, w_o, h_kv, [i % h for i in heads]))


def test_each_heads_contribution_sums_to_the_layer():
    attn, w_v, w_o, b_v = _layer(2, 6, 3)
    full = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=3)
    torch.testing.assert_close(sum(dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=3, heads=i) for i in range(6)), full)
    b_full = dk.hvo_bias(attn, w_o, b_v, num_kv_heads=3)
    torch.testing.assert_close(sum(dk.hvo_bias(attn, w_o, b_v, num_kv_heads=3, heads=i) for i in range(6)), b_full)


def test_operator_with_heads_matches_dense_and_reprs_shapes():
    attn, w_v, w_o, b_v = _layer(2, 6, 2)
    b_o = torch.randn(w_o.shape[0], dtype=torch.float64)
    op = dk.HVOOperator(attn, w_v, w_o, num_kv_heads=2, b_v=b_v, b_o=b_o, heads=[4, 1])
    x = torch.randn(2, op.shape[-1], dtype=torch.float64)
    dense = _expected(attn, w_v, w_o, 2, [4, 1])
    torch.testing.assert_close(op.matvec(x), torch.einsum("brc,bc->br", dense, x))
    torch.testing.assert_close(op.to_dense(), dense)
    torch.testing.assert_close(op.bias(), dk.hvo_bias(attn, w_o, b_v, b_o, num_kv_heads=2, heads=[4, 1]))
    text = repr(op)
    assert text.startswith("HVOOperator(shape=(2, 40, 35), tokens=5, heads=2, kv_heads=2, head_dim=3")
    assert "tensor(" not in text


@pytest.mark.parametrize("heads,error,match", [
    ([], TypeError, "heads must be an int or a non-empty sequence of ints, got \\[\\]"),
    ("0", TypeError, "heads must be an int or a non-empty sequence"),
    ([True], TypeError, "heads must be an int"),
    ([4], ValueError, r"heads must be in \[-4, 4\) for h=4 heads, got \[4\]"),
    ([1, -3], ValueError, "heads must be distinct"),
])
def test_bad_heads_name_the_argument(heads, error, match):
    attn, w_v, w_o, _ = _layer(0, 4, 4)
    with pytest.raises(error, match=match):
        dk.hvo_matrix(attn, w_v, w_o, heads=heads)
    with pytest.raises(error, match=match):
        dk.HVOOperator(attn, w_v, w_o, heads=heads)


@pytest.mark.parametrize("make", [np.array, torch.tensor, lambda x: np.int64(x[0]), lambda x: torch.tensor(x[0])])
def test_heads_as_integer_arrays(make):
    # an index array (np.arange(...), np.flatnonzero(mask), torch.tensor([...])) was refused
    attn, w_v, w_o, _ = _layer(2, 6, 2)
    heads = [4, 1] if make in (np.array, torch.tensor) else [4]
    want = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=2, heads=heads)
    torch.testing.assert_close(dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=2, heads=make(heads)), want)
    op = dk.HVOOperator(attn, w_v, w_o, num_kv_heads=2, heads=make(heads))
    torch.testing.assert_close(op.to_dense(), want)


@pytest.mark.parametrize("heads", [np.array([0.0, 1.0]), torch.tensor([[0, 1]]), np.array([True, False]),
                                   torch.tensor([], dtype=torch.int64)])
def test_heads_arrays_that_are_not_index_vectors_are_refused(heads):
    attn, w_v, w_o, _ = _layer(0, 4, 4)
    with pytest.raises(TypeError, match="heads must be an int or a non-empty sequence of ints"):
        dk.hvo_matrix(attn, w_v, w_o, heads=heads)

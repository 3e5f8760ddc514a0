"""The fused C++ pass of block_norms against the torch computation in float64."""

from __future__ import annotations

import pytest
import torch

from duat_kernels import cpp
from duat_kernels import linalg
from duat_kernels.linalg import gram_norms
from duat_kernels.reference import ov_circuits

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason="the C++ extension is not built")


def _inputs(h, rows, cols, causal_zeros, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(h, rows, cols, generator=g)
    if causal_zeros:  # whole zero column groups, as above a causal diagonal
        a[:, :, cols // 2:] = 0
    c = torch.randn(h, h, generator=g)
    return a, c


def _expected(a, c):
    return (c.double() @ a.double().reshape(a.shape[0], -1)).square().sum(0).reshape(a.shape[1:])


@pytest.mark.parametrize("h,rows,cols", [(1, 3, 5), (12, 7, 100), (5, 33, 65), (16, 2, 31)])
@pytest.mark.parametrize("causal_zeros", [False, True])
def test_squared_norms(h, rows, cols, causal_zeros):
    a, c = _inputs(h, rows, cols, causal_zeros)
    out = torch.empty(rows, cols + 3)[:, 1:cols + 1]  # a strided target goes through a temporary
    torch.testing.assert_close(gram_norms.squared_(a, c, out).double(), _expected(a, c), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram_norms.squared_(a, c, torch.empty(rows, cols)).double(), _expected(a, c),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h,rows,cols,grid", [(12, 37, 70, (4, 5)), (3, 9, 40, (9, 1)), (4, 64, 64, (1, 1))])
def test_grid_norms_accumulate_into_bins(h, rows, cols, grid):
    a, c = _inputs(h, rows, cols, False)
    row_bins = torch.arange(rows) * grid[0] // rows
    col_bins = torch.arange(cols) * grid[1] // cols
    out = torch.full(grid, 0.5, dtype=torch.float64)
    gram_norms.grid_(a, c, row_bins, col_bins, out)
    want = torch.full(grid, 0.5, dtype=torch.float64)
    want.index_put_((row_bins[:, None].expand(rows, cols), col_bins[None].expand(rows, cols)), _expected(a, c),
                    accumulate=True)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-9)


def test_bad_buffers_are_rejected():
    a, c = _inputs(4, 3, 5, False)
    with pytest.raises(ValueError, match="c must be"):
        cpp._C.gram_squared_norms(a.numpy(), torch.zeros(3, 3).numpy(), torch.zeros(3, 5).numpy())
    with pytest.raises(ValueError, match="float32"):
        cpp._C.gram_squared_norms(a.double().numpy(), c.numpy(), torch.zeros(3, 5).numpy())
    with pytest.raises(ValueError, match="contiguous"):
        cpp._C.gram_squared_norms(a.transpose(1, 2).numpy(), c.numpy(), torch.zeros(5, 3).numpy())
    with pytest.raises(ValueError, match="row_bin"):
        cpp._C.gram_grid_norms(a.numpy(), c.numpy(), torch.tensor([0, 1, 2]).numpy(), torch.zeros(5).long().numpy(),
                               torch.zeros(2, 1, dtype=torch.float64).numpy())


@pytest.mark.parametrize("h,rows,cols", [(1, 3, 5), (12, 7, 100), (5, 33, 65)])
def test_upper_triangular_factor_skips_only_its_zeros(h, rows, cols):
    # an upper-triangular C takes the products i >= j only; every α_i still meets row 0, so a NaN or Inf
    # in α makes ||C α||² non-finite even where its column of C is zero (0 · NaN); an Inf may give Inf
    # where the full product has 0 · Inf = NaN, and block_norms recomputes such results exactly
    a, c = _inputs(h, rows, cols, causal_zeros=True)
    c = c.triu()
    c[:, h // 2] = 0
    a[h // 2, rows // 2, 3] = float("nan")
    a[0, 0, 1] = float("inf")
    got = gram_norms.squared_(a, c, torch.empty(rows, cols)).double()
    want = _expected(a, c)
    assert torch.equal(got.isfinite(), want.isfinite()) and got.isnan()[rows // 2, 3]
    torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-5, atol=1e-6)


def test_gram_factor_is_upper_triangular():
    g = torch.Generator().manual_seed(4)
    w_v, w_o = torch.randn(2 * 3, 7, generator=g), torch.randn(5, 6 * 3, generator=g)
    w_o[:, 3:6] = 0  # OV_1 = 0: a singular Gram matrix
    c = linalg.gram_factor(w_v, w_o, 6, 2)
    ov = ov_circuits(w_v.double(), w_o.double(), 6, 2)
    gram = torch.einsum("icd,jcd->ij", ov, ov)
    assert torch.equal(c, c.triu()) and c.is_contiguous()
    torch.testing.assert_close(c.T @ c, gram, rtol=1e-10, atol=1e-10)

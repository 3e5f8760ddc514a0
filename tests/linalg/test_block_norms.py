"""block_norms, frobenius_norm, trace and sampled statistics against the dense W'."""

from __future__ import annotations

import math

import pytest
import torch

import duat_kernels as dk
from duat_kernels import linalg
from duat_kernels.linalg import norms as bn

from conftest import random_layer


def _dense_blocks(lay, kv_heads):
    w = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads, backend="reference")
    n, m_out, m_in = lay["attn"].shape[-1], lay["w_o"].shape[0], lay["w_v"].shape[1]
    return w.reshape(*w.shape[:-2], n, m_out, n, m_in).transpose(-3, -2)  # (..., n, m, M_out, M_in)


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 4), (6, 2), (12, 3)])
@pytest.mark.parametrize("batched", [True, False])
def test_block_norms_are_norms_of_dense_blocks(heads, kv_heads, batched, monkeypatch):
    monkeypatch.setattr(bn, "CHUNK_ENTRIES", 50)  # several row chunks even at this size
    lay = random_layer(2, heads, kv_heads, tokens=9, head_dim=3, m_in=7, m_out=5, causal=True, batched=batched,
                       dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads)
    expected = torch.linalg.matrix_norm(_dense_blocks(lay, kv_heads))
    torch.testing.assert_close(op.block_norms(), expected, rtol=1e-10, atol=1e-12)
    coarse = op.block_norms(grid=(4, 3))  # rows of blocks split 3/2/2/2, columns 3/3/3
    sq = expected.square()
    rows = [(0, 3), (3, 5), (5, 7), (7, 9)]
    cols = [(0, 3), (3, 6), (6, 9)]
    want = torch.stack([torch.stack([sq[..., r0:r1, c0:c1].sum((-1, -2)) for c0, c1 in cols], -1)
                        for r0, r1 in rows], -2).sqrt()
    torch.testing.assert_close(coarse, want, rtol=1e-10, atol=1e-12)


def test_block_norms_float32_inputs():
    lay = random_layer(1, 8, 2, tokens=16, head_dim=4, m_in=12, m_out=12, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)
    lay64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in lay.items()}
    expected = torch.linalg.matrix_norm(_dense_blocks(lay64, 2))
    got = op.block_norms()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * expected.max().item())


def test_frobenius_norm_and_trace_are_exact():
    lay = random_layer(2, 6, 3, tokens=8, head_dim=2, m_in=6, m_out=6, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=3, layout="feature")
    w = op.to_dense()
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(w), rtol=1e-12, atol=0)
    torch.testing.assert_close(op.trace(), w.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="trace needs a square W'"):
        dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"][:5], num_kv_heads=3).trace()


def test_fraction_above_covers_the_exact_fraction():
    lay = random_layer(1, 4, tokens=12, head_dim=3, m_in=9, m_out=9, causal=True, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    w = op.to_dense()
    threshold = 0.3 * w.abs().mean().item()
    exact = (w.abs() > threshold).double().mean().item()
    est = op.fraction_above(threshold, samples=20_000, confidence=0.999)
    assert est.low <= exact <= est.high, (est, exact)
    assert est.high - est.low < 0.05
    assert "of entries have |w| >" in str(est)


def test_fraction_above_refuses_a_nan_threshold():
    # |w| > NaN is false for every entry: it used to report 0 with the interval [0, 0]
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(ValueError, match="threshold must be a number, got nan"):
        dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"]).fraction_above(float("nan"))


def test_bad_grid():
    lay = random_layer(1, 2, tokens=3, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(ValueError, match=r"grid must be two ints in \[1, N=3\]"):
        op.block_norms(grid=(4, 1))


@pytest.mark.parametrize("call,what", [
    (lambda op: op.block_norms(), r"block norms of shape \(1, 1024, 1024\) needs \d+\.0 MiB"),
    (lambda op: op.block_norms(grid=(1024, 512)), r"block norms of shape \(1, 1024, 512\) needs \d+\.0 MiB"),
    (lambda op: op.fraction_above(0.1, samples=1_000_000), r"1,000,000 sampled entries of W' needs"),
], ids=["block_norms", "grid", "fraction_above"])
@pytest.mark.parametrize("finite", [True, False])
def test_outputs_that_cannot_fit_are_refused_before_allocating(call, what, finite, monkeypatch):
    # They allocated (B, N, N) norms or (h, samples) samples unchecked: the allocator's raw
    # RuntimeError, or with overcommit a process killed later; now DenseTooLargeError, before any work.
    from duat_kernels import _memory

    monkeypatch.setattr(_memory, "available_memory", lambda device: 1 << 20)
    q = torch.randn(1, 1024, 1)
    if not finite:
        q[0, 3, 0] = float("nan")
    op = dk.HVOOperator.from_qk(q, torch.randn(1, 1024, 1), torch.randn(1, 1), torch.randn(1, 1), causal=True)
    with pytest.raises(dk.DenseTooLargeError, match=what + r".* but only 1\.0 MiB is available"):
        call(op)


def test_fraction_above_takes_numpy_numbers():
    # np.float32 thresholds, np.int64 samples and seeds (what NumPy code computes) were refused with
    # TypeErrors ("samples must be an int, got int64"), unlike block(n, m) or block_norms(grid=...)
    import numpy as np

    lay = random_layer(1, 2, tokens=4, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    want = op.fraction_above(0.25, samples=300, confidence=0.9, seed=3)
    got = op.fraction_above(np.float32(0.25), samples=np.int64(300), confidence=np.float64(0.9), seed=np.int32(3))
    assert got == want and type(got.samples) is int
    with pytest.raises(TypeError, match="samples must be an int, got bool"):
        op.fraction_above(0.25, samples=True)
    # a seed outside torch.Generator's range failed with its raw "Overflow when unpacking long long"
    for seed in (1 << 64, -(1 << 63) - 1):
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
            op.fraction_above(0.25, samples=10, seed=seed)
    assert op.fraction_above(0.25, samples=10, seed=(1 << 64) - 1).samples == 10


@pytest.mark.parametrize("where", ["attn", "w_v", "zero_block_inf"])
def test_fraction_above_is_nan_when_sampled_entries_are_nan(where):
    # |NaN| > t is false, so NaN entries were counted as "not above": W' with a NaN in its weights
    # reported e.g. "0.4230 of entries have |w| > 0.1" with a tight interval
    lay = random_layer(1, 2, tokens=4, m_in=3, m_out=3, causal=True, batched=False, dtype=torch.float64)
    attn, w_v = lay["attn"].clone(), lay["w_v"].clone()
    if where == "attn":
        attn[:, 2, 1] = float("nan")
    elif where == "w_v":
        w_v[0, 1] = float("nan")
    else:  # 0 · Inf = NaN in the causal zero blocks
        w_v[0, 1] = float("inf")
    op = dk.HVOOperator(attn, w_v, lay["w_o"])
    expected_nan_hits = (op.to_dense().isnan().double().mean() * 4000).item()
    est = op.fraction_above(0.1, samples=4000)
    assert expected_nan_hits > 10  # the sample hits NaN entries
    assert math.isnan(est.fraction) and math.isnan(est.low) and math.isnan(est.high) and est.samples == 4000
    finite = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"]).fraction_above(0.1, samples=4000)
    assert 0 < finite.fraction < 1


@pytest.mark.parametrize("wide", ["w_v", "w_o"])
@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_float64_weights_with_float32_attention_keep_float64(wide, grid):
    # float32 A with float64 weights ran the float32 Gram pass: relative errors ~1e-7 (and a float32
    # result) where to_dense and contributions, in the promoted float64, are exact to ~1e-16
    lay = random_layer(1, 4, 2, tokens=5, head_dim=3, m_in=4, m_out=3, batched=False, dtype=torch.float64)
    args = {"attn": lay["attn"].float(), "w_v": lay["w_v"].float(), "w_o": lay["w_o"].float()}
    args[wide] = lay[wide]
    op = dk.HVOOperator(args["attn"], args["w_v"], args["w_o"], num_kv_heads=2)
    dense = op.to_dense().reshape(5, 3, 5, 4).permute(0, 2, 1, 3)
    want = dense.square().sum((-1, -2))
    if grid is not None:
        want = torch.stack([torch.stack([want[r][:, c].sum() for c in (slice(0, 2), slice(2, 4), slice(4, 5))])
                            for r in (slice(0, 3), slice(3, 5))])  # rows (arange(N) * R) // N, columns alike
    got = op.block_norms(grid)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(op.frobenius_norm(), dense.square().sum().sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_fraction_above_forms_only_the_sampled_ov_entries(kv_heads, monkeypatch):
    # fraction_above formed the whole (h, M_out, M_in) OV: h = 2, M = 100000 failed with the allocator's
    # raw RuntimeError for 80 GB. The sampled entries are the dense W' entries at the same indices.
    from duat_kernels import reference
    from duat_kernels.linalg import stats

    monkeypatch.setattr(stats, "SAMPLES_PER_STEP", 7)
    lay = random_layer(1, 4, kv_heads, tokens=3, head_dim=2, m_in=5, m_out=6, batched=False, dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads)
    factors = reference.head_factors(lay["w_v"], lay["w_o"], 4, kv_heads)
    ov = reference.ov_circuits(lay["w_v"], lay["w_o"], 4, kv_heads)
    got = stats.sample_entries(op.source, factors, 50, torch.Generator().manual_seed(2))
    want = stats.sample_entries(op.source, ov, 50, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    wide = dk.HVOOperator(lay["attn"][:2, :2, :2], torch.randn(1, 1).expand(1, 100000),
                          torch.randn(1, 2).expand(100000, 2), num_kv_heads=1)
    assert wide.fraction_above(0.0, samples=20).samples == 20


@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_non_finite_block_norms_form_ov_a_few_rows_at_a_time(grid, monkeypatch):
    # the NaN/Inf path formed the whole (h, M_out, M_in) OV: h = 2, M = 100000 with one NaN weight failed
    # with the allocator's raw RuntimeError for 80 GB in block_norms and frobenius_norm
    monkeypatch.setattr(bn, "CHUNK_ENTRIES", 3 * 4 * 2)  # OV rows 2 at a time of 5
    lay = random_layer(2, 3, tokens=4, head_dim=2, m_in=4, m_out=5, causal=True, dtype=torch.float64)
    w_o = lay["w_o"].clone()
    w_o[2, 1] = float("inf")  # 0 · Inf = NaN in the causal zero blocks, ±Inf elsewhere in row 2
    op = dk.HVOOperator(lay["attn"], lay["w_v"], w_o)
    blocks = op.to_dense().reshape(2, 4, 5, 4, 4).permute(0, 1, 3, 2, 4)
    want = blocks.square().sum((-1, -2))
    if grid is not None:
        want = want.reshape(2, 2, 2, 2, 2).sum((2, 4))
    from duat_kernels import reference

    whole_ov = reference.ov_circuits

    def ov_rows(w_v, w_o, *heads):
        assert w_o.shape[0] <= 2, f"OV of {w_o.shape[0]} rows formed at once"
        return whole_ov(w_v, w_o, *heads)

    monkeypatch.setattr(reference, "ov_circuits", ov_rows)
    torch.testing.assert_close(op.block_norms(grid), want.sqrt(), equal_nan=True, rtol=1e-12, atol=0)


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_non_finite_stored_attention_found_after_the_fused_pass(grid):
    # the fused float32 pass over a stored A checks A for NaN/Inf only when its result is not finite
    lay = random_layer(2, 3, tokens=6, head_dim=2, m_in=4, m_out=5, causal=True, dtype=torch.float32)
    attn = lay["attn"].clone()
    attn[0, 0, 2, 4] = float("inf")  # inside the causal zero triangle
    attn[1, 1, 4, 1] = float("nan")
    lay["w_o"][:, 4:] = 0  # OV_2 = 0: a zero eigenvalue of G, so C has a zero row and ||C α||² is 0 · Inf = NaN
    op = dk.HVOOperator(attn, lay["w_v"], lay["w_o"])  # where the dense block is Inf
    dense = dk.HVOOperator(attn.double(), lay["w_v"].double(), lay["w_o"].double()).to_dense()
    want = dense.reshape(2, 6, 5, 6, 4).permute(0, 1, 3, 2, 4).square().sum((-1, -2))
    if grid is not None:
        want = want.reshape(2, 2, 3, 3, 2).sum((2, 4))
    got = op.block_norms(grid)
    assert got.dtype == torch.float32
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got.double(), want.sqrt(), equal_nan=True, rtol=1e-5, atol=1e-6)
    finite = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"]).block_norms(grid)  # roots taken in the pass
    ref = dk.HVOOperator(lay["attn"].double(), lay["w_v"].double(), lay["w_o"].double()).block_norms(grid)
    torch.testing.assert_close(finite.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda a: dk.linalg.frobenius_norm(a[0], torch.randn(4, 3), torch.randn(3, 4), 2),
     r"attn must be 4-D, got shape \(2, 3, 3\)"),
    (lambda a: dk.linalg.block_norms(a, torch.randn(4, 3), torch.randn(3, 5), 2), r"w_o must have shape \(M_out, h\*d\)"),
    (lambda a: dk.linalg.trace(a, torch.randn(4, 3), torch.randn(3, 4), 3), r"num_kv_heads=3 must divide"),
    (lambda a: dk.linalg.contributions(a, torch.randn(1, 3, 3), torch.randn(4, 2), torch.randn(3, 4), 2),
     r"x must have shape \(B, N, M_in\) = \(1, 3, 2\), got \(1, 3, 3\)"),
])
def test_linalg_functions_called_directly_check_their_tensors(call, match):
    # a wrong shape failed deep inside torch: "shape '[2, 1, 3]' is invalid for input of size 18", einsum errors
    with pytest.raises(ValueError, match=match):
        call(torch.rand(1, 2, 3, 3).softmax(-1))


def _gqa_layer():
    return random_layer(1, 4, 2, tokens=5, head_dim=2, m_in=3, m_out=3, dtype=torch.float64)


@pytest.mark.parametrize("call,exc,message", [
    # (0, 1) failed in the C++ pass ('row_bin[0] is out of range'), (2.0, 2) in torch.zeros, grid=2 with
    # 'cannot unpack non-iterable int object'
    (lambda lay: linalg.block_norms(lay["attn"], lay["w_v"], lay["w_o"], 2, (0, 1)), ValueError,
     r"grid must be two ints >= 1"),
    (lambda lay: linalg.block_norms(lay["attn"], lay["w_v"], lay["w_o"], 2, (2.0, 2)), TypeError,
     "grid must be None, an int R or a pair"),
    # an einsum's 'subscript c has size 2 for operand 1 which does not broadcast'
    (lambda lay: linalg.trace(lay["attn"], lay["w_v"][:, :2], lay["w_o"], 2), ValueError,
     r"trace needs a square W' \(M_in = M_out\), got M_in=2, M_out=3"),
    # "shape '[3, 2, 3]' is invalid for input of size 12" and ZeroDivisionError
    (lambda lay: linalg.gram_factor(lay["w_v"], lay["w_o"], 4, 3), ValueError, "num_kv_heads=3 must divide"),
    (lambda lay: linalg.gram_factor(lay["w_v"], lay["w_o"], 0, 0), ValueError, "num_heads must be a positive int"),
    # ZeroDivisionError, torch's 'index 5 is out of bounds', "'>' not supported between 'Tensor' and 'str'"
    (lambda lay: linalg.fraction_above(lay["attn"], lay["w_v"], lay["w_o"], 2, 0.1, samples=0), ValueError,
     "samples must be >= 1, got 0"),
    (lambda lay: linalg.fraction_above(lay["attn"], lay["w_v"], lay["w_o"], 2, 0.1, samples=10, batch=5),
     IndexError, r"batch=5 is out of range for B=1"),
    (lambda lay: linalg.fraction_above(lay["attn"], lay["w_v"], lay["w_o"], 2, "0.1", samples=10), TypeError,
     "threshold must be a real number, got str"),
    (lambda lay: linalg.fraction_above(lay["attn"], lay["w_v"][:, :0], lay["w_o"], 2, 0.1, samples=10), ValueError,
     r"has no entries to sample \(M_in=0, M_out=3\)"),
])
def test_direct_calls_name_bad_arguments(call, exc, message):
    """The duat_kernels.linalg functions called directly (they are public) check what HVOOperator's
    methods check, instead of failing deep inside torch or returning a wrongly shaped result."""
    with pytest.raises(exc, match=message):
        call(_gqa_layer())


def test_direct_calls_take_grid_r_and_default_kv_heads():
    """grid=R is an R x R grid as for HVOOperator.block_norms, and num_kv_heads=None means h as in
    hvo_matrix (it failed with 'reshape() takes 1 positional argument but 3 were given')."""
    lay = _gqa_layer()
    mha = random_layer(1, 4, tokens=5, head_dim=2, m_in=3, m_out=3, dtype=torch.float64)
    a, w_v, w_o = mha["attn"], mha["w_v"], mha["w_o"]
    dense = dk.hvo_matrix(a, w_v, w_o, backend="reference")
    torch.testing.assert_close(linalg.block_norms(lay["attn"], lay["w_v"], lay["w_o"], 2, 2),
                               dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2).block_norms((2, 2)))
    torch.testing.assert_close(linalg.frobenius_norm(a, w_v, w_o, None), torch.linalg.matrix_norm(dense))
    torch.testing.assert_close(linalg.trace(a, w_v, w_o, None), dense.diagonal(dim1=-2, dim2=-1).sum(-1))
    torch.testing.assert_close(linalg.block_norms(a, w_v, w_o, None), torch.linalg.matrix_norm(_dense_blocks(mha, 4)))
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(linalg.contributions(a, x, w_v, w_o, None), linalg.contributions(a, x, w_v, w_o, 4))
    assert str(linalg.fraction_above(a, w_v, w_o, None, 0.1, samples=50)) == str(
        linalg.fraction_above(a, w_v, w_o, 4, 0.1, samples=50))


@pytest.mark.parametrize("source", ["attn", "qk"])
@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_block_norms_frobenius_norm_and_trace_are_differentiable(source, grid):
    # block_norms, frobenius_norm and trace ran under torch.no_grad: their results had no grad_fn, so a loss
    # that added them to differentiable terms silently lost their gradient, and torch.func.jacrev gave zeros
    lay = random_layer(2, 4, 2, tokens=4, head_dim=2, m_in=3, m_out=3, dtype=torch.float64)
    q, k = torch.randn(2, 4, 4, 2, dtype=torch.float64), torch.randn(2, 2, 4, 2, dtype=torch.float64)
    a_inputs = (lay["attn"],) if source == "attn" else (q, k)

    def operator(a_in, w_v, w_o):
        return dk.HVOOperator(a_in[0], w_v, w_o, num_kv_heads=2) if source == "attn" else \
            dk.HVOOperator.from_qk(*a_in, w_v, w_o, causal=True)

    def dense_statistics(op):  # through the dense W' (reference backend) and its blocks
        w = op.to_dense(backend="reference")
        blocks = torch.linalg.matrix_norm(w.reshape(2, 4, 3, 4, 3).transpose(-3, -2))
        if grid is not None:
            rows, cols = bn._bins(4, grid[0], "cpu"), bn._bins(4, grid[1], "cpu")
            blocks = torch.stack([torch.stack([torch.linalg.vector_norm(blocks[:, rows == r][:, :, cols == c],
                                                                        dim=(1, 2)) for c in range(grid[1])], -1)
                                  for r in range(grid[0])], -2)
        return blocks, torch.linalg.matrix_norm(w), w.diagonal(dim1=-2, dim2=-1).sum(-1)

    leaves = [t.clone().requires_grad_() for t in (*a_inputs, lay["w_v"], lay["w_o"])]
    op = operator(leaves[:-2], *leaves[-2:])
    weights = [torch.rand(2, *(grid or (4, 4)), dtype=torch.float64), torch.rand(2, dtype=torch.float64),
               torch.rand(2, dtype=torch.float64)]
    got_all = (op.block_norms(grid), op.frobenius_norm(), op.trace())
    for got, want, weight in zip(got_all, dense_statistics(op), weights):
        assert got.requires_grad
        torch.testing.assert_close(got.double(), want)
        grads = torch.autograd.grad((got * weight).sum(), leaves, retain_graph=True)
        for g, w in zip(grads, torch.autograd.grad((want * weight).sum(), leaves, retain_graph=True)):
            torch.testing.assert_close(g, w)
    jac = torch.func.jacrev(lambda wo: operator(a_inputs, lay["w_v"], wo).block_norms(grid))(lay["w_o"])
    want_jac = torch.autograd.functional.jacobian(
        lambda wo: dense_statistics(operator(a_inputs, lay["w_v"], wo))[0], lay["w_o"])
    torch.testing.assert_close(jac, want_jac)
    if source == "attn":  # vmap over attention maps: the fused pass branched on the data
        per_map = torch.func.vmap(lambda a: operator((a,), lay["w_v"], lay["w_o"]).block_norms(grid))(lay["attn"])
        torch.testing.assert_close(per_map, operator(a_inputs, lay["w_v"], lay["w_o"]).block_norms(grid))



@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_block_norms_compile_with_fullgraph(grid):
    # the fused pass branches on the data (its NaN check) and reads NumPy views: under torch.compile(fullgraph=True)
    # "Could not guard on data-dependent expression"; traced, the norms are torch operations
    lay = random_layer(2, 4, 2, tokens=4, head_dim=2, m_in=3, m_out=3)

    def norms(a, wv, wo):
        return dk.HVOOperator(a, wv, wo, num_kv_heads=2).block_norms(grid)

    compiled = torch.compile(norms, fullgraph=True, backend="eager")  # TorchDynamo's trace is what is tested
    torch.testing.assert_close(compiled(lay["attn"], lay["w_v"], lay["w_o"]), norms(lay["attn"], lay["w_v"], lay["w_o"]))


@pytest.mark.parametrize("method", ["block_norms", "contributions"])
def test_the_torch_path_says_how_to_get_the_fused_pass(method, monkeypatch):
    # with weights that require grad the analysis forms the whole A; where it did not fit, the error told the
    # user of HVOOperator to "use the matrix-free duat_kernels.HVOOperator instead"
    from duat_kernels import _memory

    n, h = 256, 4  # A: 1 MiB; the outputs and the projected values: under 0.4 MiB
    op = dk.HVOOperator.from_qk(torch.randn(h, n, 4), torch.randn(h, n, 4), torch.randn(8, 8, requires_grad=True),
                                torch.randn(8, 8), causal=True)
    x = torch.randn(n, 8)
    call = (lambda: op.block_norms(grid=(4, 4))) if method == "block_norms" else (lambda: op.contributions(x))
    monkeypatch.setattr(_memory, "available_memory", lambda device: 600 << 10)
    with pytest.raises(dk.DenseTooLargeError, match=r"attention probabilities .* torch\.no_grad\(\) or with detached"):
        call()
    with torch.no_grad():  # the fused pass: no A
        assert call().shape == ((4, 4) if method == "block_norms" else (n, n))


def test_float64_recompute_of_the_torch_path_is_refused_before_allocating(monkeypatch):
    # Autograd's torch path computes the norms of a stored A far above 1 again in float64 (its float32 squares
    # overflow): a float64 copy of the whole A, allocated unchecked where the float32 A had just fitted.
    from duat_kernels import _memory

    lay = random_layer(1, 2, tokens=6, m_in=4, m_out=3)
    attn, w_v = lay["attn"] * 1e25, lay["w_v"].requires_grad_()
    want = dk.HVOOperator(attn.double(), w_v.detach().double(), lay["w_o"].double()).block_norms()
    assert bool(want.isfinite().all())
    monkeypatch.setattr(_memory, "available_memory", lambda device: attn.numel() * 4)  # the float32 A fits
    op = dk.HVOOperator(attn, w_v, lay["w_o"])
    with pytest.raises(dk.DenseTooLargeError, match=r"\(1, 2, 6, 6\) in float64 \(block norms recomputed"):
        op.block_norms()
    monkeypatch.setattr(_memory, "available_memory", lambda device: 1 << 30)
    torch.testing.assert_close(op.block_norms().detach().double(), want, rtol=2e-5, atol=0)


@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["blocks", "grid"])
@pytest.mark.parametrize("where", ["attn", "w_o"])
def test_autograd_path_gives_the_dense_inf_and_nan(where, grid):
    # The autograd path formed αᵀGα from a non-finite factor: NaN (Inf · G_ij · -Inf) where the dense W' has an
    # Inf block, and a finite norm beside it; the plain path forms the blocks (docs/input-handling.md)
    lay = random_layer(2, 4, 2, tokens=7, head_dim=3, m_in=5, m_out=6, causal=True, dtype=torch.float64)
    attn, w_v, w_o = lay["attn"].float(), lay["w_v"].float(), lay["w_o"].float()
    (attn if where == "attn" else w_o)[(1, 0, 5, 1) if where == "attn" else (3, 4)] = math.inf
    dense = dk.HVOOperator(attn.double(), w_v.double(), w_o.double(), num_kv_heads=2).to_dense()
    sq = dense.reshape(2, 7, 6, 7, 5).square().sum((2, 4))
    if grid is not None:
        sq = sq.reshape(2, 7, 7)[:, None].new_zeros(2, 2, 3).index_put_(
            (torch.arange(2)[:, None, None], (torch.arange(7) * 2 // 7)[None, :, None],
             (torch.arange(7) * 3 // 7)[None, None, :]), sq, accumulate=True)
    want = sq.sqrt()
    assert bool(want.isinf().any())
    got = dk.HVOOperator(attn, w_v.requires_grad_(), w_o, num_kv_heads=2).block_norms(grid)
    assert got.requires_grad
    torch.testing.assert_close(got.detach().double(), want, rtol=2e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("what", [(1, 1), (3, 1), (1, 3), (2, 3), "frobenius_norm"])
def test_block_norms_compile_with_inductor(what):
    # inductor failed (InductorError in its codegen of index_add into a dimension of size 1) for the grid sums of a
    # side of 1: block_norms(grid=(1, 1)), (R, 1) and frobenius_norm; backend="eager" traced them
    lay = random_layer(2, 4, 2, tokens=5, head_dim=2, m_in=3, m_out=3)

    def norms(a, wv, wo):
        op = dk.HVOOperator(a, wv, wo, num_kv_heads=2)
        return op.frobenius_norm() if what == "frobenius_norm" else op.block_norms(what)

    args = lay["attn"], lay["w_v"], lay["w_o"]
    torch._dynamo.reset()
    got = torch.compile(norms, fullgraph=True)(*args)  # the default backend, inductor
    torch.testing.assert_close(got, torch.compile(norms, fullgraph=True, backend="eager")(*args))


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_block_norms_of_qk_compile_with_fullgraph(grid):
    # the torch path forms A from q and k through AttentionSource.dense, whose memory check read /proc/meminfo:
    # "Dynamo does not know how to trace builtin operator `open`"; traced, the check is skipped
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 5, 2, generator=g), torch.randn(2, 2, 5, 2, generator=g)
    w_v, w_o = torch.randn(4, 3, generator=g), torch.randn(3, 8, generator=g)

    def norms(q, k, wv, wo):
        return dk.HVOOperator.from_qk(q, k, wv, wo, causal=True).block_norms(grid)

    compiled = torch.compile(norms, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, w_v, w_o), norms(q, k, w_v, w_o))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("from_qk", [False, True])
def test_norms_of_meta_tensors_have_the_shapes_and_dtypes_of_real_ones(dtype, from_qk):
    # block_norms and frobenius_norm read the weights' largest entry for their scaling: on meta tensors (every
    # other method gives meta results) they failed with "Tensor.item() cannot be called on meta tensors"
    lay = random_layer(1, 4, 2, tokens=5, head_dim=3, m_in=6, m_out=6, batched=False, dtype=dtype)
    q, k = torch.randn(4, 5, 3, dtype=dtype), torch.randn(2, 5, 3, dtype=dtype)

    def operator(device):
        w_v, w_o = lay["w_v"].to(device), lay["w_o"].to(device)
        if from_qk:
            return dk.HVOOperator.from_qk(q.to(device), k.to(device), w_v, w_o, causal=True)
        return dk.HVOOperator(lay["attn"].to(device), w_v, w_o, num_kv_heads=2)

    real, meta = operator("cpu"), operator("meta")
    for name, call in (("block_norms", lambda op: op.block_norms()), ("grid", lambda op: op.block_norms(grid=(2, 3))),
                       ("frobenius_norm", lambda op: op.frobenius_norm())):
        want, got = call(real), call(meta)
        assert got.device.type == "meta" and (got.shape, got.dtype) == (want.shape, want.dtype), name


@pytest.mark.parametrize("attn", [[[1.0]], None, "attn"])
@pytest.mark.parametrize("call", ["block_norms", "frobenius_norm", "trace"])
def test_linalg_functions_name_an_attn_that_is_no_tensor(attn, call):
    # "'list' object has no attribute 'heads'" (an AttentionSource or a tensor is taken)
    with pytest.raises(TypeError, match=f"attn must be a torch.Tensor, got {type(attn).__name__}"):
        getattr(linalg, call)(attn, torch.randn(4, 5), torch.randn(5, 4), 2)
    with pytest.raises(TypeError, match="w_o must be a torch.Tensor, got NoneType"):  # 'NoneType' has no 'dtype'
        getattr(linalg, call)(torch.rand(1, 2, 3, 3), torch.randn(4, 5), None, 2)


@pytest.mark.parametrize("ov, samples, message", [
    (torch.randn(4, 5), 5, r"ov must be 3-D, got shape \(4, 5\)"),  # was IndexError 'tuple index out of range'
    ((torch.randn(2, 5, 2), torch.randn(2, 3, 5)), 5, r"ov must be the pair .* got shapes \(2, 5, 2\) and \(2, 3, 5\)"),
    (torch.randn(2, 5, 5), -1, "samples must be an int >= 0, got -1"),
    (torch.randn(2, 5, 5), 2.5, "samples must be an int >= 0, got 2.5"),
])
def test_sample_entries_names_a_bad_ov_or_count(ov, samples, message):
    from duat_kernels.linalg import stats

    with pytest.raises(ValueError, match=message):
        stats.sample_entries(torch.rand(1, 2, 3, 3), ov, samples)


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_float64_attention_far_above_one_gives_finite_norms(grid):
    # a stored float64 A times 1e160: block_norms and frobenius_norm were Inf (float64 squares) where W' is finite
    lay = random_layer(1, 4, 2, tokens=5, head_dim=3, m_in=6, m_out=6, batched=False, dtype=torch.float64)
    big = dk.HVOOperator(lay["attn"] * 1e160, lay["w_v"], lay["w_o"], num_kv_heads=2)
    unit = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)
    torch.testing.assert_close(big.block_norms(grid=grid) / 1e160, unit.block_norms(grid=grid), rtol=1e-14, atol=0)
    torch.testing.assert_close(big.frobenius_norm() / 1e160, unit.frobenius_norm(), rtol=1e-14, atol=0)

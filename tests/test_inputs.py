"""The cases of the adversarial input sweep (issue 10), one test each: non-finite values through
zero blocks, head-averaged attention, strides, empty sizes, dtype names, float8, and HVOOperator
arguments that are accepted (negative indices, X as an (N, M) matrix, grid=R) or named."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import reference

from conftest import assert_close_to_reference, random_layer

NAN, INF = float("nan"), float("inf")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in dk.available_backends("cpu"), reason=f"{b} unavailable"))
            for b in ("reference", "cpp", "triton")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("case", ["nan_ov_zero_block", "inf_ov_zero_block", "nan_attn_zero_ov_column",
                                  "all_nan_attn"])
def test_non_finite_values_propagate_through_zero_blocks(backend, layout, case):
    """0 · NaN = NaN and 0 · Inf = NaN: no backend may store a zero for a block or column that is
    zero in one factor when the other factor is not finite there."""
    attn, w_v, w_o = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), torch.ones(1, 1), torch.ones(1, 1)
    if case == "nan_ov_zero_block":  # the sweep's example: reference all NaN, cpp [[nan, 0], [nan, nan]]
        w_o = torch.tensor([[NAN]])
    elif case == "inf_ov_zero_block":
        w_o = torch.tensor([[INF]])
    elif case == "nan_attn_zero_ov_column":  # OV has a zero column, A a NaN
        attn, w_v, w_o = torch.tensor([[[NAN, 0.5], [0.5, 0.5]]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 1)
    else:  # the Triton interpreter used to return zeros here
        attn = torch.full((1, 2, 2), NAN)
    got = dk.hvo_matrix(attn, w_v, w_o, layout=layout, backend=backend)
    expected = reference.hvo_matrix(attn[None], reference.ov_circuits(w_v, w_o, 1, 1), layout)[0]
    assert got.isnan().any() and torch.equal(got.isnan(), expected.isnan()), (got, expected)
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_operator_methods_propagate_nan_like_the_dense_matrix():
    attn, w_v, w_o = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), torch.ones(1, 1), torch.tensor([[NAN]])
    op = dk.HVOOperator(attn, w_v, w_o)
    assert op.block(0, 1).isnan().all()  # a zero block times NaN
    assert op.block_norms().isnan().all() and op.frobenius_norm().isnan() and op.trace().isnan()
    assert op.matvec(torch.ones(2)).isnan().all() and op.rmatvec(torch.ones(2)).isnan().all()
    assert op.tile(slice(0, 2), slice(0, 2)).isnan().all()  # the "auto" kernel (cpp on the CPU)


def test_head_averaged_attention_is_refused_with_num_heads():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    _, averaged = mha(x, x, x)  # (B, N, N) = (3, 5, 5): averaged over the 2 heads, nn.MultiheadAttention's default
    w_v, w_o = mha.in_proj_weight[16:].detach(), mha.out_proj.weight.detach()
    with pytest.raises(ValueError, match=r"num_heads=2 but attn of shape \(3, 5, 5\) has 3 heads on axis -3") as info:
        dk.hvo_matrix(averaged.detach(), w_v, w_o, num_heads=2)
    assert "average_attn_weights=False" in str(info.value)
    assert "attn.unsqueeze(1)" in str(info.value) and "num_heads=1" in str(info.value)
    _, per_head = mha(x, x, x, average_attn_weights=False)  # (B, h, N, N)
    assert dk.hvo_matrix(per_head.detach(), w_v, w_o, num_heads=2).shape == (3, 40, 40)
    for call in (lambda: dk.hvo_bias(averaged.detach(), w_o, num_heads=2),
                 lambda: dk.HVOOperator(averaged.detach(), w_v, w_o, num_heads=2)):
        with pytest.raises(ValueError, match="has 3 heads on axis -3"):
            call()
    with pytest.raises(ValueError, match="num_heads must be a positive int or None"):
        dk.hvo_matrix(per_head.detach(), w_v, w_o, num_heads=0)


def test_indivisible_head_count_error_explains_3d_attn():
    with pytest.raises(ValueError, match=r"w_o must have shape .* attn is read as \(h, N, N\)"):
        dk.hvo_matrix(torch.rand(3, 4, 4), torch.rand(8, 8), torch.rand(8, 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["token", "feature"])
def test_transposed_and_sliced_attention(backend, layout):
    lay = random_layer(2, 3, tokens=5, m_in=4, m_out=3, seed=3)
    for attn in (lay["attn"].mT, lay["attn"].mT.contiguous().mT, lay["attn"].flip(-2),
                 torch.cat([lay["attn"], lay["attn"]], -1)[..., ::2]):
        got = dk.hvo_matrix(attn, lay["w_v"], lay["w_o"], layout=layout, backend=backend)
        assert_close_to_reference(got, attn, lay["w_v"], lay["w_o"], None, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_transposed_attention_and_gradient(backend):
    lay = random_layer(1, 2, tokens=3, m_in=2, m_out=2, seed=1, dtype=torch.float64)
    attn = lay["attn"].mT.detach().requires_grad_()
    w_v = lay["w_v"].detach().requires_grad_()
    w = dk.hvo_matrix(attn, w_v, lay["w_o"], backend="reference" if backend == "triton" else backend)
    (w.mT * torch.arange(w.numel(), dtype=w.dtype).reshape(w.mT.shape)).sum().backward()  # a non-contiguous grad
    attn_ref, w_v_ref = lay["attn"].mT.detach().requires_grad_(), lay["w_v"].detach().requires_grad_()
    ov = reference.ov_circuits(w_v_ref, lay["w_o"], 2, 2)
    w_ref = reference.hvo_matrix(attn_ref, ov)
    (w_ref.mT * torch.arange(w.numel(), dtype=w.dtype).reshape(w.mT.shape)).sum().backward()
    torch.testing.assert_close(attn.grad, attn_ref.grad)
    torch.testing.assert_close(w_v.grad, w_v_ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,shape", [((0, 4, 3), (0, 12, 16)), ((2, 0, 3), (2, 12, 0)), ((2, 4, 0), (2, 0, 16))])
def test_empty_batch_and_zero_widths(backend, sizes, shape):
    batch, m_in, m_out = sizes
    lay = random_layer(max(batch, 1), 2, tokens=4, head_dim=2, m_in=max(m_in, 1), m_out=max(m_out, 1))
    attn, w_v, w_o = lay["attn"][:batch], lay["w_v"][:, :m_in], lay["w_o"][:m_out]
    assert dk.hvo_matrix(attn, w_v, w_o, backend=backend).shape == shape
    assert dk.hvo_matrix(attn, w_v, w_o, backend=backend, out=torch.empty(shape)).shape == shape
    op = dk.HVOOperator(attn, w_v, w_o, b_o=None)
    assert op.matvec(torch.randn(batch, 4 * m_in)).shape == (batch, 4 * m_out)
    assert op.rmatvec(torch.randn(batch, 4 * m_out)).shape == (batch, 4 * m_in)
    assert op.block_norms().shape == (batch, 4, 4) and op.frobenius_norm().shape == (batch,)
    assert dk.hvo_bias(attn, w_o).shape == (batch, 4 * m_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("batched", [False, True])
def test_zero_head_size(backend, layout, batched):
    """d = 0 (w_v (0, M_in), w_o (M_out, 0)): every OV_i is an empty sum, zero, so W' is A ⊗ 0 (NaN
    where A is NaN); the C++ OV kernel used to die of SIGFPE (a division by d)."""
    attn = torch.tril(torch.softmax(torch.randn(2, 3, 4, 4), -1))
    attn[0, 1, 2, 3] = NAN
    attn = attn if batched else attn[0]
    w_v, w_o = torch.empty(0, 5), torch.empty(6, 0)
    expected = reference.hvo_matrix(attn if batched else attn[None], torch.zeros(3, 6, 5), layout)
    expected = expected if batched else expected[0]
    torch.testing.assert_close(dk.hvo_matrix(attn, w_v, w_o, layout=layout, backend=backend), expected, equal_nan=True)
    op = dk.HVOOperator(attn, w_v, w_o, layout=layout)
    torch.testing.assert_close(op.tile(slice(3, 20), slice(2, 17)), expected[..., 3:20, 2:17], equal_nan=True)
    assert dk.ov_circuits(w_v, w_o, 3).shape == (3, 6, 5)


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("torch.bfloat16", torch.bfloat16),
                                        ("half", torch.float16), ("float64", torch.float64)])
def test_dtype_by_name(name, dtype):
    lay = random_layer(1, 2, tokens=3, batched=False)
    assert dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], dtype=name).dtype == dtype
    assert dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"]).tile(slice(0, 3), slice(0, 3), dtype=name).dtype == dtype


@pytest.mark.parametrize("dtype,message", [("float31", "dtype must be a torch.dtype or one of 'float32'"),
                                           ("int32", "dtype must be one of float32"),
                                           (3, "dtype must be a torch.dtype")])
def test_bad_dtype_names(dtype, message):
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(TypeError, match=message):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_refused_with_the_fix(dtype):
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(TypeError, match=r"w_v has dtype torch.float8.*Dequantise float8 weights"):
        dk.hvo_matrix(lay["attn"], lay["w_v"].to(dtype), lay["w_o"])
    with pytest.raises(TypeError, match=r"w_o has dtype torch.float8"):
        dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"].to(dtype))


@pytest.fixture
def op():
    lay = random_layer(1, 4, 2, tokens=5, head_dim=2, m_in=3, m_out=4, batched=False, seed=7)
    return dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_x_as_a_token_matrix(layout):
    lay = random_layer(2, 2, tokens=5, head_dim=2, m_in=3, m_out=4, seed=2)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], layout=layout)
    x = torch.randn(2, 5, 3)  # X (B, N, M_in), tokens as rows
    flat = x.reshape(2, 15) if layout == "token" else x.transpose(1, 2).reshape(2, 15)
    y = op.matvec(x)
    assert y.shape == (2, 5, 4)
    expected = op.matvec(flat)
    torch.testing.assert_close(y.reshape(2, 20) if layout == "token" else y.transpose(1, 2).reshape(2, 20), expected)
    assert op.rmatvec(torch.randn(2, 5, 4)).shape == (2, 5, 3)


def test_vectors_of_another_dtype_are_promoted(op):
    x = torch.randn(15, dtype=torch.float64)
    y = op.matvec(x)
    assert y.dtype == torch.float64
    dense = dk.hvo_matrix(op.attn.double(), op.w_v.double(), op.w_o.double(), num_kv_heads=2)
    torch.testing.assert_close(y, dense @ x)
    y = torch.ones(20, dtype=torch.float64)
    torch.testing.assert_close(op.rmatvec(y), dense.T @ y)


def test_negative_block_indices_count_from_the_end(op):
    torch.testing.assert_close(op.block(-1, -5), op.block(4, 0), rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"n=5 is out of range for N=5 tokens \(expected -5 <= n < 5\)"):
        op.block(5, 0)
    with pytest.raises(ValueError, match="m=-6 is out of range"):  # also a ValueError
        op.block(0, -6)
    with pytest.raises(TypeError, match="n must be an int, got bool True"):
        op.block(True, 1)


def test_square_grid_from_one_int(op):
    torch.testing.assert_close(op.block_norms(grid=2), op.block_norms(grid=(2, 2)), rtol=0, atol=0)
    with pytest.raises(TypeError, match="grid must be None, an int R or a pair"):
        op.block_norms(grid=2.5)


@pytest.mark.parametrize("x,name,message", [
    (torch.tensor(1.0), "x", "got a 0-d tensor"),
    (torch.ones(15, dtype=torch.int64), "x", "must have a floating-point dtype"),
    (torch.ones(15, dtype=torch.complex64), "x", "must have a floating-point dtype"),
    (torch.ones(15, device="meta"), "x", "x is on meta but the operator's tensors are on cpu"),
])
def test_bad_vectors_are_named(op, x, name, message):
    with pytest.raises((ValueError, TypeError), match=message):
        op.matvec(x)


def test_matmat_needs_a_matrix(op):
    with pytest.raises(ValueError, match=r"X must have shape \(N\*M_in, K\) = \(15, K\), got \(15,\)"):
        op.matmat(torch.ones(15))
    assert op.matmat(torch.ones(15, 0)).shape == (20, 0)


def test_meta_operator_infers_shapes():
    lay = random_layer(1, 2, tokens=3, batched=False)
    meta = {k: lay[k].to("meta") for k in ("attn", "w_v", "w_o")}
    assert dk.hvo_matrix(meta["attn"], meta["w_v"], meta["w_o"]).device.type == "meta"
    assert dk.HVOOperator(meta["attn"], meta["w_v"], meta["w_o"]).matvec(torch.ones(33, device="meta")).shape == (27,)


@pytest.mark.parametrize("values,finite", [([1.0, 2.0], True), ([3e38, 3e38], True), ([1.0, NAN], False),
                                           ([INF, -INF], False), ([-INF, 0.0], False), ([], True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_all_finite_is_exact_even_when_the_sum_overflows(values, finite, dtype):
    from duat_kernels._validation import all_finite

    t = torch.tensor(values, dtype=torch.float64).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    t = torch.where(torch.tensor(values, dtype=torch.float64).isfinite(), t, torch.tensor(values, dtype=torch.float64))
    assert all_finite(t.to(dtype).repeat(100)) is finite


def test_numpy_integers_count_heads():
    # num_heads, num_kv_heads and heads take NumPy integers as block() indices do (they were refused)
    import numpy as np

    lay = random_layer(1, 4, 2, tokens=5, m_in=7, m_out=6, batched=False)
    want = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, heads=[1, 3])
    got = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=np.int64(2), num_heads=np.int32(4),
                        heads=[np.int64(1), 3])
    assert torch.equal(got, want)
    assert torch.equal(dk.ov_circuits(lay["w_v"], lay["w_o"], np.int64(4), np.int16(2)),
                       dk.ov_circuits(lay["w_v"], lay["w_o"], 4, 2))
    for bad in (True, 2.0, torch.tensor(2)):
        with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
            dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=bad)


def _negated_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor equal to t whose negative bit is set (what x.conj().imag of a complex x gives)."""
    view = torch._neg_view(-t)
    assert view.is_neg()
    return view


@pytest.mark.parametrize("name", ["attn", "w_v", "w_o"])
def test_lazily_negated_views_are_read_as_their_values(name):
    # the cpp backend (and block_norms, to_dense, tile through it) failed with torch's "Can't call
    # numpy() on Tensor that has negative bit set"
    lay = random_layer(1, 2, tokens=3, head_dim=2, m_in=3, m_out=3, batched=False, seed=5)
    plain = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    args = {k: lay[k] for k in ("attn", "w_v", "w_o")}
    args[name] = _negated_view(args[name])
    op = dk.HVOOperator(args["attn"], args["w_v"], args["w_o"])
    want = plain.to_dense()
    torch.testing.assert_close(dk.hvo_matrix(args["attn"], args["w_v"], args["w_o"], backend="cpp"), want)
    torch.testing.assert_close(op.to_dense(), want)
    torch.testing.assert_close(op.tile(slice(1, 5), slice(2, 9)), want[1:5, 2:9])
    torch.testing.assert_close(op.block_norms(), plain.block_norms())
    torch.testing.assert_close(op.block_norms(grid=2), plain.block_norms(grid=2))
    with pytest.raises(ValueError, match="out has its negative bit set"):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], out=_negated_view(torch.zeros(9, 9)))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lazily_negated_q_and_k(softcap):
    # block_norms and rmatvec of a from_qk operator passed q and k to the C++ passes through .numpy()
    g = torch.Generator().manual_seed(4)
    q, k, w_v, w_o = (torch.randn(*s, generator=g) for s in ((2, 3, 4), (2, 3, 4), (4, 3), (3, 4)))
    plain = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, softcap=softcap)
    op = dk.HVOOperator.from_qk(_negated_view(q), _negated_view(k), w_v, w_o, causal=True, softcap=softcap)
    x = torch.randn(9, generator=g)
    torch.testing.assert_close(op.block_norms(), plain.block_norms())
    torch.testing.assert_close(op.block_norms(grid=2), plain.block_norms(grid=2))
    torch.testing.assert_close(op.rmatvec(x), plain.rmatvec(x))
    torch.testing.assert_close(op.matvec(x), plain.matvec(x))


def test_sparse_and_mkldnn_tensors_are_refused_by_name():
    # each failed deep inside torch: "Cannot access storage of SparseTensorImpl", "reshape is not
    # implemented for sparse tensors", "Sparse CSR tensors do not have strides", aten::as_strided on MkldnnCPU
    lay = random_layer(1, 2, tokens=3, head_dim=2, m_in=3, m_out=3, batched=False)
    attn, w_v, w_o = lay["attn"], lay["w_v"], lay["w_o"]
    op = dk.HVOOperator(attn, w_v, w_o)
    q = torch.randn(2, 3, 2)
    for name, call in (("attn", lambda: dk.hvo_matrix(attn.to_sparse(), w_v, w_o)),
                       ("w_v", lambda: dk.hvo_matrix(attn, w_v.to_sparse_csr(), w_o)),
                       ("attn", lambda: dk.hvo_matrix(attn.to_mkldnn(), w_v, w_o)),
                       ("out", lambda: dk.hvo_matrix(attn, w_v, w_o, out=torch.zeros(9, 9).to_sparse())),
                       ("b_v", lambda: dk.hvo_bias(attn, w_o, torch.ones(4).to_sparse())),
                       ("x", lambda: op.matvec(torch.ones(9).to_sparse())),
                       ("X", lambda: op.matmat(torch.ones(9, 2).to_sparse())),
                       ("q", lambda: dk.HVOOperator.from_qk(q.to_sparse(), q, w_v, w_o)),
                       ("attention_mask", lambda: dk.HVOOperator.from_qk(q, q, w_v, w_o,
                                                                         attention_mask=torch.ones(3).to_sparse()))):
        with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got layout torch\."):
            call()


def test_output_folders_that_cannot_be_created_are_refused_in_one_line(tmp_path, monkeypatch):
    """Root passes os.access on read-only and virtual file systems (/proc): the folder is created and written
    to, so `--cache /proc/x` is refused up front, not as a raw "[Errno 2]" after the model has loaded."""
    import os

    from duat_kernels._files import check_output_folder

    check_output_folder("--out", tmp_path / "new" / "run")
    assert not any(tmp_path.iterdir())  # tried, and removed again: a refused run leaves no empty folder behind
    (tmp_path / "old").mkdir()
    check_output_folder("--out", tmp_path / "old")
    assert (tmp_path / "old").is_dir()  # a folder that was there stays

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(ValueError, match=r"^--cache .*/x: the folder cannot be created or written \(Read-only file "):
        check_output_folder("--cache", tmp_path / "x")

"""HVOOperator (matrix-free) against the dense reference W'."""

from __future__ import annotations

import re

import pytest
import torch

import duat_kernels as dk
from duat_kernels import backends

from conftest import random_layer


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_products_match_dense(layout, batched, heads, kv_heads):
    lay = random_layer(2, heads, kv_heads, tokens=7, head_dim=3, m_in=5, m_out=4, causal=True, batched=batched,
                       dtype=torch.float64)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads, b_v=lay["b_v"], b_o=lay["b_o"],
                        layout=layout)
    dense = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads, layout=layout,
                          backend="reference")
    assert op.shape == tuple(dense.shape)
    lead = (2,) if batched else ()
    x = torch.randn(*lead, 35, dtype=torch.float64)
    y = torch.randn(*lead, 28, dtype=torch.float64)
    xs = torch.randn(*lead, 35, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(x), (dense @ x[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.rmatvec(y), (dense.transpose(-1, -2) @ y[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.matmat(xs), dense @ xs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), dense.to(op.to_dense().dtype))
    torch.testing.assert_close(op.bias(), dk.hvo_bias(lay["attn"], lay["w_o"], lay["b_v"], lay["b_o"],
                                                      num_kv_heads=kv_heads, layout=layout))


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("grad", [False, True])  # True exercises the reference tile path
def test_tiles_and_blocks_match_dense(layout, grad):
    lay = random_layer(1, 6, 3, tokens=6, head_dim=2, m_in=9, m_out=5, batched=False, dtype=torch.float64)
    attn = lay["attn"].requires_grad_(grad)
    op = dk.HVOOperator(attn, lay["w_v"], lay["w_o"], num_kv_heads=3, layout=layout)
    with torch.no_grad():
        dense = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=3, layout=layout, backend="reference")
    for rows, cols in [(slice(0, 30), slice(0, 54)), (slice(3, 17), slice(8, 41)), (slice(29, None), slice(None, 1))]:
        torch.testing.assert_close(op.tile(rows, cols), dense[rows, cols], rtol=1e-12, atol=1e-12)
    tok = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=3, backend="reference")
    torch.testing.assert_close(op.block(4, 1), tok[20:25, 9:18], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("from_qk", [False, True])
def test_tile_gradients_match_the_dense_slice(layout, from_qk):
    # tile() ran under no_grad: its result had no grad_fn, and backward() failed on it
    g = torch.Generator().manual_seed(3)
    heads, kv, n, d, m_in, m_out = 4, 2, 5, 3, 7, 6
    w_v = torch.randn(kv * d, m_in, generator=g, dtype=torch.float64, requires_grad=True)
    w_o = torch.randn(m_out, heads * d, generator=g, dtype=torch.float64, requires_grad=True)
    if from_qk:
        q = torch.randn(2, heads, n, d, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, kv, n, d, generator=g, dtype=torch.float64, requires_grad=True)
        leaves = (q, k, w_v, w_o)
        op = dk.HVOOperator.from_qk(q, k, w_v, w_o, num_kv_heads=kv, causal=True, layout=layout)
        attn = (q @ k.repeat_interleave(heads // kv, 1).transpose(-1, -2) * d ** -0.5).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    else:
        attn = torch.randn(2, heads, n, n, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(True)
        leaves = (attn, w_v, w_o)
        op = dk.HVOOperator(attn, w_v, w_o, num_kv_heads=kv, layout=layout)
    weights = torch.randn(2, 13, 17, generator=g, dtype=torch.float64)
    tile = op.tile(slice(4, 17), slice(9, 26))
    assert tile.requires_grad
    got = torch.autograd.grad((tile * weights).sum(), leaves)
    dense = dk.hvo_matrix(attn, w_v, w_o, num_kv_heads=kv, layout=layout, backend="reference")
    torch.testing.assert_close(tile, dense[:, 4:17, 9:26], rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad((dense[:, 4:17, 9:26] * weights).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # and without autograd, the kernel path (an exact slice)
        assert not op.tile(slice(4, 17), slice(9, 26)).requires_grad


def test_bad_arguments():
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=2, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(ValueError, match=r"x must have last dimension N\*M = 3\*4 = 12, got \(13,\)"):
        op.matvec(torch.zeros(13))
    with pytest.raises(IndexError, match="n=3 is out of range for N=3"):
        op.block(3, 0)
    with pytest.raises(ValueError, match="rows must be a slice with step 1"):
        op.tile(slice(0, 4, 2), slice(0, 2))
    with pytest.raises(ValueError, match="selects no entries"):
        op.tile(slice(4, 4), slice(0, 2))


@pytest.mark.parametrize("batched", [False, True])
def test_matmat_errors_name_x_and_its_shape(batched):
    # matmat's errors came from matvec on Xᵀ: "x must have last dimension N*M = 3*4 = 12, got (2, 13)"
    # for X of shape (13, 2) (another argument's name, the shape transposed); int X was called x too
    lay = random_layer(2, 2, tokens=3, m_in=4, m_out=2, batched=batched)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    lead, shape = ((2,), r"\(B, N\*M_in, K\) = \(2, 12, K\)") if batched else ((), r"\(N\*M_in, K\) = \(12, K\)")
    bad = [(*lead, 13, 2)] + ([(3, 12, 2)] if batched else [(3, 4)])
    for size in bad:
        with pytest.raises(ValueError, match=rf"X must have shape {shape}, got {re.escape(str(size))}"):
            op.matmat(torch.zeros(size))
    with pytest.raises(TypeError, match="X must have a floating-point dtype"):
        op.matmat(torch.zeros(*lead, 12, 2, dtype=torch.int32))


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("batched", [False, True])
def test_tiles_are_bitwise_slices_of_to_dense(layout, batched):
    # The C++ backend forms only the part of OV (or, for one token-layout map, only the slabs) a tile
    # touches; every OV entry is the same chain of multiply-adds, so tiles are exact slices.
    lay = random_layer(2, 4, 2, tokens=5, head_dim=3, m_in=37, m_out=11, causal=True, batched=batched, seed=21)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout)
    dense = op.to_dense()
    for r0, r1, c0, c1 in [(0, 55, 0, 185), (3, 17, 8, 41), (12, 13, 40, 80), (50, 55, 0, 1)]:
        assert torch.equal(op.tile(slice(r0, r1), slice(c0, c1)), dense[..., r0:r1, c0:c1]), (r0, r1, c0, c1)


def test_batched_token_tile_across_tokens_forms_no_ov(monkeypatch):
    # A token-layout tile spanning two tokens both ways reads every row and column of OV: a batch
    # writes it from the weights per element (as one map does) instead of forming the (h, M, M) OV.
    lay = random_layer(3, 4, 2, tokens=5, head_dim=3, m_in=37, m_out=11, causal=False, batched=True, seed=5)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)
    dense = op.to_dense()

    def no_ov(*args, **kwargs):
        raise AssertionError("the tile formed OV")

    monkeypatch.setattr(backends, "ov_part", no_ov)
    monkeypatch.setattr(backends, "ov_circuits", no_ov)
    assert torch.equal(op.tile(slice(3, 17), slice(8, 41)), dense[:, 3:17, 8:41])


def test_fraction_above_samples_float64_operators_in_float64():
    """The sampled entries were formed in float32: W' = [[1 + 1e-12]] counted as not above 1."""
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    op = dk.HVOOperator(one, one[0], torch.full((1, 1), 1 + 1e-12, dtype=torch.float64))
    assert op.fraction_above(1.0, samples=16).fraction == 1.0
    assert op.fraction_above(1.0 + 2e-12, samples=16).fraction == 0.0


def test_tile_slices_of_floats_are_named():
    # Python's own "slice indices must be integers or None or have an __index__ method" named nothing
    lay = random_layer(1, 2, tokens=3, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(TypeError, match=r"rows must be a slice of ints \(or None\), got slice\(0.0, 2.0, None\)"):
        op.tile(slice(0.0, 2.0), slice(0, 4))


def test_operator_without_w_v_is_refused():
    # HVOOperator(attn, None, w_o) made an operator of shape (N·M_out, 0) without a word
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(TypeError, match="w_v must be a torch.Tensor, got NoneType"):
        dk.HVOOperator(lay["attn"], None, lay["w_o"])


@pytest.mark.parametrize("rows,message", [
    (slice(True, 2), r"rows must be a slice of ints \(or None\), got slice\(True, 2, None\)"),
    (slice(0, torch.tensor(True)), r"rows must be a slice of ints \(or None\)"),
])
def test_tile_slices_of_bools_are_refused(rows, message):
    # slice(True, 2) was read as 1:2 (block(True, 0) is refused); a bool tensor bound likewise
    lay = random_layer(1, 2, tokens=3, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(TypeError, match=message):
        op.tile(rows, slice(0, 4))


def test_block_index_of_a_bool_tensor_is_refused():
    # v.integer took torch.tensor(True) as 1: block(torch.tensor(True), 0) was block (1, 0)
    lay = random_layer(1, 2, tokens=3, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    with pytest.raises(TypeError, match="n must be an int, got Tensor"):
        op.block(torch.tensor(True), 0)
    torch.testing.assert_close(op.block(torch.tensor(1), 0), op.block(1, 0), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["finite", "nan_w_v", "inf_w_o_zero_alpha"])
def test_block_forms_ov_a_few_rows_at_a_time(case, monkeypatch):
    # block(n, m) formed the whole (h, M_out, M_in) OV, h times the block: h = 2, M = 100000 failed with
    # the allocator's raw RuntimeError for 80 GB (a block that itself does not fit is DenseTooLargeError)
    from duat_kernels import _memory, operator_parts

    monkeypatch.setattr(operator_parts, "OV_ENTRIES_PER_STEP", 20)  # OV in chunks of 2 of its 5 rows
    lay = random_layer(2, 4, 2, tokens=3, head_dim=2, m_in=5, m_out=5, causal=True, seed=3)
    w_v, w_o = lay["w_v"].clone(), lay["w_o"].clone()
    if case == "nan_w_v":
        w_v[1, 2] = float("nan")
    elif case == "inf_w_o_zero_alpha":  # block (0, 2) is a causal zero block: 0 · Inf = NaN
        w_o[3, 1] = float("inf")
    op = dk.HVOOperator(lay["attn"], w_v, w_o, num_kv_heads=2)
    dense = op.to_dense(dtype=torch.float64).reshape(2, 3, 5, 3, 5)
    for n, m in ((0, 2), (2, 1)):
        torch.testing.assert_close(op.block(n, m).double(), dense[:, n, :, m], equal_nan=True)
    monkeypatch.setattr(_memory, "available_memory", lambda device: 100)
    with pytest.raises(dk.DenseTooLargeError, match=r"a block of W' of shape \(2, 5, 5\) needs 200 B"):
        op.block(0, 0)
    with pytest.raises(dk.DenseTooLargeError, match=r"OV circuits of shape \(4, 5, 5\) needs 400 B"):
        dk.ov_circuits(w_v, w_o, 4, 2)


def test_block_composes_with_torch_compile_fullgraph():
    # the size check of weighted_ov reads /proc/meminfo, which TorchDynamo cannot trace ("builtin operator open")
    lay = random_layer(1, 2, tokens=3, m_in=4, m_out=3, batched=False)
    compiled = torch.compile(lambda a, wv, wo: dk.HVOOperator(a, wv, wo).block(1, 2), fullgraph=True)
    torch.testing.assert_close(compiled(lay["attn"], lay["w_v"], lay["w_o"]),
                               dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"]).block(1, 2))


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("batched", [False, True])
def test_tile_under_fake_tensor_mode_runs_no_kernel(layout, batched):
    """tile handed FakeTensorMode's tensors to the C++ tile kernel ('.numpy() is not supported for tensor
    subclasses') where matvec, block and to_dense give fake results: backends.direct_kernel_call decides
    whether the kernel may run, as in hvo_matrix."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        lay = random_layer(2, 4, 2, tokens=5, head_dim=2, m_in=3, m_out=4, batched=batched)
        op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout)
        tile = op.tile(slice(1, 9), slice(2, 13), dtype=torch.float64)
    assert isinstance(tile, FakeTensor) and (tuple(tile.shape), tile.dtype) == (((2,) if batched else ()) + (8, 11),
                                                                                torch.float64)


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_tile_composes_with_torch_compile_fullgraph(layout):
    # tile's size check read /proc/meminfo, which TorchDynamo cannot trace ("builtin operator open"), as
    # block's did; traced, the tile is the Kronecker products of its factor ranges (no C++ kernel call)
    lay = random_layer(1, 2, tokens=4, m_in=3, m_out=2, batched=False)
    tile = lambda a, wv, wo: dk.HVOOperator(a, wv, wo, layout=layout).tile(slice(1, 6), slice(2, 11))  # noqa: E731
    torch.testing.assert_close(torch.compile(tile, fullgraph=True)(lay["attn"], lay["w_v"], lay["w_o"]),
                               tile(lay["attn"], lay["w_v"], lay["w_o"]))


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_tile_and_block_under_torch_func_vmap(layout):
    # vmap over attention maps: tile handed vmap's batched A (no storage) to the fused C++ kernel ("Cannot
    # access data pointer of Tensor that doesn't have storage"; only w_v was checked), and block wrote batched
    # rows into a plain buffer ("vmap: inplace arithmetic(self, *extra_args) is not possible")
    lay = random_layer(3, 4, 2, tokens=4, head_dim=2, m_in=3, m_out=2, dtype=torch.float64)
    dense = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout, backend="reference")
    token_dense = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, backend="reference")

    def op(a):
        return dk.HVOOperator(a, lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout)

    tiles = torch.func.vmap(lambda a: op(a).tile(slice(1, 6), slice(2, 11)))(lay["attn"])
    torch.testing.assert_close(tiles, dense[:, 1:6, 2:11])
    blocks = torch.func.vmap(lambda a: op(a).block(1, 2))(lay["attn"])
    torch.testing.assert_close(blocks, token_dense[:, 2:4, 6:9])


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_tile_and_block_norms_take_forward_mode_ad(layout):
    # torch.autograd.forward_ad: tile ran the C++ kernel on the dual tensors (they require no grad) and came
    # back without a tangent, silently; block_norms ran under no_grad
    import torch.autograd.forward_ad as fwAD

    lay = random_layer(2, 4, 2, tokens=4, head_dim=2, m_in=3, m_out=2, dtype=torch.float64)
    tangent = torch.randn_like(lay["attn"])

    def parts(a):
        op = dk.HVOOperator(a, lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout)
        return op.tile(slice(1, 6), slice(2, 11)), op.block_norms()

    def dense_parts(a):
        w = dk.hvo_matrix(a, lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout, backend="reference")
        token = dk.hvo_matrix(a, lay["w_v"], lay["w_o"], num_kv_heads=2, backend="reference")
        return w[:, 1:6, 2:11], torch.linalg.matrix_norm(token.reshape(2, 4, 2, 4, 3).transpose(-3, -2))

    _, want = torch.autograd.functional.jvp(dense_parts, lay["attn"], tangent)
    with fwAD.dual_level():
        got = [fwAD.unpack_dual(p).tangent for p in parts(fwAD.make_dual(lay["attn"], tangent))]
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w)


METHODS = {"matvec": lambda op, x: op.matvec(x), "rmatvec": lambda op, x: op.rmatvec(x),
           "block_norms": lambda op, x: op.block_norms(), "grid_norms": lambda op, x: op.block_norms((2, 2)),
           "block": lambda op, x: op.block(1, 2), "tile": lambda op, x: op.tile(slice(1, 4), slice(0, 5)),
           "bias": lambda op, x: op.bias(), "to_dense": lambda op, x: op.to_dense(),
           "frobenius_norm": lambda op, x: op.frobenius_norm(), "trace": lambda op, x: op.trace(),
           "contributions": lambda op, x: op.contributions(x), "attn": lambda op, x: op.attn}


@pytest.mark.parametrize("source", ["attn", "qk", "qk_mask", "qk_softcap_window"])
def test_methods_under_fake_tensor_mode_give_eager_shapes(source):
    """Shape propagation (FakeTensorMode) through every method: block_norms (both sources) and from_qk's
    products failed with torch's DataDependentOutputException (finiteness checks, the rows without keys,
    the logits' range read values) and rmatvec with '.numpy() is not supported for tensor subclasses'
    (the C++ q/k pass); the fake results have the shapes and dtypes of the eager ones."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def build():
        g = torch.Generator().manual_seed(4)
        attn = torch.rand(2, 4, 3, 3, generator=g).softmax(-1)
        q, k = torch.randn(2, 4, 3, 2, generator=g), torch.randn(2, 2, 3, 2, generator=g)
        w_v, w_o, b_v = torch.randn(4, 3, generator=g), torch.randn(3, 8, generator=g), torch.randn(4, generator=g)
        mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # int64 0/1, as tokenizers give it
        op = {"attn": lambda: dk.HVOOperator(attn, w_v, w_o, num_kv_heads=2, b_v=b_v),
              "qk": lambda: dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, b_v=b_v),
              "qk_mask": lambda: dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True, b_v=b_v, attention_mask=mask),
              "qk_softcap_window": lambda: dk.HVOOperator.from_qk(q, k, w_v, w_o, softcap=2.0, sliding_window=2,
                                                                  b_v=b_v)}[source]()
        return op, torch.randn(2, 9, generator=g)

    eager = {name: call(*build()) for name, call in METHODS.items()}
    with FakeTensorMode():
        op, x = build()
        fake = {name: call(op, x) for name, call in METHODS.items()}
    for name, result in fake.items():
        assert isinstance(result, FakeTensor), name
        assert (result.shape, result.dtype) == (eager[name].shape, eager[name].dtype), name


@pytest.mark.parametrize("method", ["matvec", "rmatvec", "matmat"])
def test_products_that_cannot_fit_are_refused_before_allocating(method):
    # 10^6 expanded (stride-0) vectors of N = 200000: the allocator's "can't allocate memory: you tried to allocate
    # 800000000000 bytes" (a raw RuntimeError)
    n = 200_000
    op = dk.HVOOperator(torch.ones(1, 1, 1).expand(1, n, n), torch.ones(1, 1), torch.ones(1, 1))
    x = torch.ones(1, 1).expand(n, 10 ** 6) if method == "matmat" else torch.ones(1, 1).expand(10 ** 6, n)
    with pytest.raises(dk.DenseTooLargeError, match=r"of 1,000,000 vector\(s\) per batch element .* needs 3.6 TiB .* "
                                                     r"Pass fewer vectors"):
        getattr(op, method)(x)


@pytest.mark.parametrize("kwargs", [dict(layout="feature"), dict(num_kv_heads=1)])
def test_to_dense_names_the_arguments_the_operator_fixes(kwargs):
    # "hvo_matrix() got multiple values for keyword argument 'layout'"
    lay = random_layer(1, 2, tokens=3, batched=False)
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"HVOOperator.to_dense takes its own {name} \\({name}=.*\\); build another"):
        op.to_dense(**kwargs)

"""Property tests of the public API (hypothesis): for random shapes (empty sizes included), strides,
dtypes, non-finite values and every backend and operator method, the result equals the reference
(NaN where the reference has NaN), or the call raises a ValueError/TypeError naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import duat_kernels as dk
from duat_kernels import reference

from strategies import (ROUNDOFF, SPECIALS, assert_ieee_close, dense_reference, layers, materialise_bound, qk_layers,
                        softmax_attention)

BACKEND_DTYPES = {"reference": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                  "cpp": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                  "triton": (torch.float32, torch.float16, torch.bfloat16)}
# The Triton interpreter runs each program in Python: fewer, smaller examples (the profile's elsewhere).
TRITON_EXAMPLES = 20


def _backend_param(name):
    return pytest.param(name, marks=pytest.mark.skipif(name not in dk.available_backends("cpu"),
                                                       reason=f"backend {name} unavailable here"))


@pytest.mark.parametrize("backend", [_backend_param(b) for b in BACKEND_DTYPES])
def test_hvo_matrix_equals_reference(backend):
    small = backend == "triton"

    @settings(max_examples=min(TRITON_EXAMPLES, settings().max_examples) if small else settings().max_examples)
    @given(lay=layers(max_tokens=3 if small else 4, max_width=3 if small else 4, dtypes=BACKEND_DTYPES[backend]),
           layout=st.sampled_from(["token", "feature"]), data=st.data())
    def check(lay, layout, data):
        dtype = data.draw(st.sampled_from([None, *BACKEND_DTYPES[backend], "float32", "torch.float32"]))
        num_heads = data.draw(st.sampled_from([None, lay["heads"]]))
        got = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=lay["num_kv_heads"], layout=layout,
                            backend=backend, dtype=dtype, num_heads=num_heads)
        out_dtype = dk._validation.as_dtype(dtype) or lay["attn"].dtype
        assert got.dtype == out_dtype
        acc = reference.compute_dtype(out_dtype)
        exact, magnitude = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], lay["num_kv_heads"], layout, acc)
        assert_ieee_close(got, exact.to(out_dtype), materialise_bound(exact, magnitude, lay["heads"], out_dtype),
                          what=f"hvo_matrix(backend={backend!r})")

    check()


@given(lay=layers(dtypes=(torch.float32, torch.float64)), layout=st.sampled_from(["token", "feature"]), data=st.data())
def test_hvo_bias_equals_formula(lay, layout, data):
    kv, d = lay["num_kv_heads"], lay["w_o"].shape[1] // lay["heads"]
    b_v = data.draw(st.sampled_from([None, torch.linspace(-1, 1, kv * d, dtype=lay["w_o"].dtype)]))
    b_o = data.draw(st.sampled_from([None, torch.linspace(-2, 1, lay["w_o"].shape[0], dtype=lay["w_o"].dtype)]))
    if b_v is not None and b_v.numel() and data.draw(st.booleans()):
        b_v[0] = data.draw(st.sampled_from(SPECIALS))
    got = dk.hvo_bias(lay["attn"], lay["w_o"], b_v, b_o, num_kv_heads=kv, layout=layout, num_heads=lay["heads"])
    # b'[(n, c)] = Σ_i (Σ_m A_i[n, m]) (Wo_i b_v[i // g])[c] + b_o[c], head by head in float64
    attn4 = lay["attn"].double() if lay["attn"].dim() == 4 else lay["attn"].double()[None]
    batch, h, n, _ = attn4.shape
    m_out = lay["w_o"].shape[0]
    expected = torch.zeros(batch, n, m_out, dtype=torch.float64)
    magnitude = torch.zeros(batch, n, m_out, dtype=torch.float64)
    for i in range(h):
        if b_v is not None:
            wo_i, bv_i = lay["w_o"].double()[:, i * d:(i + 1) * d], b_v.double()[(i // (h // kv)) * d:][:d]
            expected = expected + attn4[:, i].sum(-1)[..., None] * (wo_i @ bv_i)
            magnitude = magnitude + attn4[:, i].abs().sum(-1)[..., None] * (wo_i.abs() @ bv_i.abs())
    if b_o is not None:
        expected, magnitude = expected + b_o.double(), magnitude + b_o.double().abs()
    if layout == "feature":
        expected, magnitude = expected.transpose(1, 2), magnitude.transpose(1, 2)
    expected, magnitude = expected.reshape(batch, n * m_out), magnitude.reshape(batch, n * m_out)
    if lay["attn"].dim() == 3:
        expected, magnitude = expected[0], magnitude[0]
    u = ROUNDOFF[reference.compute_dtype(got.dtype)]
    assert_ieee_close(got, expected, 2 * (n + d + h + 1) * u * magnitude, what="hvo_bias")


def _x_strategy(width_name: str):
    return st.fixed_dictionaries({"form": st.sampled_from(["flat", "matrix", "columns"]),
                                  "k": st.integers(0, 2), "dtype": st.sampled_from([torch.float32, torch.float64]),
                                  "special": st.sampled_from([None, *SPECIALS])})


def _operand(op: dk.HVOOperator, width: int, spec: dict, g: torch.Generator) -> torch.Tensor:
    n, lead = op.dims.tokens, (op.dims.batch,) if op.dims.batched else ()
    if spec["form"] == "matrix":
        x = torch.randn(*lead, n, width, generator=g, dtype=torch.float64)
    elif spec["form"] == "columns":
        x = torch.randn(*lead, spec["k"], n * width, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(*lead, n * width, generator=g, dtype=torch.float64)
    if spec["special"] is not None and x.numel():
        x.view(-1)[0] = spec["special"]
    return x.to(spec["dtype"])


def _as_flat(op: dk.HVOOperator, x: torch.Tensor, width: int, matrix: bool) -> torch.Tensor:
    """x' (B, K, N·width) in the operator's layout from what was passed."""
    x = x if op.dims.batched else x.unsqueeze(0)
    if matrix:
        x = (x if op.layout == "token" else x.transpose(-1, -2)).reshape(*x.shape[:-2], op.dims.tokens * width)
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), op.dims.tokens * width)


@given(lay=layers(dtypes=(torch.float32, torch.float64)), layout=st.sampled_from(["token", "feature"]),
       x_spec=_x_strategy("m_in"), y_spec=_x_strategy("m_out"), seed=st.integers(0, 2 ** 16))
def test_operator_products_equal_dense(lay, layout, x_spec, y_spec, seed):
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=lay["num_kv_heads"], layout=layout,
                        num_heads=lay["heads"])
    absop = dk.HVOOperator(lay["attn"].double().abs(), lay["w_v"].double().abs(), lay["w_o"].double().abs(),
                           num_kv_heads=lay["num_kv_heads"], layout=layout)
    g = torch.Generator().manual_seed(seed)
    dense, _ = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], lay["num_kv_heads"], layout, torch.float64)
    dense = dense if op.dims.batched else dense[None]
    d = op.dims
    k = d.head_dim * d.heads + d.tokens + d.m_in + d.m_out + 2  # longest chain of sums in a product
    for method, width, out_width, spec, mat in (("matvec", d.m_in, d.m_out, x_spec, dense),
                                                ("rmatvec", d.m_out, d.m_in, y_spec, dense.mT)):
        x = _operand(op, width, spec, g)
        matrix = spec["form"] == "matrix" and x.shape[-1] != d.tokens * width
        got = getattr(op, method)(x)
        assert got.dtype == torch.promote_types(x.dtype, lay["attn"].dtype)
        flat = _as_flat(op, x.double(), width, matrix)
        expected = flat @ mat.mT  # (B, K, rows)
        magnitude = _as_flat(op, getattr(absop, method)(x.double().abs()), out_width, matrix)
        got_flat = _as_flat(op, got, out_width, matrix)
        u = ROUNDOFF[got.dtype]
        assert_ieee_close(got_flat, expected, 2 * k * u * magnitude + torch.finfo(got.dtype).tiny, exact_nan=False,
                          what=method)
    if op.dims.tokens * d.m_in:
        cols = torch.randn(*((d.batch,) if d.batched else ()), d.tokens * d.m_in, 2, generator=g,
                           dtype=lay["attn"].dtype)
        torch.testing.assert_close(op.matmat(cols), op.matvec(cols.mT).mT, rtol=0, atol=0, equal_nan=True)


@given(lay=layers(dtypes=(torch.float32, torch.float64)), layout=st.sampled_from(["token", "feature"]), data=st.data())
def test_operator_parts_equal_dense(lay, layout, data):
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=lay["num_kv_heads"], layout=layout)
    d = op.dims
    acc = reference.compute_dtype(lay["attn"].dtype)
    token64, _ = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], d.kv_heads, "token", torch.float64)
    if not d.batched:
        token64 = token64[None]
    unbatch = (lambda t: t) if d.batched else (lambda t: t[0])

    n, m = data.draw(st.integers(-d.tokens, d.tokens - 1)), data.draw(st.integers(-d.tokens, d.tokens - 1))
    token_acc, token_mag = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], d.kv_heads, "token", acc)
    as_blocks = lambda w: w.reshape(d.batch, d.tokens, d.m_out, d.tokens, d.m_in)  # noqa: E731
    block, block_mag = as_blocks(token_acc)[:, n, :, m, :], as_blocks(token_mag)[:, n, :, m, :]
    assert_ieee_close(op.block(n, m), unbatch(block), unbatch(materialise_bound(block, block_mag, d.heads,
                                                                                 lay["attn"].dtype)), what="block")
    blocks = as_blocks(token64)

    # Block norms: squared norms within the error of ||C α||² (C from the Gram matrix, rounded to acc).
    norms64 = torch.linalg.vector_norm(blocks, dim=(2, 4))  # (B, N, N)
    ov64 = reference.ov_circuits(lay["w_v"].double(), lay["w_o"].double(), d.heads, d.kv_heads)
    tr_gram = ov64.square().sum() if ov64.isfinite().all() else torch.tensor(0.0, dtype=torch.float64)
    alpha_sq = op.source.dense().double().square().sum(1)  # (B, N, N)
    sq_bound = 4 * d.heads * (d.heads + 2 + d.m_in * d.m_out) * ROUNDOFF[acc] * tr_gram * alpha_sq
    got_norms = op.block_norms()
    assert got_norms.shape == unbatch(norms64).shape
    assert_ieee_close(got_norms.double().square(), unbatch(norms64.square()), unbatch(sq_bound) + 1e-300,
                      what="block_norms")
    grid = data.draw(st.sampled_from([None, 1, (1, d.tokens), d.tokens]))
    if grid is not None:
        r, c = (grid, grid) if isinstance(grid, int) else grid
        coarse = op.block_norms(grid=grid)
        assert coarse.shape == (*((d.batch,) if d.batched else ()), r, c)
        # super-block (R, C) holds rows n with n·R // N = R's index (columns alike): sums of squared norms
        row_of, col_of = torch.arange(d.tokens) * r // d.tokens, torch.arange(d.tokens) * c // d.tokens
        member = (row_of[:, None, None, None] == torch.arange(r)[None, None, :, None]) & \
                 (col_of[None, :, None, None] == torch.arange(c)[None, None, None, :])  # (N, N, R, C)
        in_super = lambda t: torch.where(member, t[..., None, None], 0.0).sum((1, 2))  # noqa: E731 (not 0 · NaN)
        expected_sq, bound_sq = in_super(norms64.square()), in_super(sq_bound)
        assert_ieee_close(coarse.double().square(), unbatch(expected_sq), unbatch(bound_sq) + 1e-300,
                          what=f"block_norms(grid={grid})")
    fro = torch.linalg.vector_norm(token64, dim=(-2, -1))
    assert_ieee_close(op.frobenius_norm().double().square(), unbatch(fro.square()),
                      unbatch(sq_bound.sum((-1, -2))) + 1e-300, what="frobenius_norm")

    if d.m_in == d.m_out:
        tr = token64.diagonal(dim1=-2, dim2=-1).sum(-1)
        absop = dk.HVOOperator(lay["attn"].double().abs(), lay["w_v"].double().abs(), lay["w_o"].double().abs(),
                               num_kv_heads=d.kv_heads)
        k = d.head_dim * d.heads + d.tokens * d.m_in + d.heads
        assert_ieee_close(op.trace(), unbatch(tr), 2 * k * 2.0 ** -53 * absop.trace().double(),
                          what="trace")

    if d.m_in and d.m_out and d.batch:
        seed, batch = data.draw(st.integers(0, 100)), data.draw(st.integers(-d.batch, d.batch - 1))
        threshold = data.draw(st.sampled_from([0.0, 0.1, 1.0]))
        est = op.fraction_above(threshold, samples=64, seed=seed, batch=batch)
        g = torch.Generator().manual_seed(seed)
        idx = [torch.randint(0, size, (64,), generator=g) for size in (d.tokens, d.m_out, d.tokens, d.m_in)]
        values = blocks[batch % d.batch][idx[0], idx[1], idx[2], idx[3]]
        if values.isnan().any():  # a sampled NaN entry makes the estimate NaN (never counted as "not above")
            assert math.isnan(est.fraction) and math.isnan(est.low) and math.isnan(est.high)
            return
        near = ((values.abs() - threshold).abs() <= 1e-5 * (1 + values.abs())).sum().item()  # float32 rounding
        hits = (values.abs() > threshold).sum().item()
        assert abs(est.fraction * 64 - hits) <= near and 0 <= est.low <= est.fraction <= est.high <= 1


@given(lay=layers(dtypes=(torch.float32, torch.float64)), layout=st.sampled_from(["token", "feature"]), data=st.data())
def test_operator_tile_equals_dense(lay, layout, data):
    """HVOOperator.tile (the "auto" kernel: cpp on the CPU) on a random rectangle, negative starts included."""
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=lay["num_kv_heads"], layout=layout)
    rows, cols = op.shape[-2:]
    if not (rows and cols):
        with pytest.raises(ValueError, match="selects no entries"):
            op.tile(slice(0, rows), slice(0, cols))
        return
    dtype = data.draw(st.sampled_from([None, "float32", torch.float64, torch.bfloat16]))
    out_dtype = dk._validation.as_dtype(dtype) or lay["attn"].dtype
    exact, magnitude = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], op.dims.kv_heads, layout,
                                       reference.compute_dtype(out_dtype))
    r0, c0 = data.draw(st.integers(-rows, rows - 1)), data.draw(st.integers(-cols, cols - 1))
    r1, c1 = data.draw(st.integers(r0 % rows + 1, rows)), data.draw(st.integers(c0 % cols + 1, cols))
    sr, sc = slice(r0 % rows, r1), slice(c0 % cols, c1)
    got = op.tile(slice(r0, r1), slice(c0, c1), dtype=dtype)
    assert got.dtype == out_dtype
    assert_ieee_close(got, exact[..., sr, sc].to(out_dtype),
                      materialise_bound(exact[..., sr, sc], magnitude[..., sr, sc], op.dims.heads, out_dtype),
                      what="tile")


# Bad arguments: every one a ValueError/TypeError that names it.
BAD_ARGUMENTS = {
    "attn": [torch.rand(3, 3), torch.rand(2, 3, 0), torch.ones(2, 3, 3, dtype=torch.int32), [[1.0]],
             torch.rand(2, 3, 3, dtype=torch.complex64), torch.rand(2, 3, 3).to(torch.float8_e4m3fn),
             torch.rand(0, 3, 3)],
    "w_v": [torch.rand(5), torch.rand(5, 2), torch.ones(4, 2, dtype=torch.int64), "w"],
    "w_o": [torch.rand(2), torch.rand(2, 5), torch.rand(2, 4, dtype=torch.float64).to(torch.float8_e5m2)],
    "num_kv_heads": [0, 3, -1, 1.5, True, "2"],
    "num_heads": [0, 3, 1, 2.0, True],
    "layout": ["row", None, 1],
    "backend": ["cuda", "", None],
    "dtype": ["float31", "int32", torch.int64, torch.complex64, 32, "torch.float8_e4m3fn"],
    "out": [torch.empty(6, 5), torch.empty(6, 6, dtype=torch.float64).t(), "buffer", torch.empty(6, 6, device="meta")],
}


@given(name=st.sampled_from(sorted(BAD_ARGUMENTS)), data=st.data())
def test_bad_arguments_name_the_argument(name, data):
    value = data.draw(st.sampled_from(BAD_ARGUMENTS[name]))
    args = dict(attn=torch.rand(2, 3, 3), w_v=torch.rand(4, 2), w_o=torch.rand(2, 4))
    kwargs = dict(num_kv_heads=None, num_heads=None, layout="token", backend="auto", dtype=None, out=None)
    (args if name in args else kwargs)[name] = value
    with pytest.raises((ValueError, TypeError)) as info:
        dk.hvo_matrix(args["attn"], args["w_v"], args["w_o"], **kwargs)
    message = str(info.value)
    names = {name, "num_kv_heads" if name == "num_heads" else name, "attn" if name == "num_heads" else name}
    assert any(n in message for n in names), message


OPERATOR_BAD_CALLS = [
    ("x", lambda op: op.matvec(torch.tensor(1.0))),
    ("x", lambda op: op.matvec(torch.rand(7))),
    ("x", lambda op: op.matvec(torch.ones(6, dtype=torch.int64))),
    ("x", lambda op: op.matvec(torch.rand(6, dtype=torch.complex64))),
    ("x", lambda op: op.matvec(torch.rand(6, device="meta"))),
    ("x", lambda op: op.matvec([0.0] * 6)),
    ("y", lambda op: op.rmatvec(torch.tensor(1.0))),
    ("y", lambda op: op.rmatvec(torch.rand(5))),
    ("X", lambda op: op.matmat(torch.rand(6))),
    ("n", lambda op: op.block(True, 1)),
    ("m", lambda op: op.block(1, 1.0)),
    ("n", lambda op: op.block(3, 0)),
    ("m", lambda op: op.block(0, -4)),
    ("grid", lambda op: op.block_norms(grid=4)),
    ("grid", lambda op: op.block_norms(grid=(1, 2, 3))),
    ("grid", lambda op: op.block_norms(grid="2")),
    ("rows", lambda op: op.tile(slice(0, 6, 2), slice(0, 6))),
    ("cols", lambda op: op.tile(slice(0, 6), 3)),
    ("dtype", lambda op: op.tile(slice(0, 6), slice(0, 6), dtype="int8")),
    ("samples", lambda op: op.fraction_above(0.1, samples=0)),
    ("threshold", lambda op: op.fraction_above("0.1")),
    ("confidence", lambda op: op.fraction_above(0.1, confidence=1.0)),
    ("batch", lambda op: op.fraction_above(0.1, batch=1)),
]


@pytest.mark.parametrize("name,call", OPERATOR_BAD_CALLS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPERATOR_BAD_CALLS)])
def test_operator_bad_arguments_name_the_argument(name, call):
    op = dk.HVOOperator(torch.rand(2, 3, 3), torch.rand(4, 2), torch.rand(2, 4))  # N=3, M_in=M_out=2
    with pytest.raises((ValueError, TypeError)) as info:
        call(op)
    assert f"{name}" in str(info.value), str(info.value)


# Extreme magnitudes: one factor scaled to tiny (1e-30), subnormal in float32 (2**-130) or huge (1e30)
# values, whole rows of A zero, on top of the NaN/Inf of `layers`. Huge float32 factors are left to the
# documented overflow-order caveat (docs/input-handling.md), as are float32 norms whose squares under- or
# overflow float32 (below ~1e-19, above ~1.8e19).
SCALES = (1.0, 1e-30, 2.0 ** -130, 1e30)


@settings(max_examples=150, deadline=None)
@given(lay=layers(max_batch=2, max_tokens=3, max_width=3), layout=st.sampled_from(["token", "feature"]),
       scale=st.sampled_from(SCALES), factor=st.sampled_from(["attn", "w_v", "w_o"]), zero_row=st.booleans(),
       data=st.data())
def test_operator_methods_equal_dense_at_extremes(lay, layout, scale, factor, zero_row, data):
    dtype = lay["attn"].dtype
    if dtype == torch.float32 and scale > 1:
        scale = 1e15  # products stay within float32's range
    lay = dict(lay, **{factor: lay[factor] * scale})
    if zero_row and lay["attn"].shape[-1]:
        lay["attn"] = lay["attn"].clone()
        lay["attn"][..., -1, :] = 0  # a query that attends nothing
    kv, h = lay["num_kv_heads"], lay["heads"]
    op = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv, layout=layout)
    d = op.dims
    exact, magnitude = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], kv, layout, reference.compute_dtype(dtype))
    bound = materialise_bound(exact, magnitude, h, dtype)
    for cap in dk.cpp.supported_capabilities() if "cpp" in dk.available_backends("cpu") else []:
        with dk.cpp.using_capability(cap):
            got = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv, layout=layout, backend="cpp")
        assert_ieee_close(got, exact.to(dtype), bound, what=f"hvo_matrix(cpp, {cap})")
    assert_ieee_close(op.to_dense(), exact.to(dtype), bound, what="to_dense")
    if not (d.batch and d.tokens and d.m_in and d.m_out):
        return
    rows, cols = op.shape[-2:]
    r0, c0 = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    assert_ieee_close(op.tile(slice(r0, rows), slice(c0, cols)), exact[..., r0:, c0:].to(dtype),
                      bound[..., r0:, c0:], what="tile")
    dense64, _ = dense_reference(lay["attn"], lay["w_v"], lay["w_o"], kv, "token", torch.float64)
    blocks = (dense64 if d.batched else dense64[None]).reshape(d.batch, d.tokens, d.m_out, d.tokens, d.m_in)
    unbatch = (lambda t: t) if d.batched else (lambda t: t[0])  # noqa: E731
    x = torch.randn(d.batch, d.tokens, d.m_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(dtype).double()
    expected = torch.linalg.vector_norm(torch.einsum("bncma,bma->bnmc", blocks, x), dim=-1)
    norms = torch.linalg.vector_norm(blocks, dim=(2, 4))
    # the Gram forms sum h² products of the heads' own terms: their error is on the squares, relative to
    # (Σ_i |A_i[n, m]| ||OV_i x_m||)² and (Σ_i |A_i[n, m]| ||OV_i||_F)², however much the heads cancel
    # |Wo_i| |Wv_i|: OV_i's own entries are sums of d products that may cancel
    ov = reference.ov_circuits(lay["w_v"].double().abs(), lay["w_o"].double().abs(), h, kv)  # (h, M_out, M_in)
    alpha = (lay["attn"] if d.batched else lay["attn"][None]).double().abs()  # (B, h, N, N)
    head_terms = torch.einsum("ica,bma->bimc", ov.abs(), x.abs()).norm(dim=-1)  # (B, h, N)
    terms = torch.einsum("binm,bim->bnm", alpha, head_terms)
    block_terms = torch.einsum("binm,i->bnm", alpha, ov.square().sum((1, 2)).sqrt())
    u = ROUNDOFF[dtype]
    if dtype == torch.float64 or 1e-19 < scale < 1e19:  # float32 squares in range (see above)
        k = d.heads * (d.heads + 2 + d.head_dim + d.m_in * d.m_out + d.tokens)
        got = op.contributions(unbatch(x).to(dtype)).double()
        assert_ieee_close(got.square(), unbatch(expected.square()), unbatch(4 * k * u * terms.square()) + 1e-300,
                          exact_nan=False, what="contributions")
        got = op.block_norms().double()
        assert_ieee_close(got.square(), unbatch(norms.square()), unbatch(4 * k * u * block_terms.square()) + 1e-300,
                          what="block_norms")
    if not d.batched and not op.to_dense().isfinite().all():
        assert math.isnan(op.spectral_norm())
    elif not d.batched:
        norm2 = torch.linalg.matrix_norm(dense64, 2).item()
        # each of the matrix-free products' operations rounds a subnormal result by up to u · tiny
        subnormal_ulps = 4 * (d.heads * d.head_dim + d.tokens + d.m_in + d.m_out) * torch.finfo(dtype).tiny * u
        assert op.spectral_norm() == pytest.approx(norm2, rel=1e-3 if dtype == torch.float32 else 1e-6,
                                                   abs=subnormal_ulps)


@settings(max_examples=150, deadline=None)
@given(lay=qk_layers(), layout=st.sampled_from(["token", "feature"]))
def test_from_qk_methods_equal_dense_of_softmax(lay, layout):
    """from_qk: A against the float64 softmax of the same q and k, and every method against the dense W'
    of that A, NaN and Inf included (masked pairs stay exact zeros; rows with no key are zero)."""
    q, k, opts = lay["q"], lay["k"], lay["options"]
    op = dk.HVOOperator.from_qk(q, k, lay["w_v"], lay["w_o"], num_kv_heads=lay["num_kv_heads"], layout=layout, **opts)
    d, dtype = op.dims, q.dtype
    batch4 = (lambda t: t) if d.batched else (lambda t: t[None])  # noqa: E731
    mask = opts.get("attention_mask")
    attn64 = softmax_attention(batch4(q), batch4(k), **dict(opts, attention_mask=None if mask is None
                                                              else mask.reshape(d.batch, d.tokens)))
    u = ROUNDOFF[dtype]
    # exp and the row sum of N terms, on logits of up to hd products: a few ulps of each probability
    assert_ieee_close(batch4(op.attn), attn64, 8 * (d.tokens + d.head_dim + 4) * u * attn64.abs()
                      + torch.finfo(dtype).tiny, what="A")
    attn = batch4(op.attn)
    exact, magnitude = dense_reference(attn, lay["w_v"], lay["w_o"], d.kv_heads, layout, reference.compute_dtype(dtype))
    bound = materialise_bound(exact, magnitude, d.heads, dtype)
    unbatch = (lambda t: t) if d.batched else (lambda t: t[0])  # noqa: E731
    assert_ieee_close(op.to_dense(), unbatch(exact.to(dtype)), unbatch(bound), what="to_dense")
    rows, cols = op.shape[-2:]
    assert_ieee_close(op.tile(slice(rows // 2, rows), slice(0, cols)), unbatch(exact[:, rows // 2:].to(dtype)),
                      unbatch(bound[:, rows // 2:]), what="tile")
    # the methods recompute A from q and k (the fused C++ passes in their own order): within the rounding of A
    # (c·u of each probability) and of the Gram form, on the squares of the norms
    c = 8 * (d.tokens + d.head_dim + 4) + 4 * d.heads * (d.heads + 2 + d.head_dim + d.m_in * d.m_out)
    token, token_mag = dense_reference(attn, lay["w_v"], lay["w_o"], d.kv_heads, "token", torch.float64)
    blocks = token.reshape(d.batch, d.tokens, d.m_out, d.tokens, d.m_in)
    ov = reference.ov_circuits(lay["w_v"].double().abs(), lay["w_o"].double().abs(), d.heads, d.kv_heads)  # |Wo||Wv|
    terms_sq = torch.einsum("binm,i->bnm", attn.double().abs(), ov.square().sum((1, 2)).sqrt()).square()
    norms_sq = blocks.square().sum((2, 4))
    for name, got, expected, scale in (
            ("block_norms", op.block_norms(), norms_sq, terms_sq),
            ("block_norms(grid=(1, N))", op.block_norms(grid=(1, d.tokens)), norms_sq.sum(1, keepdim=True),
             terms_sq.sum(1, keepdim=True)),
            ("frobenius_norm", op.frobenius_norm(), norms_sq.sum((1, 2)), terms_sq.sum((1, 2)))):
        assert_ieee_close(got.double().square(), unbatch(expected), unbatch(c * u * scale) + 1e-300, what=name)
    block_mag = token_mag.reshape(blocks.shape)[:, -1, :, 0, :]
    assert_ieee_close(op.block(-1, 0), unbatch(blocks[:, -1, :, 0, :]), unbatch(c * u * block_mag) + 1e-300,
                      what="block")
    if d.m_in == d.m_out:
        tr = token.diagonal(dim1=-2, dim2=-1).sum(-1)
        assert_ieee_close(op.trace(), unbatch(tr), unbatch(c * u * token_mag.diagonal(dim1=-2, dim2=-1).sum(-1))
                          + 1e-300, what="trace")
    x = torch.randn(d.batch, d.tokens, d.m_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.to(dtype).double()
    flat = x.reshape(d.batch, -1)
    k_sum = d.head_dim * d.heads + d.tokens + d.m_in + d.m_out  # the products' chains of sums
    expected = torch.einsum("brc,bc->br", token, flat).reshape(x.shape[0], d.tokens, -1)
    bound = (c + 2 * k_sum) * u * torch.einsum("brc,bc->br", token_mag, flat.abs()).reshape(x.shape[0], d.tokens, -1)
    assert_ieee_close(op.matvec(unbatch(x).to(dtype)), unbatch(expected), unbatch(bound) + torch.finfo(dtype).tiny,
                      exact_nan=False, what="matvec")
    y = torch.einsum("bncma,bma->bnmc", blocks, x)
    head_terms = torch.einsum("ica,bma->bimc", ov.abs(), x.abs()).norm(dim=-1)  # ||OV_i x_m|| bounds, (B, h, N)
    terms = torch.einsum("binm,bim->bnm", attn.double().abs(), head_terms)
    assert_ieee_close(op.contributions(unbatch(x).to(dtype)).double().square(), unbatch(y.square().sum(-1)),
                      unbatch(c * u * terms.square()) + 1e-300, exact_nan=False, what="contributions")

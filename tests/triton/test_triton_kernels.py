"""The Triton kernels against the reference: both layouts, GQA, batches, every output dtype, ragged
tiles, offsets beyond 2^31 and NaN. In Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
in conftest.py), or compiled on a CUDA GPU when run with TRITON_INTERPRET=0."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import backends, reference

from conftest import assert_close_to_reference, random_layer

pytest.importorskip("triton", reason="the Triton backend needs triton: pip install triton")
DEVICE = "cpu" if backends.triton_interpreter() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set in conftest) or a CUDA GPU")

TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bfloat16 output takes TF32 tensor-core dots (duat_kernels/triton/__init__.py): on a GPU each operand
# is rounded to 11 significant bits. The interpreter computes them in float32.
TF32_ROUNDOFF = 2.0 ** -11


def operand_roundoff(dtype: torch.dtype) -> float:
    return TF32_ROUNDOFF if DEVICE == "cuda" and dtype == torch.bfloat16 else 0.0


def on_device(lay: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in lay.items()}


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,tokens,m_in,m_out", [
    (1, 1, 1, 3, 5, 4),  # h = 1 padded to K = 16; every tile edge ragged
    (2, 6, 2, 7, 37, 5),  # GQA, batch, T = 37 crosses the 32-wide t-blocks
    (1, 20, 4, 5, 9, 3),  # h = 20 padded to K = 32
])
def test_matches_reference(layout, dtype, batch, heads, kv_heads, tokens, m_in, m_out):
    lay = random_layer(batch, heads, kv_heads, tokens, head_dim=2, m_in=m_in, m_out=m_out, causal=True, seed=heads)
    dev = on_device(lay)
    got = dk.hvo_matrix(dev["attn"], dev["w_v"], dev["w_o"], num_kv_heads=kv_heads, layout=layout,
                        backend="triton", dtype=dtype)
    assert got.device.type == DEVICE
    assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], kv_heads, layout, operand_roundoff(dtype))


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("tokens,keys", [(5, 37), (19, 3)])  # cross-attention: N queries over N_k != N keys
def test_rectangular_attention_matches_reference(layout, dtype, tokens, keys):
    lay = random_layer(2, 6, 2, tokens=tokens, head_dim=2, m_in=7, m_out=5, seed=keys, keys=keys)
    dev = on_device(lay)
    got = dk.hvo_matrix(dev["attn"], dev["w_v"], dev["w_o"], num_kv_heads=2, layout=layout, backend="triton",
                        dtype=dtype)
    assert got.shape == (2, tokens * 5, keys * 7)
    assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], 2, layout, operand_roundoff(dtype))


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_causal_gqa_batch_and_a_ragged_tile(layout, dtype):
    lay = random_layer(2, 6, 2, tokens=7, head_dim=2, m_in=37, m_out=5, causal=True, seed=8)
    dev = on_device(lay)
    got = dk.hvo_matrix(dev["attn"], dev["w_v"], dev["w_o"], num_kv_heads=2, layout=layout, backend="triton",
                        dtype=dtype)
    assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], 2, layout, operand_roundoff(dtype))
    # a tile with ragged edges on both sides is the same slice of the whole matrix (tl.dot may sum a
    # patch in another order, so to the output's rounding)
    ov = reference.ov_circuits(dev["w_v"], dev["w_o"], 6, 2)
    left, right = backends.kron_factors(dev["attn"][1], ov, layout)
    kernel = backends.tile_kernel("triton")
    full = kernel(left, right, torch.empty(35, 259, dtype=dtype, device=DEVICE))
    tile = kernel(left, right, torch.empty(25, 171, dtype=dtype, device=DEVICE), 4, 9)
    torch.testing.assert_close(tile, full[4:29, 9:180])


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_nan_and_inf_propagate(layout, dtype):
    # A patch is stored as zeros without the dot when a factor slice is all zero, but only while the
    # other one is finite: 0 · Inf must stay NaN, as in the reference (row 2 of A is zero: a token
    # that attends nothing; w_v's Inf reaches a column of every OV_i of its group).
    lay = random_layer(1, 4, 2, tokens=6, head_dim=2, m_in=20, m_out=3, causal=True, batched=False, seed=3)
    lay["attn"][1, 4, 2] = float("nan")
    lay["attn"][:, 2, :] = 0.0
    lay["w_v"][0, 5] = float("inf")
    dev = on_device(lay)
    got = dk.hvo_matrix(dev["attn"], dev["w_v"], dev["w_o"], num_kv_heads=2, layout=layout, backend="triton",
                        dtype=dtype).cpu()
    expected = dk.hvo_matrix(lay["attn"].double(), lay["w_v"].double(), lay["w_o"].double(), num_kv_heads=2,
                             layout=layout, backend="reference")
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.isinf(), expected.isinf())
    assert got.isnan().any()


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_out_buffer_and_unbatched(layout):
    lay = random_layer(1, 4, 2, tokens=5, m_in=6, m_out=3, batched=False)
    dev = on_device(lay)
    out = torch.full((15, 30), float("nan"), device=DEVICE)
    assert dk.hvo_matrix(dev["attn"], dev["w_v"], dev["w_o"], num_kv_heads=2, layout=layout, backend="triton",
                         out=out) is out
    assert_close_to_reference(out, lay["attn"], lay["w_v"], lay["w_o"], 2, layout)


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_ragged_tiles_equal_reference_slices(layout):
    lay = random_layer(1, 3, tokens=6, head_dim=2, m_in=21, m_out=4, causal=True, batched=False, seed=2)
    ov = reference.ov_circuits(lay["w_v"], lay["w_o"], 3, 3)
    left, right = backends.kron_factors(lay["attn"], ov, layout)
    full = reference.hvo_matrix(lay["attn"][None], ov, layout)[0]
    kernel = backends.tile_kernel("triton")
    for r0, c0, rows, cols in [(0, 0, 24, 126), (5, 17, 7, 50), (23, 125, 1, 1), (3, 20, 19, 3)]:
        tile = kernel(left.to(DEVICE), right.to(DEVICE), torch.empty(rows, cols, device=DEVICE), r0, c0)
        torch.testing.assert_close(tile.cpu(), full[r0:r0 + rows, c0:c0 + cols], rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_tile_beyond_int32_offsets(backend):
    # N = 64, M = 768: W' is 49152 x 49152 (2.4e9 entries), so the corner tile starts past 2^31
    # entries into the matrix; only the tile and the small factors are allocated.
    device = DEVICE if backend == "triton" else "cpu"
    if backend not in dk.available_backends(device):
        pytest.skip(f"backend {backend} unavailable on {device}")
    lay = random_layer(1, 2, tokens=64, head_dim=4, m_in=768, m_out=768, causal=False, batched=False, seed=5)
    ov = reference.ov_circuits(lay["w_v"], lay["w_o"], 2, 2)
    n, m = 64, 768
    r0, c0, rows, cols = n * m - 17, n * m - 45, 17, 45
    assert r0 * (n * m) + c0 > 2 ** 31
    tile = backends.tile_kernel(backend)(lay["attn"].to(device), ov.to(device), torch.empty(rows, cols, device=device),
                                         r0, c0).cpu()
    # the reference entry by entry: W'[(n, c), (m, a)] = Σ_i A_i[n, m] OV_i[c, a]
    rr, cc = torch.arange(r0, r0 + rows)[:, None], torch.arange(c0, c0 + cols)[None, :]
    expected = torch.einsum("irc,irc->rc", lay["attn"][:, rr // m, cc // m], ov[:, rr % m, cc % m])
    torch.testing.assert_close(tile, expected, rtol=1.3e-6, atol=1e-6)


def test_float64_is_refused():
    lay = on_device(random_layer(1, 2, tokens=3, batched=False))
    with pytest.raises(TypeError, match="backend='triton' writes torch.float32, torch.float16, torch.bfloat16"):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], backend="triton", dtype=torch.float64)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreter", lambda: False)
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors; on CPU tensors it runs only in"):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], backend="triton")
    assert "triton" not in dk.available_backends("cpu")


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_operator_on_the_device_matches_the_cpu(layout):
    # The matrix-free operator on the kernels' device: products, a tile, block norms, and the q/k
    # form (from_qk), against the same operator on the CPU.
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 9, 5, generator=g), torch.randn(2, 2, 9, 5, generator=g)
    w_v, w_o = torch.randn(10, 13, generator=g) / 4, torch.randn(7, 20, generator=g) / 4
    x = torch.randn(2, 9 * 13, generator=g)
    for make in (lambda *t, **kw: dk.HVOOperator.from_qk(*t, causal=True, **kw),
                 lambda q_, k_, *w, **kw: dk.HVOOperator(torch.softmax(q_ @ k_.repeat_interleave(2, 1).mT, -1), *w,
                                                         num_kv_heads=2, **kw)):
        cpu = make(q, k, w_v, w_o, layout=layout)
        dev = make(q.to(DEVICE), k.to(DEVICE), w_v.to(DEVICE), w_o.to(DEVICE), layout=layout)
        torch.testing.assert_close(dev.matvec(x.to(DEVICE)).cpu(), cpu.matvec(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dev.tile(slice(5, 40), slice(3, 70)).cpu(), cpu.tile(slice(5, 40), slice(3, 70)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dev.block_norms().cpu(), cpu.block_norms(), rtol=1e-5, atol=1e-5)

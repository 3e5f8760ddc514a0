"""The Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) against the
reference: both layouts, GQA, batches, every output dtype, ragged tiles and offsets beyond 2^31."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import backends, reference

from conftest import assert_close_to_reference, random_layer

pytest.importorskip("triton", reason="the Triton backend needs triton: pip install triton")
pytestmark = pytest.mark.skipif(not backends.triton_interpreter(), reason="needs TRITON_INTERPRET=1 (set in conftest)")

TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("layout", ["token", "feature"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,tokens,m_in,m_out", [
    (1, 1, 1, 3, 5, 4),  # h = 1 padded to K = 16; every tile edge ragged
    (2, 6, 2, 7, 37, 5),  # GQA, batch, T = 37 crosses the 32-wide t-blocks
    (1, 20, 4, 5, 9, 3),  # h = 20 padded to K = 32
])
def test_matches_reference(layout, dtype, batch, heads, kv_heads, tokens, m_in, m_out):
    lay = random_layer(batch, heads, kv_heads, tokens, head_dim=2, m_in=m_in, m_out=m_out, causal=True, seed=heads)
    got = dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=kv_heads, layout=layout,
                        backend="triton", dtype=dtype)
    assert_close_to_reference(got, lay["attn"], lay["w_v"], lay["w_o"], kv_heads, layout)


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_out_buffer_and_unbatched(layout):
    lay = random_layer(1, 4, 2, tokens=5, m_in=6, m_out=3, batched=False)
    out = torch.full((15, 30), float("nan"))
    assert dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2, layout=layout, backend="triton",
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
        tile = kernel(left, right, torch.empty(rows, cols), r0, c0)
        torch.testing.assert_close(tile, full[r0:r0 + rows, c0:c0 + cols], rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_tile_beyond_int32_offsets(backend):
    # N = 64, M = 768: W' is 49152 x 49152 (2.4e9 entries), so the corner tile starts past 2^31
    # entries into the matrix; only the tile and the small factors are allocated.
    if backend not in dk.available_backends("cpu"):
        pytest.skip(f"backend {backend} unavailable")
    lay = random_layer(1, 2, tokens=64, head_dim=4, m_in=768, m_out=768, causal=False, batched=False, seed=5)
    ov = reference.ov_circuits(lay["w_v"], lay["w_o"], 2, 2)
    n, m = 64, 768
    r0, c0, rows, cols = n * m - 17, n * m - 45, 17, 45
    assert r0 * (n * m) + c0 > 2 ** 31
    tile = backends.tile_kernel(backend)(lay["attn"], ov, torch.empty(rows, cols), r0, c0)
    # the reference entry by entry: W'[(n, c), (m, a)] = Σ_i A_i[n, m] OV_i[c, a]
    rr, cc = torch.arange(r0, r0 + rows)[:, None], torch.arange(c0, c0 + cols)[None, :]
    expected = torch.einsum("irc,irc->rc", lay["attn"][:, rr // m, cc // m], ov[:, rr % m, cc % m])
    torch.testing.assert_close(tile, expected, rtol=1.3e-6, atol=1e-6)


def test_float64_is_refused():
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(TypeError, match="backend='triton' writes torch.float32, torch.float16, torch.bfloat16"):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], backend="triton", dtype=torch.float64)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreter", lambda: False)
    lay = random_layer(1, 2, tokens=3, batched=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors; on CPU tensors it runs only in"):
        dk.hvo_matrix(lay["attn"], lay["w_v"], lay["w_o"], backend="triton")
    assert "triton" not in dk.available_backends("cpu")

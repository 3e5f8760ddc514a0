"""The fused q/k Triton pass against from_qk's block norms (torch/C++): in Triton's interpreter on CPU
tensors, or compiled on a CUDA GPU when run with TRITON_INTERPRET=0."""

from __future__ import annotations

import pytest
import torch

import duat_kernels as dk
from duat_kernels import backends
from duat_kernels.linalg import norms

pytest.importorskip("triton", reason="the Triton backend needs triton: pip install triton")
DEVICE = "cpu" if backends.triton_interpreter() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set in conftest) or a CUDA GPU")


@pytest.mark.parametrize("grid", [(4, 3), (2, 2), (1, 1)])  # finer than a tile; a tile in <= 2 x 2 super-blocks
@pytest.mark.parametrize("causal,padded,softcap,window", [
    (True, True, None, None), (False, True, None, None), (True, False, 3.0, None), (False, False, None, 5)])
def test_block_norms_match_from_qk(causal, padded, softcap, window, grid):
    from duat_kernels.triton.attention_norms import block_norms_qk

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n, d, m = 2, 6, 2, 21, 8, 12
    q, k = torch.randn(batch, heads, n, d, generator=g), torch.randn(batch, kv_heads, n, d, generator=g)
    w_v, w_o = torch.randn(kv_heads * d, m, generator=g), torch.randn(m, heads * d, generator=g)
    mask = torch.ones(batch, n, dtype=torch.bool)
    if padded:
        mask[1, :5] = False
        mask[0, -3:] = False
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=causal, attention_mask=mask if padded else None,
                                softcap=softcap, sliding_window=window)
    c = norms.gram_factor(w_v, w_o, heads, kv_heads).float().to(DEVICE)
    qd, kd, maskd = q.to(DEVICE), k.to(DEVICE), mask.to(DEVICE)
    got = block_norms_qk(qd, kd, c, norms._bins(n, grid[0], qd.device), norms._bins(n, grid[1], qd.device), grid,
                         causal=causal, key_mask=maskd if padded else None, scale=d ** -0.5, softcap=softcap,
                         window=window)
    torch.testing.assert_close(got.cpu(), op.block_norms(grid=grid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid", [(3, 5), (2, 2), (1, 1)])
@pytest.mark.parametrize("n,n_k", [(21, 37), (33, 7)])  # N_k over and under a tile, N over two row tiles
@pytest.mark.parametrize("padded,softcap", [(True, None), (False, 3.0)])
def test_cross_attention_block_norms_match_the_dense_attention(n, n_k, padded, softcap, grid):
    """k of N_k != N keys (cross-attention): the key loop, key mask and column bins run over N_k; against the
    stored dense A of the same logits (float64), batch row 1 attending no key."""
    from duat_kernels.triton.attention_norms import block_norms_qk

    g = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, d, m = 2, 6, 2, 8, 12
    q, k = torch.randn(batch, heads, n, d, generator=g), torch.randn(batch, kv_heads, n_k, d, generator=g)
    w_v, w_o = torch.randn(kv_heads * d, m, generator=g), torch.randn(m, heads * d, generator=g)
    mask = torch.rand(batch, n_k, generator=g) < 0.5
    mask[0, 0], mask[1] = True, False
    s = (q.double() @ k.double().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)) * d ** -0.5
    s = s if softcap is None else torch.tanh(s / softcap) * softcap
    keep = mask[:, None, None, :] if padded else torch.ones(1, 1, 1, n_k, dtype=torch.bool)
    attn = torch.where(keep & keep.any(-1, keepdim=True), s.masked_fill(~keep, float("-inf")).softmax(-1), 0.0)
    want = dk.HVOOperator(attn, w_v.double(), w_o.double(), num_kv_heads=kv_heads).block_norms(grid=grid)
    c = norms.gram_factor(w_v, w_o, heads, kv_heads).float().to(DEVICE)
    qd, kd = q.to(DEVICE), k.to(DEVICE)
    got = block_norms_qk(qd, kd, c, norms._bins(n, grid[0], qd.device), norms._bins(n_k, grid[1], qd.device), grid,
                         causal=False, key_mask=mask.to(DEVICE) if padded else None, scale=d ** -0.5, softcap=softcap,
                         window=None)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    for opts in (dict(causal=True, window=None), dict(causal=False, window=3)):
        with pytest.raises(ValueError, match=f"causal and window need k of N = {n} keys"):
            block_norms_qk(qd, kd, c, norms._bins(n, 1, qd.device), norms._bins(n_k, 1, qd.device), (1, 1),
                           key_mask=None, scale=1.0, softcap=None, **opts)


def test_tile_shapes_respect_cuda_grid_limits():
    """CUDA launches at most 65535 programs along a grid's second and third axes: beyond 65535 blocks of
    16 rows (N > 1,048,560) only larger tiles launch, and beyond every tile shape block_norms takes its
    torch route (the kernel itself refuses such N in one line)."""
    import triton

    from duat_kernels.triton import attention_norms as an

    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in [(16, 64, 4), (32, 64, 8), (64, 128, 8)]]
    shapes = lambda cs: [(c.kwargs["BM"], c.kwargs["BN"]) for c in cs]
    assert shapes(an._prune_grid_configs(configs, {"N": 65535 * 16}, H_PAD=16)) == [(16, 64), (32, 64)]
    assert shapes(an._prune_grid_configs(configs, {"N": 65535 * 16 + 1}, H_PAD=16)) == [(32, 64)]
    assert shapes(an._prune_grid_configs(configs, {"N": 65535 * 32 + 1}, H_PAD=16)) == [(64, 128)]  # spills, launches
    assert shapes(an._prune_row_stats_configs(configs, {"N": 65535 * 32 + 1})) == [(64, 128)]  # only row blocks count
    limit = an.MAX_TOKENS
    assert norms._triton_launches(limit) and not norms._triton_launches(limit + 1)
    q, bins = torch.zeros(1, 1, limit + 1, 1, device=DEVICE), torch.zeros(limit + 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=f"launches at most {limit} tokens, got N = {limit + 1}"):
        an.block_norms_qk(q, q, torch.ones(1, 1, device=DEVICE), bins, bins, (1, 1), causal=True, key_mask=None,
                          scale=1.0, softcap=None, window=None)


def test_huge_equal_logits_share_the_row():
    """Two keys with the same logit 1.5e8: α = 1/2 each, as from_qk's torch/C++ passes give. The row
    statistics were stored as lse = max + log Σ exp(s - max), which rounds log 2 away in float32 once
    ulp(max) > log 2: α = exp(s - lse) = 1, and every norm came out twice the dense one."""
    from duat_kernels.triton.attention_norms import block_norms_qk

    q, k = torch.tensor([[[[1.5], [-0.25]]]]), torch.full((1, 1, 2, 1), 1e8)
    w_v, w_o = torch.ones(1, 1), torch.ones(1, 1)
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o)
    c = norms.gram_factor(w_v, w_o, 1, 1).float().to(DEVICE)
    bins = norms._bins(2, 2, DEVICE)
    got = block_norms_qk(q.to(DEVICE), k.to(DEVICE), c, bins, bins, (2, 2), causal=False, key_mask=None, scale=1.0,
                         softcap=None, window=None)
    torch.testing.assert_close(got.cpu(), op.block_norms(grid=(2, 2)), rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), torch.full((1, 2, 2), 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(5, 3), (1, 2), (7, 7)])
def test_tiny_probabilities_keep_their_norms(grid):
    """Keys 56 to 62 below the row maximum (probabilities ~1e-25, so ||C α|| ~1e-25): the float32 squares of their
    C α vanished, and super-blocks holding only such keys came out 0 (relative error 1). They are now squared scaled
    by a power of two into a grid of their own."""
    from duat_kernels.triton.attention_norms import block_norms_qk

    g = torch.Generator().manual_seed(1)
    n, h = 40, 3
    gaps = torch.cat([torch.randint(0, 160, (n // 2,), generator=g), torch.randint(896, 992, (n // 2,), generator=g)])
    k = -(gaps / 16 + torch.randint(0, 3, (h, n), generator=g) / 16).reshape(1, h, n, 1)  # exact products with q
    q = torch.ones(1, h, n, 1)
    w_v, w_o = torch.randn(h, 6, generator=g) / 2, torch.randn(6, h, generator=g) / 2
    exact = dk.HVOOperator.from_qk(q.double(), k.double(), w_v.double(), w_o.double(), scale=1.0).block_norms(grid=grid)
    assert (exact < 1e-20).any() and (exact > 1e-3).any()
    c = norms.gram_factor(w_v, w_o, h, h).float().to(DEVICE)
    got = block_norms_qk(q.to(DEVICE), k.to(DEVICE), c, norms._bins(n, grid[0], DEVICE), norms._bins(n, grid[1], DEVICE),
                         grid, causal=False, key_mask=None, scale=1.0, softcap=None, window=None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shift", [30, -30])
def test_scaled_gram_factor_reaches_the_kernel(shift):
    """Weights scaled by 2^±30 scale W' by 2^±60, so every block norm exactly by 2^±60 (still a float32), while
    the Gram factor C, quadratic in W', scales by 2^±120 and the squared norms by 2^±120 more: past float32.
    C is scaled to max|C| in [1, 2) before the pass and the norms scaled back in float64. On CUDA tensors HVOOperator.block_norms(grid) takes the Triton pass; in the
    interpreter (CPU tensors) the C++ one."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 19, 8, generator=g), torch.randn(1, 2, 19, 8, generator=g)
    w_v, w_o = torch.randn(2 * 8, 10, generator=g), torch.randn(10, 4 * 8, generator=g)
    q, k, w_v, w_o = (t.to(DEVICE) for t in (q, k, w_v, w_o))
    plain = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True).block_norms(grid=(3, 5))
    scaled = dk.HVOOperator.from_qk(q, k, w_v * 2.0 ** shift, w_o * 2.0 ** shift, causal=True).block_norms(grid=(3, 5))
    assert scaled.dtype == torch.float32 and int(plain.count_nonzero()) == 11  # causal: 4 super-blocks lie above it
    torch.testing.assert_close(scaled, plain * 2.0 ** (2 * shift), rtol=1e-6, atol=0)

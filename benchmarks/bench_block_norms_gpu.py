"""How fast are the block norms of W' from q and k on a GPU, against what a user would write?

One causal attention layer, N tokens, h = 12, d = 64, M = 768, random q/k, float32, the norms of a
(256, 256) grid of super-blocks (HVOOperator.from_qk(...).block_norms(grid=...)):
  triton         the fused Triton pass (duat_kernels/triton/attention_norms.py): logits twice (row
                 statistics, then α) as three TF32 tensor-core products (about float32 accuracy),
                 ||C α||² per entry and atomic grid sums; A is never written
  triton_ieee    the same with the logits as IEEE float32 dots on the CUDA cores
  torch          plain PyTorch on the GPU: 256 rows of A at a time (q kᵀ, causal mask, softmax in
                 float32), y = C α with the same Gram factor, squared, summed into the grid by index_add_
  sdpa           the peer: torch's scaled_dot_product_attention forward on the same q, k (values of
                 width d), one attention forward
Timed with torch.cuda.synchronize around each call (the first call autotunes). Each norms contestant
checks the first and last grid rows against an explicit float64 computation of their rows of A.
Needs a CUDA GPU; without one every case skips.
"""

import functools

import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis.scaling import synthetic_qk
from duat_kernels.linalg import norms

from conftest import QUICK, explicit_grid_row

M, H = (64, 4) if QUICK else (768, 12)
SIZES = (256,) if QUICK else (8192, 32768)
GRID = (16, 16) if QUICK else (256, 256)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: GPU speed "
                                "cannot be measured here")


@functools.lru_cache(maxsize=1)
def _inputs(n):
    q, k, w_v, w_o = synthetic_qk(n, M, H)
    return q.cuda(), k.cuda(), w_v.cuda(), w_o.cuda()


def _bins(n, parts):
    return (torch.arange(n, device="cuda") * parts) // n


def _torch_norms(q, k, c, rows_per_block=256):
    """The plain-PyTorch route: row blocks of the causal A, then ||C α||² summed into the grid."""
    h, n, d = q.shape
    row_bins, col_bins = _bins(n, GRID[0]), _bins(n, GRID[1])
    out = torch.zeros(GRID, dtype=torch.float32, device="cuda")
    cols = torch.arange(n, device="cuda")
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        s = q[:, r0:r1] @ k.transpose(-1, -2) * d ** -0.5
        s.masked_fill_(cols[None, None, :] > torch.arange(r0, r1, device="cuda")[None, :, None], float("-inf"))
        alpha = s.softmax(-1)
        sq = (c @ alpha.reshape(h, -1)).square_().sum(0).reshape(r1 - r0, n)
        per_row = torch.zeros(r1 - r0, GRID[1], device="cuda").index_add_(1, col_bins, sq)
        out.index_add_(0, row_bins[r0:r1], per_row)
    return out.sqrt_()


def _with_precision(precision, fn):
    from duat_kernels.triton import attention_norms

    saved = attention_norms.LOGIT_PRECISION
    attention_norms.LOGIT_PRECISION = precision
    try:
        return fn()
    finally:
        attention_norms.LOGIT_PRECISION = saved


@pytest.mark.parametrize("contestant", ["triton", "triton_ieee", "torch", "sdpa"])
@pytest.mark.parametrize("n", SIZES)
def test_block_norms_gpu(benchmark, n, contestant):
    q, k, w_v, w_o = _inputs(n)
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True)
    c = norms.gram_factor(w_v, w_o, H, H).float()
    values = torch.randn(1, H, n, M // H, device="cuda")
    result = {}
    fns = {
        "triton": lambda: result.update(norms=op.block_norms(grid=GRID)),
        "triton_ieee": lambda: result.update(norms=_with_precision("ieee", lambda: op.block_norms(grid=GRID))),
        "torch": lambda: result.update(norms=_torch_norms(q, k, c)),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None], values, is_causal=True),
    }
    fn = fns[contestant]
    benchmark.group = f"gpu block_norms from q/k N={n} M={M} h={H} causal grid={GRID[0]}x{GRID[1]}"
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    fn()  # autotunes the Triton kernels on the first call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1 if QUICK else 3, warmup_rounds=0)
    info = dict(kind="gpu_norms", contestant=contestant, gpu=torch.cuda.get_device_name(), n=n, m=M, h=H,
                peak_bytes=torch.cuda.max_memory_allocated() - base)
    if contestant.startswith("triton"):
        from duat_kernels.triton import attention_norms

        info["config"] = f"rows {attention_norms.row_stats_kernel.best_config}; grid {attention_norms.gram_grid_kernel.best_config}"
    if "norms" in result:
        info["max_rel_err"] = max(
            ((result["norms"][..., row, :].reshape(-1).double() - want).abs().max() / want.max()).item()
            for row in (0, GRID[0] - 1) for want in [explicit_grid_row(q, k, c, row, GRID)])
    benchmark.extra_info.update(info)
    if "norms" in result:  # float32 rounding (3xTF32: about the same), not an approximation
        assert info["max_rel_err"] <= 1e-4, info["max_rel_err"]

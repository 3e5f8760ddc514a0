"""Which N fits on a 24 GiB machine: stored A (explicit HVOOperator) against A recomputed from q/k?

h = 12, d = 64, M = 768, causal, fp32. For each N and route, the peak memory (RSS above the level
before) of building the operator's input (A by softmax of random q kᵀ, or just q and k) plus
block_norms(grid=(256, 256)) and one matvec. The stored route runs only while A (4·h·N² bytes)
is at most MAX_EXPLICIT_BYTES (the machine is shared); beyond, the table reports A's own size.
"""

import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis.scaling import PeakMemory, synthetic_qk

from conftest import QUICK

M, H = (64, 4) if QUICK else (768, 12)
NS = [64, 128] if QUICK else [2048, 4096, 8192, 16384, 32768, 65536]
MAX_EXPLICIT_BYTES = 4 << 30


def _explicit_attention(q, k):
    """A (h, N, N) = softmax(q kᵀ / √d) causal, built head by head in place."""
    h, n, d = q.shape
    attn = torch.empty(h, n, n)
    upper = torch.ones(n, n, dtype=torch.bool).triu_(1)
    for i in range(h):
        torch.mm(q[i], k[i].T, out=attn[i]).mul_(d ** -0.5).masked_fill_(upper, float("-inf"))
        attn[i] = attn[i].softmax(-1)
    return attn


@pytest.mark.parametrize("route", ["from_qk", "explicit"])
@pytest.mark.parametrize("n", NS)
def test_fits(benchmark, n, route):
    if route == "explicit" and 4 * H * n * n > MAX_EXPLICIT_BYTES:
        pytest.skip(f"A alone is {4 * H * n * n / 2 ** 30:.1f} GiB (not run on the shared machine)")
    q, k, w_v, w_o = synthetic_qk(n, M, H)
    x = torch.randn(n * M)

    def run():
        if route == "explicit":
            op = dk.HVOOperator(_explicit_attention(q, k), w_v, w_o)
        else:
            op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True)
        op.block_norms(grid=(min(256, n), min(256, n)))
        op.matvec(x)

    benchmark.group = f"fits on 24 GiB, h={H} M={M}"
    benchmark.extra_info.update(kind="fits", contestant=route, n=n, h=H, m=M)
    with torch.no_grad(), PeakMemory() as mem:
        benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info["peak_bytes"] = mem.peak

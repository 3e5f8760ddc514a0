"""Can W' be analysed at long sequence lengths without the dense matrix, and at what cost?

N = 8192, M = 768, h = 12, fp32 (3.2 GB of attention; the dense W' would be 158 TB):
  block_norms   all N² block Frobenius norms via the h x h Gram trick (bar: < 10 s, < 1 GB extra)
  matvec        W' x' matrix-free                                  (bar: <= 2x attention)
  attention     the plain attention forward on the same inputs (A @ V, then w_o): the peer
  tile          a 1024 x 1024 tile at the bottom-right corner (offsets ~6.3e6, products > 2^31)
Peak memory above the inputs is recorded in extra_info["peak_bytes"] (RSS sampled every ms).
"""

import functools

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp, reference
from duat_kernels.analysis.scaling import PeakMemory, synthetic_layer

from conftest import QUICK

N, M, H = (64, 32, 4) if QUICK else (8192, 768, 12)


@functools.lru_cache(maxsize=1)
def _layer():
    attn, w_v, w_o = synthetic_layer(N, M, H)
    return attn, w_v, w_o, torch.randn(N * M)


@pytest.mark.parametrize("operation", ["block_norms", "matvec", "attention", "tile"])
def test_long_sequence(benchmark, operation):
    attn, w_v, w_o, x = _layer()
    op = dk.HVOOperator(attn, w_v, w_o)
    side = min(1024, N * M)
    corner = slice(N * M - side, N * M)
    fns = {
        "block_norms": op.block_norms,
        "matvec": lambda: op.matvec(x),
        "attention": lambda: reference.attention_output(attn[None], x.reshape(1, N, M), w_v, w_o),
        "tile": lambda: op.tile(corner, corner),
    }
    benchmark.group = f"long sequence N={N} M={M} h={H}"
    benchmark.extra_info.update(kind="long", contestant=operation, n=N, m=M, h=H, bytes=4 * side * side if operation == "tile" else 0)
    cpp.empty_output_cache()  # a result block cached by an earlier benchmark would hide the output's memory
    with torch.no_grad(), PeakMemory() as mem:
        benchmark.pedantic(fns[operation], rounds=1 if QUICK else 3, warmup_rounds=0 if QUICK else 1)
    benchmark.extra_info["peak_bytes"] = mem.peak

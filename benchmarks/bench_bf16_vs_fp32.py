"""Is a bfloat16 W' ever slower to write than a float32 one, with each ISA variant of the C++ kernels?

bf16 output writes half the bytes but rounds every value to nearest even, vector operations that
share the FP pipes with the FMAs. Where the stores bound the time bf16 should win; where the FMAs
bound it (large h) the rounding is extra work. bench_materialise_cpu.py times the two dtypes minutes
apart, in different buffers, and on a VM a buffer's write speed can change within a minute; here
each round calls both, float32 then bfloat16, so the ratio compares like with like.

For each main configuration and each variant the CPU supports (forced as DUAT_CPU_CAPABILITY
would): the timed call is hvo_matrix(..., out=bf16 buffer), and a float32 call into its own buffer is
timed right before each round (extra_info fp32_interleaved_s). `report.py` prints bf16 / fp32 per row.
"""

import functools
import time

import pytest
import torch

import duat_kernels as dk
from duat_kernels import cpp

from conftest import QUICK

CONFIGS = [(4, 16, 2), (3, 24, 3)] if QUICK else [(32, 256, 8), (16, 768, 12), (32, 256, 32)]
VARIANTS = cpp.supported_capabilities() if cpp.is_available() else []


@functools.lru_cache(maxsize=1)
def _case(n: int, m: int, h: int):
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(h, n, n, generator=g).softmax(-1)
    w_v = torch.randn(m, m, generator=g) / m ** 0.5
    w_o = torch.randn(m, m, generator=g) / m ** 0.5
    # Buffers from the C++ output cache (2 MiB aligned, huge-page advised), shared by every variant.
    buffers = {dt: cpp.empty_output((n * m, n * m), dt) for dt in (torch.float32, torch.bfloat16)}
    return attn, w_v, w_o, buffers


@pytest.mark.skipif(not VARIANTS, reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS, ids=[f"N{n}-M{m}-h{h}" for n, m, h in CONFIGS])
def test_bf16_vs_fp32(benchmark, config, isa):
    n, m, h = config
    attn, w_v, w_o, buffers = _case(n, m, h)
    fp32_times = []

    def timed_fp32():  # the float32 call of the same round, right before the timed bfloat16 one
        start = time.perf_counter()
        dk.hvo_matrix(attn, w_v, w_o, backend="cpp", out=buffers[torch.float32])
        fp32_times.append(time.perf_counter() - start)

    benchmark.group = "bf16 against fp32 (interleaved rounds)"
    benchmark.extra_info.update(kind="bf16_vs_fp32", contestant=f"N={n} M={m} h={h} @{isa}", isa=isa, n=n, m=m, h=h,
                                entries=(n * m) ** 2)
    with cpp.using_capability(isa):
        result = benchmark.pedantic(dk.hvo_matrix, args=(attn, w_v, w_o), kwargs=dict(backend="cpp", out=buffers[torch.bfloat16]),
                                    setup=timed_fp32, rounds=1 if QUICK else 15, warmup_rounds=1)
    benchmark.extra_info["fp32_interleaved_s"] = min(fp32_times)
    # The two outputs are the same numbers: bf16 is the float32 result rounded to nearest even.
    torch.testing.assert_close(result, buffers[torch.float32].to(torch.bfloat16), rtol=0, atol=0)

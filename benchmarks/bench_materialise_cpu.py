"""How fast does the C++ backend materialise W' on the CPU, against the memory-write floor and
what a user would otherwise write?

Contestants per (N, M, h), fp32, token layout, all writing the same N·M x N·M matrix:
  cpp         duat_kernels.hvo_matrix(backend="cpp", out=buf)   (reused buffer)
  cpp_fresh   the same with a fresh output (pays first-touch page faults)
  fill        buf.fill_(0) on the same buffer: the memory-write floor
  einsum      torch.einsum("inm,ica->ncma", A, OV).reshape(...): the obvious PyTorch route
  kron_sum    Σ_i torch.kron(A_i, OV_i): the reference backend
Each entry of W' costs 2h flops, so the cpp kernel is store-bound for small h and FMA-bound for
large h; `python benchmarks/report.py run.json` prints the ratios.
"""

import functools

import pytest
import torch

import duat_kernels as dk
from duat_kernels import reference

from conftest import QUICK

CONFIGS = [(4, 16, 2), (3, 24, 3)] if QUICK else [(32, 256, 8), (16, 768, 12), (32, 256, 32)]
CONTESTANTS = ["cpp", "cpp_fresh", "fill", "einsum", "kron_sum"]


@functools.lru_cache(maxsize=1)
def fma_peak_gflops() -> float:
    """The machine's float32 FMA throughput with torch's thread count (the arithmetic floor)."""
    from duat_kernels import _C
    return max(_C.fma_peak_gflops(2_000_000 if QUICK else 20_000_000, torch.get_num_threads()) for _ in range(3))


def _layer(n: int, m: int, h: int):
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(h, n, n, generator=g).softmax(-1)
    w_v = torch.randn(m, m, generator=g) / m ** 0.5
    w_o = torch.randn(m, m, generator=g) / m ** 0.5
    return attn, w_v, w_o


@pytest.mark.parametrize("contestant", CONTESTANTS)
@pytest.mark.parametrize("n,m,h", CONFIGS, ids=[f"N{n}-M{m}-h{h}" for n, m, h in CONFIGS])
def test_materialise(benchmark, n, m, h, contestant):
    attn, w_v, w_o = _layer(n, m, h)
    benchmark.group = f"materialise fp32 token N={n} M={m} h={h}"
    benchmark.extra_info.update(n=n, m=m, h=h, entries=(n * m) ** 2, bytes=(n * m) ** 2 * 4)
    out = torch.empty(n * m, n * m)
    ov = dk.ov_circuits(w_v, w_o, h)
    fns = {
        "cpp": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="cpp", out=out),
        "cpp_fresh": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="cpp"),
        "fill": lambda: out.fill_(0),
        "einsum": lambda: torch.einsum("inm,ica->ncma", attn, ov).reshape(n * m, n * m),
        "kron_sum": lambda: reference.hvo_matrix(attn[None], ov)[0],
    }
    if contestant.startswith("cpp"):
        if "cpp" not in dk.available_backends():
            pytest.skip("the C++ extension is not built")
        benchmark.extra_info["fma_floor_s"] = 2 * h * (n * m) ** 2 / (fma_peak_gflops() * 1e9)
    rounds = 1 if QUICK else (3 if contestant == "kron_sum" else 10)
    result = benchmark.pedantic(fns[contestant], rounds=rounds, warmup_rounds=1)
    if contestant in ("einsum", "kron_sum"):  # same numbers as ours, so the race is fair
        torch.testing.assert_close(result, dk.hvo_matrix(attn, w_v, w_o, backend="reference"), rtol=1e-5, atol=1e-5)

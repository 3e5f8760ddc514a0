"""How fast does the Triton backend materialise W' on a GPU, against the HBM write floor?

Contestants per (N, M, h), fp32 and bf16 output, token layout, timed with triton.testing.do_bench:
  triton      duat_kernels.hvo_matrix(backend="triton", out=buf)
  einsum      torch.einsum("inm,ica->ncma", A, OV).reshape(...) (allocates)
  copy        buf.copy_(other): a device-to-device copy of the same bytes (reads + writes them, so
              an upper bound on the pure write floor)
Needs a CUDA GPU; on the project's machines (no GPU) every case skips, and no GPU figure exists.
"""

import pytest
import torch

import duat_kernels as dk

from conftest import QUICK

CONFIGS = [(4, 16, 2)] if QUICK else [(32, 256, 8), (16, 768, 12), (32, 256, 32), (64, 768, 12)]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: GPU speed "
                                "cannot be measured here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("contestant", ["triton", "einsum", "copy"])
@pytest.mark.parametrize("n,m,h", CONFIGS, ids=[f"N{n}-M{m}-h{h}" for n, m, h in CONFIGS])
def test_materialise_gpu(benchmark, n, m, h, contestant, dtype):
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    attn = torch.randn(h, n, n, device="cuda", generator=g).softmax(-1)
    w_v = torch.randn(m, m, device="cuda", generator=g) / m ** 0.5
    w_o = torch.randn(m, m, device="cuda", generator=g) / m ** 0.5
    out = torch.empty(n * m, n * m, device="cuda", dtype=dtype)
    other = torch.zeros_like(out)
    ov = dk.ov_circuits(w_v, w_o, h)
    fns = {
        "triton": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="triton", out=out),
        "einsum": lambda: torch.einsum("inm,ica->ncma", attn, ov).reshape(n * m, n * m).to(dtype),
        "copy": lambda: out.copy_(other),
    }
    fn = fns[contestant]
    benchmark.group = f"gpu materialise {str(dtype)[6:]} N={n} M={m} h={h}"
    ms = do_bench(fn)
    benchmark.extra_info.update(kind="gpu", contestant=contestant, do_bench_ms=ms, bytes=out.numel() * out.element_size(),
                                gb_per_s=out.numel() * out.element_size() / ms / 1e6)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1 if QUICK else 5, warmup_rounds=1)

"""How fast does the Triton backend materialise W' on a GPU, against the HBM write floor?

Contestants per (N, M, h), fp32 and bf16 output, token layout, timed with triton.testing.do_bench
(which flushes the L2 cache before each call; best and median of its repetitions):
  triton         duat_kernels.hvo_matrix(backend="triton", out=buf) (OV from the weights, validation)
  triton_kernel  the tile kernel alone from the same OV as einsum (backends.tile_kernel("triton"))
  triton_tf32x3  the same with 3xTF32 tensor-core dots (about float32 accuracy) instead of the default
                 (TF32 for bf16, IEEE float32 FMAs for fp32)
  triton_causal  triton on a causal A (zeros above the diagonal: every patch still takes its dot)
  fill           buf.fill_(x): the bytes of W' written once, the HBM write floor
  copy           buf.copy_(other): the same bytes read and written
  einsum         torch.einsum("inm,ica->ncma", A, OV).reshape(...).to(dtype) (allocates)
  kron           Σ_i torch.kron(A_i, OV_i), then .to(dtype) (only where three W' fit in a third of the GPU)
The triton rows also record the largest error of 4096 sampled entries against a float64 sum,
relative to Σ_i |A_i| |OV_i| at each entry (the scale of the rounding errors).
Needs a CUDA GPU; without one every case skips.
"""

import pytest
import torch

import duat_kernels as dk

from conftest import QUICK

CONFIGS = [(4, 16, 2)] if QUICK else [(32, 256, 8), (16, 768, 12), (32, 256, 32), (64, 768, 12)]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: GPU speed "
                                "cannot be measured here")


def _sampled_error(out: torch.Tensor, attn: torch.Tensor, ov: torch.Tensor, samples: int = 4096) -> float:
    """max |W'[r, c] - exact| / Σ_i |A_i[n, m]| |OV_i[c, a]| over random entries (r = n·M + c, c' = m·M + a)."""
    h, n, _ = attn.shape
    m = ov.shape[1]
    g = torch.Generator(device=out.device).manual_seed(1)
    r = torch.randint(0, n * m, (samples,), device=out.device, generator=g)
    c = torch.randint(0, n * m, (samples,), device=out.device, generator=g)
    a, o = attn.double()[:, r // m, c // m], ov.double()[:, r % m, c % m]
    exact, scale = (a * o).sum(0), (a.abs() * o.abs()).sum(0)
    return float(((out[r, c].double() - exact).abs() / scale.clamp_min(1e-300)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("contestant", ["triton", "triton_kernel", "triton_tf32x3", "triton_causal", "fill", "copy",
                                        "einsum", "kron"])
@pytest.mark.parametrize("n,m,h", CONFIGS, ids=[f"N{n}-M{m}-h{h}" for n, m, h in CONFIGS])
def test_materialise_gpu(benchmark, n, m, h, contestant, dtype):
    from triton.testing import do_bench

    from duat_kernels import backends
    from duat_kernels import triton as dk_triton

    bytes_fp32 = 4 * (n * m) ** 2
    if contestant == "kron" and 3 * bytes_fp32 > torch.cuda.get_device_properties(0).total_memory / 3:
        pytest.skip("kron needs three float32 W' at once")
    g = torch.Generator(device="cuda").manual_seed(0)
    attn = torch.randn(h, n, n, device="cuda", generator=g)
    if contestant == "triton_causal":
        attn.masked_fill_(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    attn = attn.softmax(-1)
    w_v = torch.randn(m, m, device="cuda", generator=g) / m ** 0.5
    w_o = torch.randn(m, m, device="cuda", generator=g) / m ** 0.5
    out = torch.empty(n * m, n * m, device="cuda", dtype=dtype)
    other = torch.zeros_like(out) if contestant == "copy" else None
    ov = dk.ov_circuits(w_v, w_o, h)

    def triton_tf32x3():
        saved = dk_triton._PRECISION[dtype]
        dk_triton._PRECISION[dtype] = "tf32x3"
        try:
            return dk.hvo_matrix(attn, w_v, w_o, backend="triton", out=out)
        finally:
            dk_triton._PRECISION[dtype] = saved

    fns = {
        "triton": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="triton", out=out),
        "triton_kernel": lambda: backends.tile_kernel("triton")(attn, ov, out),
        "triton_tf32x3": triton_tf32x3,
        "triton_causal": lambda: dk.hvo_matrix(attn, w_v, w_o, backend="triton", out=out),
        "fill": lambda: out.fill_(0.5),
        "copy": lambda: out.copy_(other),
        "einsum": lambda: torch.einsum("inm,ica->ncma", attn, ov).reshape(n * m, n * m).to(dtype),
        "kron": lambda: sum(torch.kron(attn[i], ov[i]) for i in range(h)).to(dtype),
    }
    fn = fns[contestant]
    benchmark.group = f"gpu materialise {str(dtype)[6:]} N={n} M={m} h={h}"
    times = do_bench(fn, return_mode="all")
    info = dict(kind="gpu", contestant=contestant, gpu=torch.cuda.get_device_name(), best_ms=min(times),
                median_ms=sorted(times)[len(times) // 2], bytes=out.numel() * out.element_size(), n=n, m=m, h=h)
    if contestant.startswith("triton"):
        from duat_kernels.triton.kron_sum import kron_sum_kernel

        fn()
        info["max_rel_err"] = _sampled_error(out, attn, ov)
        info["config"] = str(kron_sum_kernel.best_config)  # the autotuner's choice for this shape
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1 if QUICK else 5, warmup_rounds=1)

"""Can W' of one attention layer be analysed at N = 32768 from q and k, without A (51 GB)?

N = 32768, h = 12, d = 64, M = 768, causal, random q/k, fp32 (HVOOperator.from_qk):
  block_norms   grid=(256, 256) super-block norms (bar: <= 120 s, peak <= 2 GiB above the inputs) through
                the fused C++ q/k pass; two grid rows are checked against an explicit float64 computation
                of their rows of A (relative 1e-4)
  block_norms_unfused  the same through the torch row blocks of A (64 MiB each) and the C++ Gram pass:
                the path before the fused pass, for comparison
  matvec        W' x' (torch's sdpa inside)            (bar: <= 2x sdpa, and equal to it)
  sdpa          torch.nn.functional.scaled_dot_product_attention on the same q, k and values: the peer
test_rmatvec (N = 4096, 8192): W'ᵀ y (through the C++ Aᵀ U pass, and as before through torch row blocks)
against matvec and torch's sdpa forward and forward + backward for the values' gradient (dV = Aᵀ dO, what
rmatvec needs) on the same q, k.
Peak memory above the inputs is recorded in extra_info["peak_bytes"] (RSS sampled every ms).
"""

import functools
from unittest import mock

import pytest
import torch

import duat_kernels as dk
from duat_kernels import qk_cpu
from duat_kernels.linalg import gram_norms, norms
from duat_kernels.analysis.scaling import PeakMemory, synthetic_qk

from conftest import QUICK, explicit_grid_row

N, M, H = (256, 64, 4) if QUICK else (32768, 768, 12)
GRID = (16, 16) if QUICK else (256, 256)
CHECKED_GRID_ROWS = (0, GRID[0] - 1)


@functools.lru_cache(maxsize=1)
def _inputs():
    q, k, w_v, w_o = synthetic_qk(N, M, H)
    return q, k, w_v, w_o, torch.randn(N * M, generator=torch.Generator().manual_seed(1))


def _unfused_block_norms(op):
    with mock.patch.object(gram_norms, "qk_available", lambda source: False):
        return op.block_norms(grid=GRID)


def _unfused_rmatvec(op, y):
    """rmatvec through torch row blocks of A (the path before the C++ pass)."""
    with mock.patch.object(qk_cpu, "handles", lambda source: False):
        return op.rmatvec(y)


def _values(x, w_v):
    """(1, h, N, d): 4-D, as torch's fused CPU kernel requires."""
    return (x.reshape(N, M) @ w_v.T).reshape(N, H, -1).transpose(0, 1)[None]


@pytest.mark.parametrize("operation", ["block_norms", "block_norms_unfused", "matvec", "sdpa"])
def test_from_qk(benchmark, operation):
    q, k, w_v, w_o, x = _inputs()
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True)
    result = {}
    fns = {
        "block_norms": lambda: result.update(norms=op.block_norms(grid=GRID)),
        "block_norms_unfused": lambda: result.update(norms=_unfused_block_norms(op)),
        "matvec": lambda: result.update(y=op.matvec(x)),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None], _values(x, w_v),
                                                                         is_causal=True),
    }
    benchmark.group = f"from_qk N={N} M={M} h={H}"
    benchmark.extra_info.update(kind="from_qk", contestant=operation, n=N, m=M, h=H)
    with torch.no_grad(), PeakMemory() as mem:
        benchmark.pedantic(fns[operation], rounds=1, warmup_rounds=0 if QUICK or operation.startswith("block_norms") else 1)
    benchmark.extra_info["peak_bytes"] = mem.peak
    if operation.startswith("block_norms"):
        for row in CHECKED_GRID_ROWS:
            want = explicit_grid_row(q, k, norms.gram_factor(w_v, w_o, H, H), row, GRID)
            err = ((result["norms"][row].double() - want).abs().max() / want.max()).item()
            benchmark.extra_info[f"grid_row_{row}_rel_err"] = err
            assert err <= 1e-4, (row, err)
    if operation == "matvec":
        heads = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], _values(x, w_v), is_causal=True)
        want = (heads[0].transpose(0, 1).reshape(N, M) @ w_o.T).reshape(-1)
        err = ((result["y"] - want).norm() / want.norm()).item()
        benchmark.extra_info["rel_err_vs_sdpa"] = err
        assert err <= 1e-6, err


RMATVEC_SIZES = (256,) if QUICK else (4096, 8192)


@functools.lru_cache(maxsize=1)
def _rmatvec_inputs(n):
    q, k, w_v, w_o = synthetic_qk(n, M, H)
    return q, k, w_v, w_o, torch.randn(n * M, generator=torch.Generator().manual_seed(2))


def _sdpa_backward(q, k, values, grad_out):
    """dV = Aᵀ grad_out through torch's sdpa (forward, then backward with only the values requiring grad)."""
    values = values.detach().requires_grad_(True)
    torch.nn.functional.scaled_dot_product_attention(q[None], k[None], values, is_causal=True).backward(grad_out)
    return values.grad


@pytest.mark.parametrize("n", RMATVEC_SIZES)
@pytest.mark.parametrize("operation", ["rmatvec", "rmatvec_unfused", "matvec", "sdpa_forward",
                                       "sdpa_forward_backward"])
def test_rmatvec(benchmark, n, operation):
    q, k, w_v, w_o, y = _rmatvec_inputs(n)
    op = dk.HVOOperator.from_qk(q, k, w_v, w_o, causal=True)
    u = (y.reshape(n, M) @ w_o).reshape(n, H, -1).transpose(0, 1)[None].contiguous()  # Y Wo_i (1, h, N, d)
    values = torch.randn(u.shape, generator=torch.Generator().manual_seed(3))
    result = {}
    fns = {
        "rmatvec": lambda: result.update(x=op.rmatvec(y)),
        "rmatvec_unfused": lambda: result.update(x=_unfused_rmatvec(op, y)),
        "matvec": lambda: op.matvec(y),
        "sdpa_forward": lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None], values,
                                                                                 is_causal=True),
        "sdpa_forward_backward": lambda: result.update(dv=_sdpa_backward(q, k, values, u)),
    }
    benchmark.group = f"rmatvec from_qk N={n} M={M} h={H}"
    benchmark.extra_info.update(kind="from_qk_rmatvec", contestant=operation, n=n, m=M, h=H)
    grad = torch.enable_grad() if operation == "sdpa_forward_backward" else torch.no_grad()
    with grad, PeakMemory() as mem:
        benchmark.pedantic(fns[operation], rounds=1 if QUICK else 3, warmup_rounds=0 if QUICK else 1)
    benchmark.extra_info["peak_bytes"] = mem.peak
    if operation.startswith("rmatvec"):
        want = (_sdpa_backward(q, k, values, u)[0].transpose(0, 1).reshape(n, M) @ w_v).reshape(-1)
        err = ((result["x"] - want).norm() / want.norm()).item()
        benchmark.extra_info["rel_err_vs_sdpa_backward"] = err
        assert err <= 1e-5, err

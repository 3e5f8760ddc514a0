"""When does the matrix-free route beat materialising W', as N grows?

For each N (M = 64, h = 4, causal synthetic attention, fp32), the same three answers two ways:
  matvec         HVOOperator.matvec   vs  materialise W' (cpp) then W' @ x
  block_norms    HVOOperator.block_norms (Gram trick)  vs  materialise, then the norms of the blocks
  spectral_norm  HVOOperator.spectral_norm (scipy svds)  vs  materialise, then torch.linalg.matrix_norm(W', 2)
The dense spectral norm (a full SVD) runs up to N = 32 (W' 2048 x 2048).
"""

import functools

import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis.scaling import synthetic_layer

from conftest import QUICK

M, H = (16, 2) if QUICK else (64, 4)
NS = [4, 8] if QUICK else [8, 16, 32, 64]
DENSE_SVD_MAX_N = 8 if QUICK else 32
CASES = [(n, q, route) for n in NS for q in ("matvec", "block_norms", "spectral_norm") for route in ("free", "dense")
         if not (q == "spectral_norm" and route == "dense" and n > DENSE_SVD_MAX_N)]


@functools.lru_cache(maxsize=1)
def _op(n):
    attn, w_v, w_o = synthetic_layer(n, M, H)
    return dk.HVOOperator(attn, w_v, w_o), torch.randn(n * M)


def _dense(op, question, x, n):
    w = op.to_dense()
    if question == "matvec":
        return w @ x
    if question == "block_norms":
        return torch.linalg.matrix_norm(w.reshape(n, M, n, M).transpose(1, 2))
    return torch.linalg.matrix_norm(w, 2)


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_matrix_free_vs_dense(benchmark, case):
    n, question, route = case
    op, x = _op(n)
    free = {"matvec": lambda: op.matvec(x), "block_norms": op.block_norms,
            "spectral_norm": lambda: op.spectral_norm(tol=1e-4)}[question]
    fn = free if route == "free" else (lambda: _dense(op, question, x, n))
    benchmark.group = f"matrix-free vs dense: {question} M={M} h={H}"
    benchmark.extra_info.update(kind="matrix_free", contestant=f"{route} N={n}", question=question, route=route, n=n,
                                m=M, h=H, bytes=4 * (n * M) ** 2)
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=1 if QUICK else 3, warmup_rounds=0 if QUICK else 1)

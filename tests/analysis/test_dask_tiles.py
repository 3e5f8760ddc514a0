"""HVOOperator.to_dask and save_zarr on a LocalCluster of 2 worker processes: every block is the
kernels' tile, the factors are one task of the graph, the zarr store holds to_dense()."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import duat_kernels as dk

pytest.importorskip("distributed", reason="needs dask.distributed: pip install '.[dask]'")
zarr = pytest.importorskip("zarr", reason="needs zarr: pip install '.[dask]'")

CASES = {  # name: (random_layer kwargs, chunks, layout)
    "token-unaligned": (dict(batched=False), (10, 13), "token"),
    "feature-gqa": (dict(batched=False, heads=6, kv_heads=2), (17, 8), "feature"),
    "token-causal-f64": (dict(batched=False, causal=True, dtype=torch.float64), (9, 11), "token"),
    "batched": (dict(batch=2), (20, 30), "token"),
}


def _operator(layer, kwargs, layout):
    p = layer(**kwargs)
    return dk.HVOOperator(p["attn"], p["w_v"], p["w_o"], num_kv_heads=p["num_kv_heads"], layout=layout)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_are_tiles(layer, dask_client, case):
    kwargs, chunks, layout = CASES[case]
    op = _operator(layer, kwargs, layout)
    arr = op.to_dask(chunks=chunks)
    assert arr.shape == op.shape and arr.dtype == op.to_dense().numpy().dtype
    dense = dask_client.compute(arr).result()
    rows, cols = arr.chunks[-2:]
    r_edges, c_edges = np.cumsum((0, *rows)), np.cumsum((0, *cols))
    for i in range(len(rows)):
        for j in range(len(cols)):
            r, c = slice(r_edges[i], r_edges[i + 1]), slice(c_edges[j], c_edges[j + 1])
            np.testing.assert_array_equal(dense[..., r, c], op.tile(r, c).numpy(), err_msg=f"block {i}, {j}")
    np.testing.assert_array_equal(dense, op.to_dense().numpy())


def test_factors_are_one_task_shared_by_every_block(layer):
    op = _operator(layer, dict(batched=False, tokens=9), "token")
    arr = op.to_dask(chunks=(8, 8))
    graph = dict(arr.__dask_graph__())
    sources = [k for k in graph if isinstance(k, str) and k.startswith("hvo-operator-")]
    assert len(sources) == 1
    blocks = [k for k in graph if isinstance(k, tuple)]
    assert len(blocks) == arr.npartitions == -(-op.shape[0] // 8) * -(-op.shape[1] // 8)
    from dask.core import get_dependencies

    assert all(get_dependencies(graph, k) == {sources[0]} for k in blocks)
    factor_bytes = sum(t.numel() * t.element_size() for t in (op.attn, op.w_v, op.w_o))
    assert max(len(pickle.dumps(graph[k])) for k in blocks) < factor_bytes / 4  # a reference, not the factors


def test_save_zarr_on_cluster_equals_to_dense(layer, dask_client, tmp_path):
    op = _operator(layer, dict(batched=False, heads=3, tokens=8), "token")
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=(16, 20), scheduler=dask_client, progress=False)
    stored = zarr.open_array(path, mode="r")
    assert stored.chunks == (16, 20)
    np.testing.assert_array_equal(stored[:], op.to_dense().numpy())
    assert dk.analysis.verify_zarr(path) == []
    assert not (tmp_path / "w.zarr.partial").exists() and not (tmp_path / "w.zarr.progress").exists()


@pytest.mark.parametrize("chunks, error", [((0, 4), ValueError), ((4,), ValueError), ("auto", ValueError)])
def test_bad_chunks_are_refused(layer, chunks, error):
    op = _operator(layer, dict(batched=False), "token")
    with pytest.raises(error, match="chunks must be"):
        op.to_dask(chunks=chunks)


@pytest.mark.parametrize("write", ["to_dask", "save_zarr"])
def test_a_tensor_for_the_operator_is_refused(layer, write, tmp_path):
    # to_dask(attn) failed with "'Tensor' object has no attribute 'device'"
    attn = _operator(layer, dict(batched=False), "token").attn
    with pytest.raises(TypeError, match=r"needs an HVOOperator .*, got Tensor"):
        dk.analysis.to_dask(attn) if write == "to_dask" else dk.analysis.save_zarr(attn, tmp_path / "w.zarr")
    if write == "save_zarr":  # progress="no" showed the bar
        op = _operator(layer, dict(batched=False), "token")
        with pytest.raises(TypeError, match="progress must be True or False, got str 'no'"):
            dk.analysis.save_zarr(op, tmp_path / "w.zarr", progress="no")


def test_bfloat16_is_refused(layer):
    op = _operator(layer, dict(batched=False), "token")
    with pytest.raises(TypeError, match="float32, float64 or float16"):
        op.to_dask(dtype=torch.bfloat16)


def test_bfloat16_operator_defaults_to_float32(layer, tmp_path):
    # an operator of bfloat16 tensors refused its own default dtype ("dtype must be float32, float64 or
    # float16 (a NumPy dtype), got torch.bfloat16") in to_dask and save_zarr, and save_dense alike
    from duat_kernels.analysis import save_zarr
    from duat_kernels.analysis.out_of_core import save_dense

    p = layer(batched=False)
    op = dk.HVOOperator(p["attn"].bfloat16(), p["w_v"].bfloat16(), p["w_o"].bfloat16(), num_kv_heads=p["num_kv_heads"])
    want = op.to_dense(dtype=torch.float32).numpy()
    arr = op.to_dask(chunks=(10, 13))
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr.compute(scheduler="sync"), want)
    stored = save_zarr(op, tmp_path / "w.zarr", chunks=(10, 13), scheduler="sync", progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(stored))[...], want)
    np.testing.assert_array_equal(np.load(save_dense(op, tmp_path / "w.npy", progress=False)), want)


def test_negated_views_are_tiled_and_keyed_by_value():
    """to_dask of inputs with the negative bit set failed in factors_token with torch's raw
    'torch.Tensor.view is not supported for tensors with negative bit set'."""
    from conftest import random_layer
    from duat_kernels.analysis.dask_tiles import factors_token

    lay = random_layer(1, 2, tokens=4, head_dim=2, m_in=3, m_out=3, batched=False)
    plain = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    negated = dk.HVOOperator(torch._neg_view(-lay["attn"]), lay["w_v"], torch._neg_view(-lay["w_o"]))
    np.testing.assert_array_equal(negated.to_dask(chunks=(5, 7)).compute(), plain.to_dense().numpy())
    assert factors_token(negated) == factors_token(plain)

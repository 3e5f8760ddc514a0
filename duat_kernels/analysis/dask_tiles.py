"""W' as a lazy dask.array whose blocks are tiles written by the kernels (HVOOperator.tile).

The graph holds the operator's factors (A, w_v, w_o) once, as one task that rebuilds the operator;
every block task refers to that task's key. A distributed scheduler therefore ships the factors to
each worker once (worker-to-worker transfer of one key), never pickled into each of the
(N·M_out / rows)·(N·M_in / cols) block tasks. Each block costs what `tile` costs: 2h flops and one
store per entry of the block.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from duat_kernels import _validation as v
from duat_kernels.hvo_operator import HVOOperator

NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}

# Default chunk: about this many bytes (square-ish tiles), 32 MiB.
DEFAULT_CHUNK_BYTES = 32 << 20


def _dask():
    try:
        import dask
        import dask.array
    except ImportError as exc:
        raise ImportError("to_dask and save_zarr need dask: pip install 'duat-kernels[dask]'") from exc
    return dask


def stored_dtype(op, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of W' entries (default: the inputs' promoted dtype, float32 for bfloat16); float32, float64
    or float16, or its name. Refuses an operator on meta tensors (no entries to store)."""
    v.check_operator("W' as a Dask array (to_dask, save_zarr)", op)
    return v.storage_dtype(dtype, op.dtype, "(a NumPy dtype)")


def check_chunks(op, chunks, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) of one chunk of W' (each clipped to the matrix); None: square-ish, ~32 MiB."""
    rows, cols = op.shape[-2:]
    if chunks is None:
        side = max(1, int((DEFAULT_CHUNK_BYTES / (dtype.itemsize * max(1, op.dims.batch))) ** 0.5))
        return max(1, min(rows, side)), max(1, min(cols, side))
    if not (isinstance(chunks, (tuple, list)) and len(chunks) == 2
            and all(v.positive_int(c) is not None for c in chunks)):
        raise ValueError(f"chunks must be (rows, cols), two positive ints, got {chunks!r}")
    return max(1, min(rows, v.positive_int(chunks[0]))), max(1, min(cols, v.positive_int(chunks[1])))


def chunk_bounds(total: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the chunks of size `size` along a dimension of length `total` (one empty
    chunk for total = 0: W' without rows or columns, M_out = 0 or M_in = 0)."""
    return [(s, min(total, s + size)) for s in range(0, total, size)] or [(0, 0)]


def factors_token(op) -> str:
    """sha256 of everything W' depends on: A, w_v, w_o, kv heads and layout (not the biases)."""
    h = hashlib.sha256()
    for t in (op.attn, op.w_v, op.w_o):
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        h.update(v.value_bytes(t))
    h.update(repr((op.dims.kv_heads, op.layout)).encode())
    return h.hexdigest()


def build_operator(attn: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, num_kv_heads: int, layout: str):
    """An HVOOperator without biases (runs once per worker that holds the factors)."""
    return HVOOperator(attn, w_v, w_o, num_kv_heads=num_kv_heads, layout=layout)


def operator_delayed(op):
    """One dask.delayed task that rebuilds `op` (without biases) on the worker, keyed by its factors."""
    dask = _dask()
    key = f"hvo-operator-{factors_token(op)[:32]}"
    return dask.delayed(build_operator, pure=True)(op.attn.detach().cpu(), op.w_v.detach().cpu(),
                                                   op.w_o.detach().cpu(), op.dims.kv_heads, op.layout,
                                                   dask_key_name=key)


def tile_block(op, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype) -> np.ndarray:
    """W'[r0:r1, c0:c1] as a NumPy array, (r1-r0, c1-c0) or (B, r1-r0, c1-c0), written by op.tile."""
    if r1 == r0 or c1 == c0:  # an empty W' (M_out = 0 or M_in = 0): nothing for the kernels to write
        return np.zeros((*op.shape[:-2], r1 - r0, c1 - c0), dtype=NUMPY_DTYPES[dtype])
    with torch.no_grad():
        return op.tile(slice(r0, r1), slice(c0, c1), dtype=dtype).cpu().numpy()


def to_dask(op, chunks: tuple[int, int] | None = None, dtype: torch.dtype | None = None):
    """W' of an HVOOperator as a lazy dask.array.

    Args:
        op: HVOOperator, attn (h, N, N_k) or (B, h, N, N_k). Its factors go into the graph as CPU
            tensors: the workers write tiles with their CPU kernels; blocks are NumPy arrays.
        chunks: (rows, cols) of one block of W' (default: square-ish blocks of ~32 MiB). Blocks
            need not align with the M_out x M_in blocks of W'.
        dtype: entry dtype, float32, float64 or float16 (default: the inputs' promoted dtype).

    Returns:
        dask.array of shape (N·M_out, N_k·M_in) (or (B, N·M_out, N_k·M_in), one chunk along B); block
        (i, j) is op.tile(rows_i, cols_j). Nothing is computed until .compute()/.store().
    """
    dask = _dask()
    from dask.highlevelgraph import HighLevelGraph

    dtype = stored_dtype(op, dtype)
    rows, cols = op.shape[-2:]
    chunk_rows, chunk_cols = check_chunks(op, chunks, dtype)
    row_bounds, col_bounds = chunk_bounds(rows, chunk_rows), chunk_bounds(cols, chunk_cols)
    source = operator_delayed(op)
    name = f"hvo-tiles-{dask.base.tokenize(source.key, chunk_rows, chunk_cols, str(dtype))}"
    lead = (0,) if op.dims.batched else ()
    layer = {(name, *lead, i, j): (tile_block, source.key, r0, r1, c0, c1, dtype)
             for i, (r0, r1) in enumerate(row_bounds) for j, (c0, c1) in enumerate(col_bounds)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[source])
    dims = ((op.dims.batch,),) if op.dims.batched else ()
    dims += (tuple(r1 - r0 for r0, r1 in row_bounds), tuple(c1 - c0 for c0, c1 in col_bounds))
    return dask.array.Array(graph, name, chunks=dims, dtype=NUMPY_DTYPES[dtype])

"""Streaming W' to disk tile by tile: bounded memory, a progress bar, restartable.

The matrix is written into `<path>.partial` (a valid .npy with its header) in tiles of whole rows,
each tile with one positioned write; after each tile is on disk (fsync) its index is recorded in
`<path>.progress.json` (replaced atomically). Only when every tile is written is the file renamed
to `path`, so an interrupted run never leaves a file at `path` that looks complete, and a rerun
with the same inputs resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_TILE_BYTES = 256 << 20

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _fingerprint(op, dtype: torch.dtype, rows_per_tile: int) -> str:
    """Identifies the matrix being written: shapes, layout, dtype, tiling, and a hash of the inputs
    (the weights whole, the attention's inputs through strided samples of at most 2^20 entries)."""
    h = hashlib.sha256()
    for t in (*op.source.fingerprint(), op.w_v.detach(), op.w_o.detach()):
        h.update(t.contiguous().cpu().numpy().tobytes())
    h.update(repr((tuple(op.shape), op.layout, str(dtype), rows_per_tile, op.dims.kv_heads)).encode())
    return h.hexdigest()


def save_dense(op, path: str | os.PathLike, *, rows_per_tile: int | None = None, max_tile_bytes: int = DEFAULT_TILE_BYTES,
               dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """Write the dense W' of an unbatched HVOOperator to the .npy file `path`, tile by tile.

    Args:
        op: HVOOperator with attn (h, N, N).
        path: destination .npy; bfloat16 is not a NumPy dtype, so float32, float64 and float16 only.
        rows_per_tile: rows of W' per tile (default: as many as fit in max_tile_bytes).
        max_tile_bytes: memory budget of one tile, the peak memory beyond the inputs.
        dtype: stored dtype (default: the inputs' promoted dtype).
        progress: show a tqdm progress bar.

    Returns:
        The path of the complete file. Reruns after an interruption resume from the last tile.
    """
    from duat_kernels import _validation as v

    if op.dims.batched:
        raise ValueError("save_dense needs an unbatched HVOOperator (attn of shape (h, N, N))")
    dtype = dtype or v.resolve_dtype(None, None, torch.empty(0, dtype=op.source.dtype), op.w_v, op.w_o)
    if dtype not in _NUMPY_DTYPES:
        raise TypeError(f"dtype must be float32, float64 or float16 for a .npy file, got {dtype}")
    rows, cols = op.shape
    row_bytes = cols * dtype.itemsize
    if rows_per_tile is None:
        if row_bytes > max_tile_bytes:
            raise ValueError(f"one row of W' takes {v.format_bytes(row_bytes)}, more than max_tile_bytes="
                             f"{v.format_bytes(max_tile_bytes)}; raise max_tile_bytes")
        rows_per_tile = max(1, min(rows, max_tile_bytes // row_bytes))
    if rows_per_tile < 1:
        raise ValueError(f"rows_per_tile must be positive, got {rows_per_tile}")
    path = Path(path)
    partial, progress_file = Path(f"{path}.partial"), Path(f"{path}.progress.json")
    fingerprint = _fingerprint(op, dtype, rows_per_tile)
    n_tiles = -(-rows // rows_per_tile)

    done: set[int] = set()
    if partial.exists() and progress_file.exists():
        state = json.loads(progress_file.read_text())
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{partial} holds an interrupted run for other inputs or settings; "
                             "delete it (and its .progress.json) to start again")
        done = set(state["done"])
    else:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=(rows, cols))
        del arr  # only the header and the file size are needed
        _write_progress(progress_file, fingerprint, done)
    offset = _data_offset(partial)

    from tqdm.auto import tqdm

    todo = [t for t in range(n_tiles) if t not in done]
    with open(partial, "r+b") as f, tqdm(total=n_tiles, initial=n_tiles - len(todo), unit="tile",
                                         desc=f"W' -> {path.name}", disable=not progress) as bar:
        for t in todo:
            r0 = t * rows_per_tile
            r1 = min(rows, r0 + rows_per_tile)
            with torch.no_grad():
                tile = op.tile(slice(r0, r1), slice(0, cols), dtype=dtype).cpu()
            _pwrite_all(f.fileno(), memoryview(tile.numpy()).cast("B"), offset + r0 * row_bytes)
            os.fsync(f.fileno())
            done.add(t)
            _write_progress(progress_file, fingerprint, done)
            bar.update(1)
    os.replace(partial, path)
    progress_file.unlink()
    return path


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(f)
        return f.tell()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (one call writes at most ~2 GiB on Linux)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_progress(progress_file: Path, fingerprint: str, done: set[int]) -> None:
    tmp = progress_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "done": sorted(done)}))
    os.replace(tmp, progress_file)

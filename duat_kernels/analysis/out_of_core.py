"""Streaming W' to disk tile by tile: bounded memory, a progress bar, restartable.

The matrix is written into `<path>.partial` (a valid .npy with its header) in tiles of whole rows,
each tile with one positioned write; after each tile is on disk (fsync) its index and a CRC-32 of
its bytes are recorded in `<path>.progress.json` (replaced atomically) with the file's size. Only
when every tile is written is the file renamed to `path`, so an interrupted run never leaves a file
at `path` that looks complete, and a rerun with the same inputs resumes where it stopped; a resume
first reads back every recorded tile and redoes those whose bytes changed (a truncated or damaged
.partial). The target, its folder and the free disk space are checked before anything is written; an existing
file at `path` is replaced only with overwrite=True (and only when the new one is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from duat_kernels import _validation as v
from duat_kernels import strict_json
from duat_kernels._files import (as_target_path, check_no_file_on_path, check_writable_folder, link_target,
                                 open_mode)
from duat_kernels._memory import DenseTooLargeError, format_bytes
from duat_kernels.analysis.dask_tiles import tile_block

DEFAULT_TILE_BYTES = 256 << 20

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _fingerprint(op, dtype: torch.dtype, rows_per_tile: int) -> str:
    """Identifies the matrix being written: shapes, layout, dtype, tiling, and a hash of the inputs
    (the weights whole, the attention's inputs through strided samples of at most 2^20 entries)."""
    h = hashlib.sha256()
    for t in (*op.source.fingerprint(), op.w_v.detach(), op.w_o.detach()):
        h.update(v.value_bytes(t))
    h.update(repr((tuple(op.shape), op.layout, str(dtype), rows_per_tile, op.dims.kv_heads)).encode())
    return h.hexdigest()


def save_dense(op, path: str | os.PathLike, *, rows_per_tile: int | None = None, max_tile_bytes: int = DEFAULT_TILE_BYTES,
               dtype: torch.dtype | None = None, progress: bool = True, overwrite: bool = False) -> Path:
    """Write the dense W' of an unbatched HVOOperator to the .npy file `path`, tile by tile.

    Args:
        op: HVOOperator with attn (h, N, N_k) (N_k = N but for cross-attention).
        path: destination .npy; bfloat16 is not a NumPy dtype, so float32, float64 and float16 only.
        rows_per_tile: rows of W' per tile (default: as many as fit in max_tile_bytes).
        max_tile_bytes: memory budget of one tile, the peak memory beyond the inputs.
        dtype: stored dtype (default: the inputs' promoted dtype, float32 for bfloat16).
        progress: show a tqdm progress bar.
        overwrite: replace an existing file at `path` (a FileExistsError otherwise, as save_zarr
            refuses an existing store); the old file stays until the new one is complete, whose permission bits
            it takes, as open(path, "w") keeps them (0666 & ~umask for a new file). A `path` that is
            a symbolic link is written through, as open(path, "w") does: the file it points to is replaced
            (and created if missing) and the link stays; a link is an existing file, refused without overwrite.

    Returns:
        The path of the complete file (`path` itself, a link included). Reruns after an interruption resume
        from the last tile (an interrupted run leaves `path` as it was: `<file>.partial` next to the file written,
        the link's target for a link, holds its tiles).
    """
    v.check_operator("save_dense", op)
    if op.dims.batched:
        raise ValueError("save_dense needs an unbatched HVOOperator (attn of shape (h, N, N_k))")
    overwrite, progress = v.check_flag("overwrite", overwrite), v.check_flag("progress", progress)
    if v.positive_int(max_tile_bytes) is None:
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    dtype = v.storage_dtype(dtype, op.dtype, "for a .npy file")
    rows, cols = op.shape
    row_bytes = cols * dtype.itemsize
    if rows_per_tile is None:
        if row_bytes == 0:  # W' without columns (M_in = 0): the file is its header
            rows_per_tile = max(1, rows)
        elif row_bytes > max_tile_bytes:
            raise ValueError(f"one row of W' takes {format_bytes(row_bytes)}, more than max_tile_bytes="
                             f"{format_bytes(max_tile_bytes)}; raise max_tile_bytes")
        else:
            rows_per_tile = max(1, min(rows, max_tile_bytes // row_bytes))
    if v.positive_int(rows_per_tile) is None:
        raise ValueError(f"rows_per_tile must be a positive int, got {rows_per_tile!r}")
    rows_per_tile = v.positive_int(rows_per_tile)
    path = as_target_path("path", path)
    target = link_target("save_dense", path)  # the file written: path itself, or the file a link at path points to
    partial, progress_file = Path(f"{target}.partial"), Path(f"{target}.progress.json")
    _check_target(path, target, partial, rows * row_bytes, overwrite)
    fingerprint = _fingerprint(op, dtype, rows_per_tile)
    n_tiles = -(-rows // rows_per_tile) if rows else 0

    done: dict[int, int] = {}  # tile -> CRC-32 of its bytes
    if partial.exists() and progress_file.exists():
        done = _read_progress(progress_file, partial, fingerprint)
        try:
            offset = _data_offset(partial)
        except (OSError, ValueError) as exc:
            raise ValueError(f"save_dense: {partial} is not a valid .npy file ({exc}); delete it and "
                             f"{progress_file} to start again") from None
        done = _verified_tiles(partial, offset, done, rows, rows_per_tile, row_bytes)
    else:
        try:
            arr = np.lib.format.open_memmap(partial, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=(rows, cols))
        except (OSError, ValueError, OverflowError) as exc:
            raise DenseTooLargeError(f"cannot create {partial} for W' of shape ({rows}, {cols}) "
                                     f"({format_bytes(rows * row_bytes)}): {exc}") from None
        del arr  # only the header and the file size are needed
        offset = _data_offset(partial)
        _write_progress(progress_file, fingerprint, done, offset + rows * row_bytes)
    size = offset + rows * row_bytes

    from tqdm.auto import tqdm

    todo = [t for t in range(n_tiles) if t not in done]
    with open(partial, "r+b") as f, tqdm(total=n_tiles, initial=n_tiles - len(todo), unit="tile",
                                         desc=f"W' -> {path.name}", disable=not progress) as bar:
        for t in todo:
            r0 = t * rows_per_tile
            r1 = min(rows, r0 + rows_per_tile)
            data = memoryview(tile_block(op, r0, r1, 0, cols, dtype).reshape(-1)).cast("B")
            _pwrite_all(f.fileno(), data, offset + r0 * row_bytes)
            os.fsync(f.fileno())
            done[t] = zlib.crc32(data)
            _write_progress(progress_file, fingerprint, done, size)
            bar.update(1)
    mode = open_mode(target)  # the replaced file's, as open(path, 'w') keeps it; 0666 & ~umask for a new one
    os.replace(partial, target)
    os.chmod(target, mode)
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


def _write_progress(progress_file: Path, fingerprint: str, done: dict[int, int], file_size: int) -> None:
    tmp = progress_file.with_suffix(".tmp")
    tmp.write_text(strict_json.dumps({"fingerprint": fingerprint, "file_size": file_size,
                               "tiles": {str(t): crc for t, crc in sorted(done.items())}}))
    os.replace(tmp, progress_file)


def _check_target(path: Path, target: Path, partial: Path, data_bytes: int, overwrite: bool) -> None:
    """Refuse, before writing anything, a target that is a folder, an existing file or link at path (unless
    overwrite), a missing or read-only folder, or a disk without room for the file (a fresh .partial is sparse: the
    space is taken as tiles arrive; the file it replaces is counted as taken). target: the file written, path or the
    file a link at path points to."""
    for p in (target, partial):
        if p.is_dir():
            raise ValueError(f"save_dense: {p} is a directory; pass a file path such as {p / 'w.npy'}")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"save_dense: {path} exists; pass overwrite=True to replace it, or choose another path")
    folder = target.parent
    check_no_file_on_path("save_dense", target)
    if not folder.is_dir():
        raise FileNotFoundError(f"save_dense: the folder {folder} of {target} does not exist; create it first")
    check_writable_folder("save_dense", folder)  # else 'needs 3.5 KiB but only 0 B is free' (read-only)
    have = partial.stat().st_blocks * 512 if partial.exists() else 0
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if data_bytes - have > free:
        raise DenseTooLargeError(f"save_dense: {path} needs {format_bytes(data_bytes)} but only "
                                 f"{format_bytes(free + have)} is free on its disk; write to a larger disk or "
                                 "save parts of W' with HVOOperator.tile")


def _crc_range(fd: int, offset: int, length: int, chunk: int = 64 << 20) -> int:
    crc = 0
    while length > 0:
        data = os.pread(fd, min(chunk, length), offset)
        if not data:
            break
        crc = zlib.crc32(data, crc)
        offset, length = offset + len(data), length - len(data)
    return crc


def _read_progress(progress_file: Path, partial: Path, fingerprint: str) -> dict[int, int]:
    """The recorded tiles {index: CRC-32} of an interrupted run, or a clear error."""
    try:
        state = json.loads(progress_file.read_text())
        recorded_fingerprint, tiles = state["fingerprint"], state["tiles"]
        done = {int(t): int(crc) for t, crc in tiles.items()}
        int(state["file_size"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"save_dense: {progress_file} is not a valid progress record ({type(exc).__name__}: {exc}); "
                         f"delete it and {partial} to start again") from None
    if recorded_fingerprint != fingerprint:
        raise ValueError(f"{partial} holds an interrupted run for other inputs or settings; "
                         "delete it (and its .progress.json) to start again")
    return done


def _verified_tiles(partial: Path, offset: int, done: dict[int, int], rows: int, rows_per_tile: int,
                    row_bytes: int) -> dict[int, int]:
    """The recorded tiles whose bytes in `partial` still have their CRC-32; a file of the wrong size
    (truncated) is first restored to its size, so that the missing tiles fail the check and are redone."""
    size = offset + rows * row_bytes
    if partial.stat().st_size != size:
        os.truncate(partial, size)
    good = {}
    with open(partial, "rb") as f:
        for t, crc in done.items():
            r0, r1 = t * rows_per_tile, min(rows, (t + 1) * rows_per_tile)
            if 0 <= r0 < r1 and _crc_range(f.fileno(), offset + r0 * row_bytes, (r1 - r0) * row_bytes) == crc:
                good[t] = crc
    if len(good) < len(done):
        warnings.warn(f"save_dense: {len(done) - len(good)} of the {len(done)} tiles recorded in {partial} changed on "
                      "disk (a truncated or damaged file); they are written again", RuntimeWarning, stacklevel=3)
    return good

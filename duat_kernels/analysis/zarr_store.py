"""W' into a zarr array, chunk by chunk on any Dask scheduler, resumable, with a sha256 per chunk.

The array is written into `<path>.partial` (a zarr v3 store). Each chunk task computes its tile
(HVOOperator.tile), writes it, and only then records the sha256 of its bytes in
`<path>.progress/<i>.<j>` (replaced atomically), next to the inputs' fingerprint. A rerun checks
every recorded chunk by reading it back and hashing it: a chunk with no record, or whose stored
bytes no longer match it (a torn write, a corrupted file), is written again; the others are kept.
When every chunk is valid the checksums go into the array's attributes ("duat" -> "chunk_sha256")
and the store is renamed to `path`, so a store at `path` is always complete; `verify_zarr`
re-checks it. An existing store at `path` is replaced only with overwrite=True, when the new one is
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from duat_kernels import _validation as v
from duat_kernels import strict_json
from duat_kernels._files import (as_target_path, check_no_file_on_path, check_writable_folder, keep_modes,
                                 link_target, nearest_existing_folder)
from duat_kernels.analysis.dask_tiles import (NUMPY_DTYPES, _dask, check_chunks, chunk_bounds, factors_token,
                                              operator_delayed, stored_dtype, tile_block)


def _zarr():
    try:
        import zarr
    except ImportError as exc:
        raise ImportError("save_zarr needs zarr: pip install 'duat-kernels[dask]'") from exc
    return zarr


def chunk_sha256(data: np.ndarray) -> str:
    """sha256 of a chunk's bytes in C order (little-endian, the stored dtype)."""
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_region(array, region: tuple[slice, ...]) -> np.ndarray | None:
    """The stored chunk of an opened zarr array (each read goes to the chunk file), or None when it cannot be
    decoded (a torn or corrupted chunk file)."""
    try:
        return array[region]
    except Exception:  # any decoding failure means: write the chunk again
        return None


def write_chunk(op, store: str, record: str, region: tuple[slice, ...], dtype: torch.dtype) -> bool:
    """Write one chunk unless a valid copy is already stored; True if it was written.

    region: (rows, cols) slices, with a leading slice(None) for a batched operator. The store is opened once
    (its metadata read once), for the check and the write; each task opens it in its own process or thread,
    so that any Dask scheduler can run it.
    """
    array, record_path = _zarr().open_array(Path(store), mode="r+"), Path(record)
    if record_path.exists():
        stored = _read_region(array, region)
        if stored is not None and chunk_sha256(stored) == record_path.read_text().strip():
            return False
        record_path.unlink()  # invalid: forget it before rewriting
    r, c = region[-2:]
    data = tile_block(op, r.start, r.stop, c.start, c.stop, dtype)
    array[region] = data
    _write_text(record_path, chunk_sha256(data))
    return True


def save_zarr(op, path: str | os.PathLike, chunks: tuple[int, int] | None = None, *, dtype: torch.dtype | None = None,
              scheduler=None, progress: bool = True, overwrite: bool = False) -> Path:
    """Write the dense W' of an HVOOperator into the zarr array `path`, one Dask task per chunk.

    Args:
        op: HVOOperator, attn (h, N, N_k) or (B, h, N, N_k); the array is (N·M_out, N_k·M_in) (or with
            a leading B, one chunk along B), token or feature layout as the operator's.
        path: the zarr store (a directory) to create; must not exist yet, unless overwrite.
        chunks: (rows, cols) of one chunk (default: square-ish chunks of ~32 MiB).
        dtype: float32, float64 or float16 (default: the inputs' promoted dtype).
        scheduler: passed to dask.compute ("sync", "threads", "processes" or a distributed
            Client); None uses Dask's default, i.e. the current distributed Client if there is one.
        progress: show a tqdm progress bar over chunks.
        overwrite: replace an existing zarr array at `path` (a FileExistsError otherwise, as save_dense
            refuses an existing file or link); the old store stays until the new one is complete, then is
            renamed to `<path>.replaced` and removed; the new store takes its permission bits, as open(path, 'w')
            keeps a file's (_files.keep_modes: the store's folder, and each file or folder at the same place in
            both). A symbolic link at `path` is written through, as save_dense and open(path, 'w') do: the store
            it points to (existing or not) is the one written and replaced, the link stays. Anything else (a
            folder, a file) is never deleted: a FileExistsError.

    Returns:
        The path of the complete store (`path` itself, a link included). A rerun after an interruption
        rewrites only the chunks that are missing or fail their checksum (`<store>.partial` and
        `<store>.progress` sit next to the store written, the link's target for a link).
    """
    dask, zarr = _dask(), _zarr()
    dtype = stored_dtype(op, dtype)
    chunk_rows, chunk_cols = check_chunks(op, chunks, dtype)
    overwrite, progress = v.check_flag("overwrite", overwrite), v.check_flag("progress", progress)
    path = as_target_path("path", path)
    target = link_target("save_zarr", path)  # the store written: path itself, or the one a link at path points to
    if not overwrite and (path.exists() or path.is_symlink()):  # a dangling link too, as save_dense
        raise FileExistsError(f"{path} exists; save_zarr writes a new store (pass overwrite=True to replace it, "
                              "delete it or choose another path)")
    if target.exists() and not _is_zarr_array(target):
        raise FileExistsError(f"{target} exists and is not a zarr array; overwrite=True replaces only a zarr array "
                              "(choose another path)")
    # zarr creates the missing folders: the nearest existing one must take them
    check_no_file_on_path("save_zarr", target)
    folder = nearest_existing_folder(target.parent)
    check_writable_folder("save_zarr", folder)  # zarr failed with 'No such file or directory: <path>.partial'
    partial, progress_dir = Path(f"{target}.partial"), Path(f"{target}.progress")
    fingerprint = {"factors_sha256": factors_token(op), "shape": list(op.shape), "chunks": [chunk_rows, chunk_cols],
                   "dtype": str(dtype), "layout": op.layout}
    fingerprint_file = progress_dir / "fingerprint.json"
    if partial.exists() and fingerprint_file.exists():
        try:
            recorded = json.loads(fingerprint_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # raw JSONDecodeError named no file
            raise ValueError(f"save_zarr: {fingerprint_file} is not a valid progress record ({type(exc).__name__}: "
                             f"{exc}); delete it and {partial} to start again") from None
        if recorded != fingerprint:
            raise ValueError(f"{partial} holds an interrupted run for other inputs or settings; "
                             f"delete it (and {progress_dir}) to start again")
    else:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(progress_dir, ignore_errors=True)
        lead = (op.dims.batch,) if op.dims.batched else ()
        zarr.create_array(partial, shape=tuple(op.shape), chunks=(*lead, chunk_rows, chunk_cols),
                          dtype=NUMPY_DTYPES[dtype], fill_value=0)
        progress_dir.mkdir(parents=True)
        _write_text(fingerprint_file, strict_json.dumps(fingerprint))

    rows, cols = op.shape[-2:]
    lead = (slice(None),) if op.dims.batched else ()
    source = operator_delayed(op)
    write = dask.delayed(write_chunk, pure=False)
    tasks, names = [], []
    for i, (r0, r1) in enumerate(chunk_bounds(rows, chunk_rows)):
        for j, (c0, c1) in enumerate(chunk_bounds(cols, chunk_cols)):
            names.append(f"{i}.{j}")
            tasks.append(write(source, str(partial), str(progress_dir / names[-1]), (*lead, slice(r0, r1), slice(c0, c1)),
                               dtype, dask_key_name=f"zarr-chunk-{fingerprint['factors_sha256'][:16]}-{i}.{j}"))
    _compute_with_progress(dask, tasks, scheduler, progress, f"W' -> {path.name}")

    checksums = {name: (progress_dir / name).read_text().strip() for name in names}
    arr = zarr.open_array(partial, mode="r+")
    arr.attrs["duat"] = {**fingerprint, "chunk_sha256": checksums}
    # overwrite=True (checked above): the old store is renamed away, not deleted in place, so that an interruption
    # leaves path either the old or the new complete store, never a half-deleted one that a rerun refuses
    replaced = Path(f"{target}.replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    if target.exists():
        os.replace(target, replaced)
    os.replace(partial, target)
    if replaced.exists():  # the modes of the store replaced, as open(path, 'w') keeps a file's
        keep_modes(replaced, target)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(progress_dir)
    return path


def _is_zarr_array(path: Path) -> bool:
    """Whether path is the folder of a zarr array (v3 metadata of node_type "array", or v2 .zarray)."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / ".zarray").is_file():
        return True
    try:
        return json.loads((path / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _compute_with_progress(dask, tasks: list, scheduler, progress: bool, desc: str) -> None:
    """dask.compute(*tasks) with a tqdm bar: futures as they complete on a distributed Client,
    a scheduler callback otherwise."""
    from tqdm.auto import tqdm

    client = scheduler if scheduler is not None and hasattr(scheduler, "compute") else None
    if client is None and scheduler is None:
        try:
            from distributed import get_client
            client = get_client()
        except (ImportError, ValueError):
            client = None
    with tqdm(total=len(tasks), unit="chunk", desc=desc, disable=not progress) as bar:
        if client is not None:
            from distributed import as_completed

            for future in as_completed(client.compute(tasks)):
                future.result()  # raises the task's exception, if any
                bar.update(1)
            return
        from dask.callbacks import Callback

        keys = {t.key for t in tasks}
        with Callback(posttask=lambda key, *_: bar.update(1) if key in keys else None):
            dask.compute(*tasks, scheduler=scheduler)


def _checksum_attributes(path: Path, meta) -> tuple[int, int, dict[tuple[int, int], tuple[str, str]]]:
    """The chunk size and {(i, j): (name "i.j", sha256)} of a store's "duat" attributes, checked: damaged
    ones failed with Python's raw errors ("invalid literal for int()", "'list' object has no attribute")."""
    damaged = ValueError(f"{path} has damaged checksum attributes (\"duat\"): {str(meta)[:200]}")
    size, recorded = (meta.get("chunks"), meta.get("chunk_sha256")) if isinstance(meta, dict) else (None, None)
    if not (isinstance(size, list) and len(size) == 2 and all(type(c) is int and c >= 1 for c in size)
            and isinstance(recorded, dict)):
        raise damaged
    sums = {}
    for name, digest in recorded.items():
        parts = name.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not isinstance(digest, str):
            raise damaged
        sums[int(parts[0]), int(parts[1])] = name, digest
    return size[0], size[1], sums


def verify_zarr(path: str | os.PathLike) -> list[str]:
    """Names "i.j" of the chunks of a store written by save_zarr whose bytes no longer match their
    recorded sha256 (an empty list: the store is intact)."""
    zarr = _zarr()
    path = as_target_path("path", path)
    if not path.exists():
        raise FileNotFoundError(f"verify_zarr: {path} does not exist")
    try:
        arr = zarr.open_array(path, mode="r")
    except (zarr.errors.BaseZarrError, ValueError) as exc:  # no array there, a group, unreadable metadata
        raise ValueError(f"{path} is not a zarr array written by save_zarr ({exc})") from exc
    meta = arr.attrs.get("duat")
    if meta is None or (isinstance(meta, dict) and "chunk_sha256" not in meta):
        raise ValueError(f"{path} has no chunk checksums: it was not written by save_zarr")
    chunk_rows, chunk_cols, sums = _checksum_attributes(path, meta)
    lead = (slice(None),) if arr.ndim == 3 else ()
    bad = []
    for (i, j), (name, expected) in sums.items():
        region = (*lead, slice(i * chunk_rows, (i + 1) * chunk_rows), slice(j * chunk_cols, (j + 1) * chunk_cols))
        stored = _read_region(arr, region)  # the array opened once, above: each read still goes to the chunk file
        if stored is None or chunk_sha256(stored) != expected:
            bad.append(name)
    return bad

"""save_zarr resumes by chunk: after an interruption only the missing chunks, and those whose bytes
fail their sha256, are written again; verify_zarr finds corrupted chunks (sync scheduler, no cluster)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis import dask_tiles, zarr_store

zarr = pytest.importorskip("zarr", reason="needs zarr: pip install '.[dask]'")
pytest.importorskip("dask", reason="needs dask: pip install '.[dask]'")

CHUNKS = (12, 14)  # a 7-token, M_out=9, M_in=11 layer: W' is 63 x 77, so 6 x 6 chunks


class Interrupted(Exception):
    pass


@pytest.fixture
def op(layer):
    p = layer(batched=False)
    return dk.HVOOperator(p["attn"], p["w_v"], p["w_o"], num_kv_heads=p["num_kv_heads"])


def _count_tiles(monkeypatch, fail_after: int | None = None) -> list:
    """Count (and optionally stop after) the chunks that save_zarr computes."""
    calls, original = [], dask_tiles.tile_block

    def counting(*args):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(args[1:5])
        return original(*args)

    monkeypatch.setattr(zarr_store, "tile_block", counting)
    return calls


def _chunk_file(store, i: int, j: int):
    return store / "c" / str(i) / str(j)


def test_interrupted_run_redoes_only_missing_and_invalid_chunks(op, tmp_path, monkeypatch):
    path = tmp_path / "w.zarr"
    first = _count_tiles(monkeypatch, fail_after=20)
    with pytest.raises(Interrupted):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)
    assert len(first) == 20 and not path.exists()
    partial = tmp_path / "w.zarr.partial"
    done = sorted((r0 // CHUNKS[0], c0 // CHUNKS[1]) for r0, _, c0, _ in first)
    corrupted, deleted = done[3], done[7]
    _chunk_file(partial, *corrupted).write_bytes(b"\x00" * 16)  # not a valid chunk any more
    _chunk_file(partial, *deleted).unlink()  # lost, although its checksum was recorded

    second = _count_tiles(monkeypatch)
    dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)
    redone = sorted((r0 // CHUNKS[0], c0 // CHUNKS[1]) for r0, _, c0, _ in second)
    all_chunks = [(i, j) for i in range(6) for j in range(6)]
    assert redone == sorted(set(all_chunks) - set(done) | {corrupted, deleted})
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], op.to_dense().numpy())
    assert dk.analysis.verify_zarr(path) == []


def test_each_chunk_task_opens_the_store_once(op, tmp_path, monkeypatch):
    # a chunk whose record failed its check opened the store twice: to read it back, then to write it
    path = tmp_path / "w.zarr"
    first = _count_tiles(monkeypatch, fail_after=20)
    with pytest.raises(Interrupted):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)
    partial = tmp_path / "w.zarr.partial"
    done = sorted((r0 // CHUNKS[0], c0 // CHUNKS[1]) for r0, _, c0, _ in first)
    _chunk_file(partial, *done[0]).write_bytes(b"\x00" * 16)  # recorded, no longer valid
    _chunk_file(partial, *done[1]).unlink()
    opens, real_open, real_write = [], zarr.open_array, zarr_store.write_chunk
    monkeypatch.setattr(zarr, "open_array", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    per_task = []

    def counting_write(*args):
        before = len(opens)
        written = real_write(*args)
        per_task.append(len(opens) - before)
        return written

    monkeypatch.setattr(zarr_store, "write_chunk", counting_write)
    _count_tiles(monkeypatch)
    dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)
    assert len(per_task) == 36 and max(per_task) == 1
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], op.to_dense().numpy())
    assert dk.analysis.verify_zarr(path) == []


def test_verify_finds_a_corrupted_chunk(op, tmp_path):
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    stored = zarr.open_array(path, mode="r+")
    stored[12:24, 14:28] = stored[12:24, 14:28] + 1  # a valid chunk, other bytes
    assert dk.analysis.verify_zarr(path) == ["1.1"]
    meta = stored.attrs["duat"]
    assert meta["chunks"] == list(CHUNKS) and len(meta["chunk_sha256"]) == 36


def test_verify_opens_the_store_once_and_reads_every_chunk_from_disk(op, tmp_path, monkeypatch):
    # verify_zarr opened the store again for each of its chunks (36 opens here; 1024 for 1024 chunks)
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    opens, real_open = [], zarr.open_array
    monkeypatch.setattr(zarr, "open_array", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    assert dk.analysis.verify_zarr(path) == [] and len(opens) == 1
    _chunk_file(path, 2, 3).write_bytes(b"\x00" * 16)  # undecodable
    _chunk_file(path, 5, 0).unlink()  # missing: read as the fill value
    assert sorted(dk.analysis.verify_zarr(path)) == ["2.3", "5.0"] and len(opens) == 2


def test_verify_names_a_path_that_is_no_store(tmp_path):
    # zarr's own errors came out: "No array found in store file://... at path", a JSONDecodeError
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{not json")
    zarr.create_group(tmp_path / "group")
    for name in ("empty", "broken", "group"):
        with pytest.raises(ValueError, match=f"{name} is not a zarr array written by save_zarr"):
            dk.analysis.verify_zarr(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="verify_zarr: .*missing does not exist"):
        dk.analysis.verify_zarr(tmp_path / "missing")
    plain = zarr.create_array(tmp_path / "plain", shape=(2, 2), dtype="f4")
    with pytest.raises(ValueError, match="has no chunk checksums"):
        dk.analysis.verify_zarr(plain.store_path.store.root)
    with pytest.raises(TypeError, match="path must be a file path \\(a str or os.PathLike\\), got int 5"):
        dk.analysis.verify_zarr(5)  # pathlib's "expected str, bytes or os.PathLike object, not int"


def test_save_zarr_names_a_path_that_is_not_one(op):
    with pytest.raises(TypeError, match="path must be a file path \\(a str or os.PathLike\\), got NoneType"):
        dk.analysis.save_zarr(op, None)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be created")
@pytest.mark.parametrize("path", ["/proc/w.zarr", "/proc/missing/w.zarr"])
def test_read_only_folder_is_refused_as_such(op, path):
    # zarr failed with "No such file or directory: '/proc/w.zarr.partial'"
    with pytest.raises(PermissionError, match=r"save_zarr: cannot write in /proc \("):
        dk.analysis.save_zarr(op, path, progress=False)


def test_threads_scheduler_and_float64(layer, tmp_path):
    p = layer(batched=False, dtype=torch.float64, heads=6, kv_heads=3)
    op = dk.HVOOperator(p["attn"], p["w_v"], p["w_o"], num_kv_heads=3, layout="feature")
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=(20, 25), scheduler="threads", progress=False)
    stored = zarr.open_array(path, mode="r")
    assert stored.dtype == np.float64
    np.testing.assert_array_equal(stored[:], op.to_dense().numpy())


def test_resume_with_other_inputs_is_refused(op, layer, tmp_path, monkeypatch):
    path = tmp_path / "w.zarr"
    _count_tiles(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)
    p = layer(batched=False, seed=1)
    other = dk.HVOOperator(p["attn"], p["w_v"], p["w_o"], num_kv_heads=p["num_kv_heads"])
    with pytest.raises(ValueError, match="interrupted run for other inputs"):
        dk.analysis.save_zarr(other, path, chunks=CHUNKS, scheduler="sync", progress=False)
    with pytest.raises(ValueError, match="interrupted run for other inputs"):
        dk.analysis.save_zarr(op, path, chunks=(10, 10), scheduler="sync", progress=False)


def test_existing_store_is_not_overwritten(op, tmp_path):
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    with pytest.raises(FileExistsError, match="exists.*overwrite=True"):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)


def test_overwrite_interrupted_while_removing_the_old_store_resumes(op, tmp_path, monkeypatch):
    # the old store was deleted in place: interrupted part-way (its zarr.json gone), w.zarr was neither store, and
    # the rerun with overwrite=True was refused ("exists and is not a zarr array")
    old = dk.HVOOperator(op.attn, op.w_v * 2, op.w_o, num_kv_heads=op.dims.kv_heads)
    path = dk.analysis.save_zarr(old, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    real_rmtree = zarr_store.shutil.rmtree

    def interrupted_rmtree(target, *args, **kwargs):
        if (Path(target) / "zarr.json").exists() and not str(target).endswith(".partial"):
            (Path(target) / "zarr.json").unlink()  # the first file removed, then Ctrl-C
            raise Interrupted
        real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(zarr_store.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(Interrupted):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True)
    monkeypatch.setattr(zarr_store.shutil, "rmtree", real_rmtree)
    stored = zarr.open_array(path, mode="r")[:]  # a complete store: the old one or the new one
    assert dk.analysis.verify_zarr(path) == []
    assert np.array_equal(stored, op.to_dense().numpy()) or np.array_equal(stored, old.to_dense().numpy())
    assert dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True) == path
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], op.to_dense().numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zarr"]


def test_dangling_link_is_refused_before_the_work(op, tmp_path, monkeypatch):
    # it was taken for a free path: every chunk was computed, then the final rename failed with a raw
    # "NotADirectoryError: [Errno 20] Not a directory", leaving w.zarr.partial and w.zarr.progress behind
    (tmp_path / "w.zarr").symlink_to(tmp_path / "nowhere")
    calls = _count_tiles(monkeypatch)
    with pytest.raises(FileExistsError, match="w.zarr exists"):
        dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["w.zarr"]


@pytest.mark.parametrize("target_exists", [True, False])
def test_overwrite_of_a_link_writes_through_to_its_target(op, tmp_path, target_exists):
    # as save_dense (and open(path, 'w')): a link to a store was refused with overwrite=True ("exists and is not
    # a zarr array"), a dangling one too; the store the link points to is replaced, the link stays
    (tmp_path / "data").mkdir()
    (tmp_path / "links").mkdir()
    target, link = tmp_path / "data" / "real.zarr", tmp_path / "links" / "w.zarr"
    old = dk.HVOOperator(op.attn, op.w_v * 2, op.w_o, num_kv_heads=op.dims.kv_heads)
    if target_exists:
        dk.analysis.save_zarr(old, target, chunks=CHUNKS, scheduler="sync", progress=False)
    link.symlink_to(os.path.join("..", "data", "real.zarr"))  # relative, as `ln -s ../data/real.zarr w.zarr` makes
    with pytest.raises(FileExistsError, match=f"{link} exists.*overwrite=True"):
        dk.analysis.save_zarr(op, link, chunks=CHUNKS, scheduler="sync", progress=False)
    assert dk.analysis.save_zarr(op, link, chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True) == link
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "data", "real.zarr")
    assert not target.is_symlink() and dk.analysis.verify_zarr(target) == []
    np.testing.assert_array_equal(zarr.open_array(target, mode="r")[:], op.to_dense().numpy())
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["real.zarr"]
    assert [p.name for p in (tmp_path / "links").iterdir()] == ["w.zarr"]


@pytest.mark.parametrize("through_link", [False, True], ids=["store", "link"])
def test_overwrite_keeps_the_modes_of_the_store_it_replaces(op, tmp_path, through_link, umask_022):
    # the new store took the default modes (0777 / 0666 & ~umask), not those of the store it replaced, as
    # open(path, 'w') keeps a file's: its folder, and each file or folder that the new store has at the same place
    import stat

    def mode(p):
        return stat.S_IMODE(p.lstat().st_mode)

    target = tmp_path / "real.zarr"
    old = dk.HVOOperator(op.attn, op.w_v * 2, op.w_o, num_kv_heads=op.dims.kv_heads)
    dk.analysis.save_zarr(old, target, chunks=CHUNKS, scheduler="sync", progress=False)
    kept = {target: 0o750, target / "zarr.json": 0o640, _chunk_file(target, 0, 0): 0o600, target / "c" / "1": 0o700}
    for p, m in sorted(kept.items(), key=lambda item: -len(item[0].parts)):  # the files before their folders
        p.chmod(m)
    path = tmp_path / "w.zarr" if through_link else target
    if through_link:
        path.symlink_to(target.name)
    dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(target, mode="r")[:], op.to_dense().numpy())
    assert {p: mode(p) for p in kept} == kept
    assert (mode(_chunk_file(target, 0, 1)), mode(target / "c" / "2")) == (0o644, 0o755)  # default modes as before


def test_a_link_to_what_is_no_store_or_a_loop_of_links_is_refused(op, tmp_path):
    (tmp_path / "file.txt").write_text("keep")
    (tmp_path / "w.zarr").symlink_to(tmp_path / "file.txt")
    with pytest.raises(FileExistsError, match="file.txt exists and is not a zarr array"):
        dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ValueError, match=f"save_zarr: {a} is a symbolic link that leads to no file"):
        dk.analysis.save_zarr(op, a, chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True)
    assert (tmp_path / "file.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr", "file.txt", "w.zarr"]


def test_overwrite_replaces_a_store_and_nothing_else(op, tmp_path):
    old = dk.HVOOperator(op.attn, op.w_v * 2, op.w_o, num_kv_heads=op.dims.kv_heads)
    path = dk.analysis.save_zarr(old, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    assert dk.analysis.save_zarr(op, path, chunks=(10, 10), scheduler="sync", progress=False, overwrite=True) == path
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], op.to_dense().numpy())
    assert dk.analysis.verify_zarr(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["w.zarr"]
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    (folder / "keep").mkdir(parents=True)  # overwrite=True must never delete what is not a zarr array
    file.write_text("keep")
    for target in (folder, file):
        with pytest.raises(FileExistsError, match=f"{target} exists and is not a zarr array"):
            dk.analysis.save_zarr(op, target, chunks=CHUNKS, scheduler="sync", progress=False, overwrite=True)
    assert (folder / "keep").is_dir() and file.read_text() == "keep" and not list(tmp_path.glob("*.partial"))
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        dk.analysis.save_zarr(op, tmp_path / "new.zarr", progress=False, overwrite="no")


@pytest.mark.parametrize("empty,batched", [("m_in", False), ("m_in", True), ("m_out", False), ("m_out", True),
                                           ("batch", True)])
@pytest.mark.parametrize("chunks", [CHUNKS, None], ids=["chunks", "default-chunks"])
def test_empty_operator_gives_an_empty_array(layer, tmp_path, empty, batched, chunks):
    # W' without columns (M_in = 0) or rows (M_out = 0) is accepted by HVOOperator; to_dask and
    # save_zarr failed inside their chunking with "range() arg 3 must not be zero", and an empty batch
    # (B = 0) with the default chunks with ZeroDivisionError (bytes per chunk divided by B)
    p = layer(batch=2, batched=batched)
    attn, w_v, w_o = p["attn"], p["w_v"], p["w_o"]
    if empty == "batch":
        attn = attn[:0]
    else:
        w_v, w_o = (w_v[:, :0], w_o) if empty == "m_in" else (w_v, w_o[:0])
    op = dk.HVOOperator(attn, w_v, w_o, num_kv_heads=p["num_kv_heads"])
    assert op.to_dask(chunks=chunks).compute(scheduler="sync").shape == op.shape
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=chunks, scheduler="sync", progress=False)
    assert zarr.open_array(path, mode="r").shape == op.shape
    assert dk.analysis.verify_zarr(path) == []


def test_dtype_names_and_numpy_chunk_sizes_are_taken(op, tmp_path):
    # dtype="float64" was refused as "dtype must be float32, float64 or float16 ..., got float64"
    # (hvo_matrix and save_dense take names), and chunks of NumPy integers as not positive ints
    got = op.to_dask(chunks=(np.int64(12), np.int32(14)), dtype="float64").compute(scheduler="sync")
    np.testing.assert_array_equal(got, op.to_dense(dtype=torch.float64).numpy())
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=(np.int64(12), 14), dtype="torch.float16",
                                 scheduler="sync", progress=False)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], op.to_dense(dtype=torch.float16).numpy())


@pytest.mark.parametrize("call", [lambda op, path: op.to_dask(chunks=CHUNKS),
                                  lambda op, path: dk.analysis.save_zarr(op, path, scheduler="sync", progress=False)],
                         ids=["to_dask", "save_zarr"])
def test_meta_operator_is_refused(layer, tmp_path, call):
    # it failed deep inside with NotImplementedError "Cannot copy out of meta tensor; no data!"
    p = layer(batched=False)
    op = dk.HVOOperator(*(p[k].to("meta") for k in ("attn", "w_v", "w_o")), num_kv_heads=p["num_kv_heads"])
    with pytest.raises(ValueError, match="needs an HVOOperator on tensors with data .* got meta tensors"):
        call(op, tmp_path / "w.zarr")
    assert not (tmp_path / "w.zarr.partial").exists()


@pytest.mark.parametrize("damage", [{"chunks": "x"}, {"chunks": [12, 0]}, {"chunk_sha256": [1, 2]},
                                    {"chunk_sha256": {"a.b": "0"}}, {"chunk_sha256": {"0.0": 5}}, 5])
def test_verify_names_damaged_checksum_attributes(op, tmp_path, damage):
    """A store whose "duat" attributes were damaged failed in verify_zarr with Python's raw errors ('not
    enough values to unpack', "invalid literal for int() with base 10: 'a'", "'list' object has no
    attribute 'items'", "argument of type 'int' is not iterable")."""
    path = dk.analysis.save_zarr(op, tmp_path / "w.zarr", chunks=CHUNKS, scheduler="sync", progress=False)
    stored = zarr.open_array(path, mode="r+")
    stored.attrs["duat"] = damage if isinstance(damage, int) else {**stored.attrs["duat"], **damage}
    with pytest.raises(ValueError, match=r"w\.zarr has damaged checksum attributes \(\"duat\"\)"):
        dk.analysis.verify_zarr(path)


@pytest.mark.parametrize("name", ["", "  "])
def test_empty_path_is_refused_by_name(op, tmp_path, monkeypatch, name):
    """save_zarr(op, '') said '. exists' (Path('') is the working directory); '  ' wrote a store named '  '."""
    monkeypatch.chdir(tmp_path)
    for call in (lambda: zarr_store.save_zarr(op, name, progress=False), lambda: zarr_store.verify_zarr(name)):
        with pytest.raises(ValueError, match="path is empty"):
            call()
    assert not list(tmp_path.iterdir())


def test_damaged_progress_record_is_named(op, tmp_path, monkeypatch):
    """A damaged <path>.progress/fingerprint.json raised json's raw JSONDecodeError ('Expecting property
    name ...'), naming no file; now a ValueError naming it and what to delete."""
    path = tmp_path / "w.zarr"
    _count_tiles(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)
    record = tmp_path / "w.zarr.progress" / "fingerprint.json"
    record.write_text("{torn")
    with pytest.raises(ValueError, match="fingerprint.json is not a valid progress record.*delete it"):
        dk.analysis.save_zarr(op, path, chunks=CHUNKS, scheduler="sync", progress=False)


@pytest.mark.parametrize("under", ["w.zarr", "sub/w.zarr"], ids=["in_file", "below_file"])
def test_a_file_on_the_path_is_named_as_a_file(op, tmp_path, under):
    # 'afile/w.zarr' with afile a file: "save_zarr: cannot write in afile (Not a directory); choose a writable folder"
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match=rf"save_zarr: {tmp_path / 'afile'} is a file, not a folder"):
        dk.analysis.save_zarr(op, tmp_path / "afile" / under, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

"""save_dense: the file equals the dense W', resumes after an interruption without recomputing
finished tiles, and never leaves a complete-looking file behind an interrupted run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import duat_kernels as dk
from duat_kernels.analysis import save_dense

from conftest import random_layer


class Interrupted(Exception):
    """Stands for a crash or a kill in the middle of the run."""


@pytest.fixture
def op():
    lay = random_layer(1, 4, 2, tokens=9, head_dim=3, m_in=7, m_out=5, causal=True, batched=False)
    return dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"], num_kv_heads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_file_equals_dense(op, tmp_path, dtype):
    path = save_dense(op, tmp_path / "w.npy", rows_per_tile=7, dtype=dtype, progress=False)
    arr = np.load(path)
    assert arr.shape == (45, 63) and arr.dtype == np.dtype(dtype.__str__().split(".")[1])
    assert np.array_equal(arr, op.to_dense(dtype=dtype).numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]


def _interrupt_tiles(op, monkeypatch, fail_on_call: list) -> list:
    """Record the first row of every tile computed, and interrupt the run at call fail_on_call[0] (None: never)."""
    calls, real_tile = [], type(op).tile

    def flaky_tile(self, rows, cols, dtype=None):
        calls.append(rows.start)
        if len(calls) == fail_on_call[0]:
            raise Interrupted("simulated interruption")
        return real_tile(self, rows, cols, dtype)

    monkeypatch.setattr(type(op), "tile", flaky_tile)
    return calls


def test_resumes_after_interruption(op, tmp_path, monkeypatch):
    path = tmp_path / "w.npy"
    fail_on_call = [4]
    calls = _interrupt_tiles(op, monkeypatch, fail_on_call)
    with pytest.raises(Interrupted):
        save_dense(op, path, rows_per_tile=5, progress=False)
    assert not path.exists()  # nothing that looks complete
    assert (tmp_path / "w.npy.partial").exists() and (tmp_path / "w.npy.progress.json").exists()

    calls.clear()
    fail_on_call[0] = None
    save_dense(op, path, rows_per_tile=5, progress=False)
    assert calls == [15, 20, 25, 30, 35, 40]  # tiles 0-2 were not recomputed
    assert np.array_equal(np.load(path), op.to_dense().numpy())
    assert not (tmp_path / "w.npy.partial").exists() and not (tmp_path / "w.npy.progress.json").exists()


def test_refuses_to_resume_other_inputs(op, tmp_path, monkeypatch):
    path = tmp_path / "w.npy"
    monkeypatch.setattr(type(op), "tile", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
    with pytest.raises(Interrupted):
        save_dense(op, path, rows_per_tile=5, progress=False)
    monkeypatch.undo()
    other = dk.HVOOperator(op.attn, op.w_v * 2, op.w_o, num_kv_heads=2)
    with pytest.raises(ValueError, match="holds an interrupted run for other inputs"):
        save_dense(other, path, rows_per_tile=5, progress=False)


def test_bad_arguments(op, tmp_path):
    with pytest.raises(TypeError, match="path must be a file path"):  # was pathlib's "expected str, bytes or ..."
        save_dense(op, 5)
    with pytest.raises(TypeError, match="float32, float64 or float16"):
        save_dense(op, tmp_path / "w.npy", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row of W' takes"):
        save_dense(op, tmp_path / "w.npy", max_tile_bytes=16)
    # max_tile_bytes was not checked: "1" failed in a comparison (TypeError "'>' not supported"), 100.5
    # was blamed on rows_per_tile ("rows_per_tile must be a positive int, got 2.0")
    for bad in ("1", 100.5, 0, True):
        with pytest.raises(ValueError, match=f"max_tile_bytes must be a positive int, got {bad!r}"):
            save_dense(op, tmp_path / "w.npy", max_tile_bytes=bad)
    with pytest.raises(ValueError, match="rows_per_tile must be a positive int, got 2.5"):
        save_dense(op, tmp_path / "w.npy", rows_per_tile=2.5)
    with pytest.raises(TypeError, match="save_dense needs an HVOOperator .*, got Tensor"):  # was AttributeError 'dims'
        save_dense(op.attn, tmp_path / "w.npy")
    with pytest.raises(TypeError, match="progress must be True or False, got str 'no'"):  # "no" showed the bar
        save_dense(op, tmp_path / "w.npy", progress="no")


def _interrupt_after(op, monkeypatch, tiles: int):
    calls = []
    real_tile = type(op).tile

    def flaky_tile(self, rows, cols, dtype=None):
        calls.append(rows.start)
        if len(calls) > tiles:
            raise Interrupted("simulated interruption")
        return real_tile(self, rows, cols, dtype)

    monkeypatch.setattr(type(op), "tile", flaky_tile)
    return calls


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_partial_tiles_are_redone(op, tmp_path, monkeypatch, damage):
    path = tmp_path / "w.npy"
    _interrupt_after(op, monkeypatch, 4)
    with pytest.raises(Interrupted):
        save_dense(op, path, rows_per_tile=5, progress=False)
    monkeypatch.undo()
    partial = tmp_path / "w.npy.partial"
    size = partial.stat().st_size
    if damage == "truncate":  # only 12 rows left: recorded tiles 2 and 3 (rows 10-19) lost
        os.truncate(partial, size - (45 - 12) * 63 * 4)
    else:  # a byte changed inside tile 1
        with open(partial, "r+b") as f:
            f.seek(size - (45 - 7) * 63 * 4)
            f.write(b"\x01")
    calls = _interrupt_after(op, monkeypatch, 100)
    with pytest.warns(RuntimeWarning, match="changed on disk"):
        save_dense(op, path, rows_per_tile=5, progress=False)
    redone = {"truncate": [10, 15], "overwrite": [5]}[damage]
    assert calls == sorted(redone + [20, 25, 30, 35, 40])  # the damaged tiles and the missing ones, only
    assert np.array_equal(np.load(path), op.to_dense().numpy())


def test_corrupt_progress_record_is_a_clear_error(op, tmp_path, monkeypatch):
    path = tmp_path / "w.npy"
    _interrupt_after(op, monkeypatch, 2)
    with pytest.raises(Interrupted):
        save_dense(op, path, rows_per_tile=5, progress=False)
    (tmp_path / "w.npy.progress.json").write_text('{"fingerprint": "abc", "ti')
    with pytest.raises(ValueError, match=r"w.npy.progress.json is not a valid progress record .*delete it and"):
        save_dense(op, path, rows_per_tile=5, progress=False)


def test_directory_target_is_refused_before_writing(op, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="is a directory; pass a file path"):
        save_dense(op, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        save_dense(op, tmp_path / "missing" / "w.npy", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be created")
def test_read_only_folder_is_refused_as_such():
    # it was 'needs 11.1 KiB but only 0 B is free on its disk' (a DenseTooLargeError), root or not
    with pytest.raises(PermissionError, match=r"save_dense: cannot write in /proc \("):
        save_dense(dk.HVOOperator(torch.ones(1, 2, 2) / 2, torch.eye(3), torch.eye(3)), "/proc/w.npy", progress=False)


def test_free_disk_space_is_checked_before_writing(op, tmp_path, monkeypatch):
    real = os.statvfs(tmp_path)
    small = type("statvfs", (), {"f_bavail": 1, "f_frsize": real.f_frsize})
    monkeypatch.setattr(os, "statvfs", lambda _path: small)
    with pytest.raises(dk.DenseTooLargeError, match=r"needs 11\.1 KiB but only .* is free on its disk"):
        save_dense(op, tmp_path / "w.npy", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_huge_shape_is_refused_clearly(tmp_path):
    attn = torch.full((1, 1, 1), 1.0).expand(1, 4096, 4096)  # no memory behind the expansion
    op = dk.HVOOperator(attn, torch.zeros(4096, 4096), torch.zeros(4096, 4096))
    with pytest.raises(dk.DenseTooLargeError, match=r"needs 1\.0 PiB but only"):
        save_dense(op, tmp_path / "w.npy", max_tile_bytes=1 << 40, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("empty", ["m_in", "m_out"])
def test_empty_operator_gives_an_empty_file(tmp_path, empty):
    # W' without columns (M_in = 0) failed with ZeroDivisionError (rows per tile from 0-byte rows)
    lay = random_layer(1, 2, tokens=5, m_in=3, m_out=4, batched=False)
    w_v, w_o = (lay["w_v"][:, :0], lay["w_o"]) if empty == "m_in" else (lay["w_v"], lay["w_o"][:0])
    op = dk.HVOOperator(lay["attn"], w_v, w_o)
    path = save_dense(op, tmp_path / "w.npy", progress=False)
    assert np.load(path).shape == op.shape


def test_numpy_rows_per_tile_is_taken(op, tmp_path):
    # a NumPy integer (e.g. from a computed split) was refused as not a positive int
    path = save_dense(op, tmp_path / "w.npy", rows_per_tile=np.int64(10), progress=False)
    np.testing.assert_array_equal(np.load(path), op.to_dense().numpy())


def test_negated_views_are_written_and_fingerprinted_by_value(tmp_path):
    """Inputs with the negative bit set (torch._neg_view, x.conj().imag), which hvo_matrix and the
    operator take, failed in the resume fingerprint with torch's raw 'torch.Tensor.view is not supported
    for tensors with negative bit set'; they are hashed by value, as their plain copies."""
    from duat_kernels.analysis.out_of_core import _fingerprint

    lay = random_layer(1, 2, tokens=4, head_dim=2, m_in=3, m_out=3, batched=False)
    plain = dk.HVOOperator(lay["attn"], lay["w_v"], lay["w_o"])
    negated = dk.HVOOperator(torch._neg_view(-lay["attn"]), torch._neg_view(-lay["w_v"]), lay["w_o"])
    path = save_dense(negated, tmp_path / "w.npy", rows_per_tile=5, progress=False)
    np.testing.assert_array_equal(np.load(path), plain.to_dense().numpy())
    assert _fingerprint(negated, torch.float32, 5) == _fingerprint(plain, torch.float32, 5)


@pytest.mark.parametrize("name", ["", "  "])
def test_empty_path_is_refused_by_name(op, tmp_path, monkeypatch, name):
    """save_dense(op, '') said '. is a directory'; '  ' wrote the files '  .partial' and then '  '."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path is empty"):
        save_dense(op, name, progress=False)
    assert not list(tmp_path.iterdir())


def test_existing_file_is_refused_unless_overwrite(op, tmp_path):
    # save_dense replaced an existing file silently, while save_zarr refused an existing store
    path = tmp_path / "w.npy"
    path.write_bytes(b"not W'")
    with pytest.raises(FileExistsError, match=f"{path} exists.*overwrite=True"):
        save_dense(op, path, progress=False)
    assert path.read_bytes() == b"not W'" and sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]
    assert save_dense(op, path, rows_per_tile=7, overwrite=True, progress=False) == path
    np.testing.assert_array_equal(np.load(path), op.to_dense().numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        save_dense(op, path, overwrite="yes", progress=False)


@pytest.mark.parametrize("target_exists", [True, False])
def test_overwrite_of_a_link_writes_through_to_its_target(op, tmp_path, target_exists):
    # the link at path was replaced by a regular file and the .npy it pointed to was left as it was
    (tmp_path / "data").mkdir()
    (tmp_path / "links").mkdir()
    target, link = tmp_path / "data" / "real.npy", tmp_path / "links" / "w.npy"
    if target_exists:
        target.write_bytes(b"not W'")
    link.symlink_to(os.path.join("..", "data", "real.npy"))  # relative, as `ln -s ../data/real.npy w.npy` makes
    with pytest.raises(FileExistsError, match=f"{link} exists.*overwrite=True"):  # a dangling link is a file too
        save_dense(op, link, progress=False)
    assert save_dense(op, link, rows_per_tile=7, overwrite=True, progress=False) == link
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "data", "real.npy")
    assert not target.is_symlink()
    np.testing.assert_array_equal(np.load(target), op.to_dense().numpy())
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["real.npy"]
    assert [p.name for p in (tmp_path / "links").iterdir()] == ["w.npy"]


@pytest.mark.parametrize("through_link", [False, True], ids=["file", "link"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o600], ids=["0640", "0604", "0600"])
def test_overwrite_keeps_the_mode_of_the_file_it_replaces(op, tmp_path, mode, through_link, umask_022):
    # the new file took the mode of its .partial (0666 & ~umask), not the mode of the file it replaced, which
    # open(path, 'w') keeps; a new file still gets 0666 & ~umask
    import stat

    target, new = tmp_path / "real.npy", tmp_path / "new.npy"
    target.write_bytes(b"not W'")
    target.chmod(mode)
    path = tmp_path / "w.npy" if through_link else target
    if through_link:
        path.symlink_to(target.name)
    save_dense(op, path, rows_per_tile=7, overwrite=True, progress=False)
    save_dense(op, new, rows_per_tile=7, progress=False)
    np.testing.assert_array_equal(np.load(target), op.to_dense().numpy())
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


def test_a_loop_of_links_is_refused(op, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ValueError, match=f"save_dense: {a} is a symbolic link that leads to no file"):
        save_dense(op, a, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]


def test_overwrite_keeps_the_old_file_until_the_new_one_is_complete_and_resumes(op, tmp_path, monkeypatch):
    path = tmp_path / "w.npy"
    old = save_dense(dk.HVOOperator(op.attn, op.w_v * 2, op.w_o, num_kv_heads=2), path, progress=False)
    old_bytes = old.read_bytes()
    fail_on_call = [3]
    calls = _interrupt_tiles(op, monkeypatch, fail_on_call)
    with pytest.raises(Interrupted):
        save_dense(op, path, rows_per_tile=5, overwrite=True, progress=False)
    assert path.read_bytes() == old_bytes  # the complete old file is untouched by the interrupted run
    with pytest.raises(FileExistsError, match="exists"):  # resuming does not drop the refusal
        save_dense(op, path, rows_per_tile=5, progress=False)
    calls.clear()
    fail_on_call[0] = None
    save_dense(op, path, rows_per_tile=5, overwrite=True, progress=False)
    assert calls == [10, 15, 20, 25, 30, 35, 40]  # resumed: tiles 0 and 1 were not recomputed
    np.testing.assert_array_equal(np.load(path), op.to_dense().numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]


@pytest.mark.parametrize("under", ["w.npy", "sub/w.npy"], ids=["in_file", "below_file"])
def test_a_file_on_the_path_is_named_as_a_file(op, tmp_path, under):
    # 'afile/w.npy' with afile a file: "the folder afile of afile/w.npy does not exist; create it first"
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match=rf"save_dense: {tmp_path / 'afile'} is a file, not a folder"):
        save_dense(op, tmp_path / "afile" / under, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

"""_files: one empty-path refusal, "<argument> is empty; <what to give>", for files and stores
(as_target_path), output folders (check_output_folder) and models (zoo.local_model); the stale outputs of an
earlier run (remove_stale_outputs)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from duat_kernels import _files
from duat_kernels.models import zoo

REFUSALS = {
    "target": (lambda p: _files.as_target_path("store", p),
               "store is empty; give a file path such as 'w.npy' or 'w.zarr' (got {p!r})"),
    "folder": (lambda p: _files.check_output_folder("--out", p), "--out is empty; give a folder"),
    "model": (lambda p: zoo.local_model(p), "the model name or path is empty; expected 'minilm', 'smollm2', a local "
                                            "folder with config.json and weights, or a .gguf file"),
}


@pytest.mark.parametrize("empty", ["", "  ", "\t\n"], ids=["empty", "spaces", "whitespace"])
@pytest.mark.parametrize("where", REFUSALS)
def test_empty_paths_are_refused_alike_by_name(where, empty, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, message = REFUSALS[where]
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(p=empty))}$"):
        call(empty)
    assert not list(tmp_path.iterdir())  # the working directory was not taken for the path


@pytest.mark.parametrize("path", ["w.npy", " w.npy", Path("a") / "b", "."],
                         ids=["name", "leading-space", "path", "dot"])
def test_a_given_path_passes(path):
    _files.check_nonempty_path("path", path, "give a path")


def test_remove_stale_outputs_deletes_only_what_the_same_command_recorded(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.png", "b.png", "c.json", "mine.png"):
        (out / name).write_text(name)
    _files.remove_stale_outputs(out, "duat markov", [out / "a.png", out / "b.png"])
    _files.remove_stale_outputs(out, "duat claims", [out / "c.json"])  # another command into the same folder
    _files.remove_stale_outputs(out, "duat markov", [out / "a.png"])
    assert sorted(p.name for p in out.iterdir()) == [".duat-outputs.json", "a.png", "c.json", "mine.png"]
    _files.remove_stale_outputs(out, "duat claims", [])
    assert sorted(p.name for p in out.iterdir()) == [".duat-outputs.json", "a.png", "mine.png"]


@pytest.mark.parametrize("manifest", ['{"duat markov": ["../outside.txt", "link.png", "sub", ".duat-outputs.json"]}',
                                      "not json", '["a.png"]', '{"duat markov": "a.png"}'])
def test_remove_stale_outputs_never_leaves_the_folder_or_trusts_a_damaged_manifest(tmp_path, manifest):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("keep")
    (out / "a.png").write_text("keep")
    (out / "link.png").symlink_to(out / "a.png")
    (out / _files.OUTPUTS_MANIFEST).write_text(manifest)
    _files.remove_stale_outputs(out, "duat markov", [])
    assert (tmp_path / "outside.txt").exists() and (out / "a.png").exists() and (out / "link.png").is_symlink()
    assert (out / "sub").is_dir() and not list(out.glob("*.tmp"))


def test_remove_stale_outputs_leaves_no_temporary_file_when_the_manifest_cannot_be_replaced(tmp_path):
    """A folder named .duat-outputs.json: os.replace failed with '[Errno 21] Is a directory', after
    .duat-outputs.json.tmp had been written, and the temporary file stayed in the output folder."""
    out = tmp_path / "out"
    (out / _files.OUTPUTS_MANIFEST).mkdir(parents=True)
    (out / "a.png").write_text("a")
    with pytest.raises(ValueError, match=f"{_files.OUTPUTS_MANIFEST} is not a file"):
        _files.remove_stale_outputs(out, "duat markov", [out / "a.png"])
    assert sorted(p.name for p in out.iterdir()) == [_files.OUTPUTS_MANIFEST, "a.png"]


def test_concurrent_runs_into_one_folder_do_not_share_a_temporary_manifest(tmp_path, monkeypatch):
    """Two runs recording their outputs at once: both wrote .duat-outputs.json.tmp, the first rename moved the second
    run's file, and the second rename failed with FileNotFoundError. Here another run records while this one renames."""
    out = tmp_path / "out"
    out.mkdir()
    real_replace, interleaved = os.replace, []

    def replace_after_another_run(src, dst):
        if not interleaved:
            interleaved.append(src)
            _files.remove_stale_outputs(out, "duat claims", [out / "c.json"])
        real_replace(src, dst)

    monkeypatch.setattr(_files.os, "replace", replace_after_another_run)
    monkeypatch.setattr(_files, "fcntl", None)  # no lock (a platform without fcntl): the runs can interleave
    _files.remove_stale_outputs(out, "duat markov", [out / "a.png"])
    assert interleaved and sorted(p.name for p in out.iterdir()) == [_files.OUTPUTS_MANIFEST]
    assert json.loads((out / _files.OUTPUTS_MANIFEST).read_text()) == {"duat markov": ["a.png"]}  # the last rename


def test_concurrent_runs_into_one_folder_both_record_their_outputs(tmp_path, monkeypatch):
    """Two runs read, edited and wrote .duat-outputs.json without a lock: both read it before either wrote, and the
    later rename dropped the other run's entry. Here each run pauses between reading and writing; both entries stay,
    and the lock file is gone afterwards."""
    import threading
    import time

    out = tmp_path / "out"
    out.mkdir()
    real_read = _files._recorded_outputs

    def slow_read(manifest):
        recorded = real_read(manifest)
        time.sleep(0.2)  # the other run reads now, unless a lock keeps it waiting
        return recorded

    monkeypatch.setattr(_files, "_recorded_outputs", slow_read)
    errors = []

    def record(command, name):
        try:
            _files.remove_stale_outputs(out, command, [out / name])
        except BaseException as exc:  # shown by the assertion below, not lost in the thread
            errors.append(exc)

    runs = [threading.Thread(target=record, args=args) for args in (("duat markov", "a.png"), ("duat claims", "c.json"))]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert errors == []
    assert json.loads((out / _files.OUTPUTS_MANIFEST).read_text()) == {"duat claims": ["c.json"],
                                                                       "duat markov": ["a.png"]}
    assert sorted(p.name for p in out.iterdir()) == [_files.OUTPUTS_MANIFEST]


def test_the_manifest_gets_the_mode_of_a_file_written_in_place(tmp_path, umask_022):
    # written as .duat-outputs.json.tmp by write_text (0o666 & ~umask); a temporary file from tempfile is 0o600
    _files.remove_stale_outputs(tmp_path, "duat markov", [])
    assert stat.S_IMODE((tmp_path / _files.OUTPUTS_MANIFEST).stat().st_mode) == 0o644


def test_check_output_folder_names_a_link_to_a_missing_folder(tmp_path):
    """A dangling link as the output folder was refused as 'the folder cannot be created or written (File exists)'."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing" / "folder")
    message = r"--out .*out: .*out is a symbolic link to .*missing/folder, which does not exist"
    with pytest.raises(ValueError, match=message):
        _files.check_output_folder("--out", link)
    assert link.is_symlink() and not (tmp_path / "missing").exists()

"""Files and folders: path arguments, output folders checked before the work, and how a writer treats the
file it replaces (its permission bits, a symbolic link at its path, the stale outputs of an earlier run)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the manifest is then edited without a lock
    fcntl = None


def check_plot_format(option: str, path) -> None:
    """A plot file whose extension matplotlib writes (none: PNG), checked before the work: .jgp or .bogus
    failed in savefig after the whole sweep or every layer had been computed."""
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # the plotting code says what to install
        return
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if suffix and suffix not in formats:
        raise ValueError(f"{option} {path}: matplotlib cannot write .{suffix} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def as_path(name: str, path):
    """path (a str or os.PathLike) as a pathlib.Path; anything else is a TypeError that names it (pathlib's own
    "expected str, bytes or os.PathLike object, not int" named nothing)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (a str or os.PathLike), got {type(path).__name__} {path!r}")
    return Path(path)


def check_nonempty_path(name: str, path, fix: str) -> None:
    """Refuse an empty or blank path (a str or os.PathLike) with a ValueError "<name> is empty; <fix>": Path('')
    is '.', so the working directory was taken for the file, store, folder or model ('' gave save_zarr '. exists',
    save_dense '. is a directory'), and ' ' made a store named ' '."""
    if not os.fspath(path).strip():
        raise ValueError(f"{name} is empty; {fix}")


def as_target_path(name: str, path):
    """as_path for a file or store to write or read; an empty or blank name is refused (check_nonempty_path)."""
    path_ = as_path(name, path)
    check_nonempty_path(name, path, f"give a file path such as 'w.npy' or 'w.zarr' (got {path!r})")
    return path_


def _umask() -> int:
    """The process's umask: from /proc (Linux), else by setting and restoring it (os.umask has no getter)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_mode(path) -> int:
    """The permission bits open(path, 'w') leaves a file with: an existing file's own (through links), 0o666 &
    ~umask for a new one. For writers that create a temporary file (mode 0600) and rename it over path."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def keep_modes(replaced: Path, new: Path) -> None:
    """Give `new`, a folder that has just replaced the folder `replaced` (a zarr store), the permission bits of what
    it replaced, as open(path, 'w') keeps an existing file's: the folder's, and those of each file or folder in it
    that has a counterpart at the same place in `replaced` (links are left alone); the others keep theirs.
    Innermost first, so that a folder made unsearchable does not hide its entries."""
    for folder, dirs, files in os.walk(new, topdown=False):
        inner = Path(folder).relative_to(new)
        for name in (*dirs, *files):
            _copy_mode(replaced / inner / name, Path(folder) / name)
    _copy_mode(replaced, new)


def _copy_mode(source: Path, destination: Path) -> None:
    """source's permission bits onto destination, unless either is a link or source is missing."""
    try:
        mode = os.lstat(source).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISLNK(mode) and not destination.is_symlink():
        os.chmod(destination, stat.S_IMODE(mode))


def link_target(what: str, path: Path) -> Path:
    """path, or for a symbolic link (through any number of links) what it points to, existing or not: the file or
    store a writer replaces, as open(path, 'w') writes through a link. A loop of links is a ValueError."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # a loop of links
        raise ValueError(f"{what}: {path} is a symbolic link that leads to no file ({exc})") from None


def nearest_existing_folder(path, missing: list | None = None) -> str:
    """The nearest of path (made absolute) and its parents that exists: where os.makedirs(path) would create the
    missing folders (a file, if one is in the way). `missing`, if given, receives those folders, innermost first."""
    existing = os.path.abspath(os.fspath(path))
    while not os.path.exists(existing):
        if missing is not None:
            missing.append(existing)
        existing = os.path.dirname(existing)
    return existing


def check_no_file_on_path(what: str, path) -> None:
    """Refuse a path to write whose folders run through a file ('afile/w.npy', afile a file): a NotADirectoryError
    "<what>: <file> is a file, not a folder". Writers said that the folder afile did not exist, or that they could
    not write in afile (Not a directory)."""
    existing = nearest_existing_folder(Path(path).parent)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what}: {existing} is a file, not a folder, on the path {path}; give a path "
                                 "through folders")


def check_writable_folder(what: str, folder) -> None:
    """Refuse, before any work, an existing folder in which no file can be created (a read-only file system,
    no write permission, /proc): a PermissionError "<what>: cannot write in <folder> (<reason>)". Tried with a
    temporary file: os.access says yes to root on read-only or virtual file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PermissionError(f"{what}: cannot write in {folder} ({exc.strerror or exc}); choose a writable "
                              "folder") from None


def check_output_file(option: str, path) -> None:
    """Refuse, before any work, an output file that cannot be written (a ValueError, or the PermissionError of
    check_writable_folder): a folder, a path whose folder does not exist, a folder in which no file can be created
    (/proc, a read-only file system), an existing file without write permission. A symbolic link is written
    through: its target's folder must exist. `duat scale --plot /proc/x.png` ran the whole sweep first, then
    failed on the plot. An empty or blank name is refused as such (it was '--plot : is a directory', Path('') being
    the working directory)."""
    check_nonempty_path(option, path, "give a file name")
    target = link_target(option, Path(path))
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the directory {str(parent)!r} does not exist")
    check_writable_folder(f"{option} {path}", parent)  # os.access says yes to root on /proc or read-only mounts
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path}: not writable")


OUTPUTS_MANIFEST = ".duat-outputs.json"  # {command: [names of the files its last run wrote into the folder]}


def _recorded_outputs(manifest: Path) -> dict[str, list[str]]:
    """The manifest's {command: [file names]}; {} when there is none or it is damaged (then nothing is deleted)."""
    import json

    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {command: [n for n in names if isinstance(n, str)] for command, names in recorded.items()
            if isinstance(command, str) and isinstance(names, list)}


def _locked_file(path: Path) -> int | None:
    """A descriptor of the file at path (created if missing) holding an exclusive flock, or None where it cannot be
    opened or the file system has no flock (some network mounts). A lock taken on a file that another run has
    meanwhile deleted (see _manifest_lock) is dropped and taken again on the file now at path."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:  # deleted by the run that held it
            pass
        except OSError:
            os.close(fd)
            return None
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _manifest_lock(folder: Path):
    """Hold an exclusive advisory lock (flock) on folder/.duat-outputs.json.lock for the manifest's read-edit-write,
    then delete the lock file, so none stays in the folder. Without fcntl (Windows), or where the lock cannot be
    taken, the manifest is edited without one."""
    path = folder / (OUTPUTS_MANIFEST + ".lock")
    fd = _locked_file(path) if fcntl is not None else None
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still locked: a run waiting on this file finds it gone, locks anew
            os.close(fd)


def remove_stale_outputs(folder, command: str, written) -> None:
    """Delete the files of folder that the previous run of `command` ("duat markov") wrote there and this one
    did not write again (written: paths in folder), then record this run's files in folder/.duat-outputs.json
    (OUTPUTS_MANIFEST, one list per command). An earlier run's outputs would otherwise sit beside reports that no
    longer describe them; files no duat run recorded (a user's own density.png), other commands' outputs, links
    and folders are never removed."""
    folder = Path(folder)
    with _manifest_lock(folder):  # runs into the same folder at once: each reads what the other wrote
        _update_outputs(folder, command, written)


def _update_outputs(folder: Path, command: str, written) -> None:
    """remove_stale_outputs's read-edit-write of the manifest, under its lock."""
    import json

    manifest = folder / OUTPUTS_MANIFEST
    if manifest.exists() and not manifest.is_file():  # os.replace cannot put the record there
        raise ValueError(f"{manifest} is not a file (duat's record of the files it wrote in {folder} goes there); "
                         "move it away and run again")
    recorded = _recorded_outputs(manifest)
    names = sorted({Path(p).name for p in written})
    for name in set(recorded.get(command, ())) - set(names):
        path = folder / name
        bare = name == Path(name).name and name not in ("", ".", "..", OUTPUTS_MANIFEST)  # nothing outside folder
        if bare and path.is_file() and not path.is_symlink():
            path.unlink()
    recorded[command] = names
    # a temporary file of its own (runs into the same folder at once renamed one another's), in the mode that
    # writing the manifest in place gives
    fd, tmp = tempfile.mkstemp(prefix=OUTPUTS_MANIFEST + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), open_mode(manifest))
            f.write(json.dumps(recorded, indent=1, sort_keys=True))
        os.replace(tmp, manifest)
    finally:
        Path(tmp).unlink(missing_ok=True)  # left only by a failed write or replace


def check_output_folder(option: str, path) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: a file on its path,
    or an empty name (check_nonempty_path: the working directory would take the outputs). The folders it creates
    to find out are removed again (the command creates them when it writes): a run refused later, a model that
    does not load, leaves no empty folder behind."""
    check_nonempty_path(option, path, "give a folder")
    folder = os.path.abspath(os.fspath(path))
    missing: list[str] = []
    existing = nearest_existing_folder(folder, missing)
    if missing and os.path.islink(missing[-1]):  # a dangling link on the path: os.makedirs fails with 'File exists'
        raise ValueError(f"{option} {path}: {missing[-1]} is a symbolic link to {os.path.realpath(missing[-1])}, "
                         "which does not exist; create that folder or give another")
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable")
    try:  # os.access says yes to root on read-only or virtual file systems (/proc): create and write to see
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: the folder cannot be created or written ({exc.strerror or exc})") from None
    finally:
        for created in missing:
            try:
                os.rmdir(created)
            except OSError:  # not created, or no longer empty
                pass

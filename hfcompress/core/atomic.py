"""Atomic folder writes: what hfcompress saves appears complete or not at all.

Every save (a quantized checkpoint, a recipe stage, the reference-teacher cache, a distillation checkpoint and
its final model) is written into a hidden staging folder beside its target, its files are hashed into a
manifest (:mod:`hfcompress.core.manifest`) and flushed to disk, and only then is it renamed into place. A
process killed at any moment (SIGKILL, power cut after the flush) leaves the previous complete output or none:
never a folder that loads but holds half a model.

* :func:`atomic_folder` publishes a whole folder: ``rename(2)`` onto an absent or empty target, or an atomic
  exchange with a non-empty one (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, with a
  killed swap restored on the next save).
* :func:`publish_files` publishes files into a folder that also holds other things (a ``Trainer``'s output
  folder with its ``checkpoint-*`` folders): the old ``config.json`` goes first, the new one comes last, so the
  folder is a loadable model only when every file of the new save is in place.

Staging folders carry the writer's pid; ones left by a dead process are removed by the next save to the same
target.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import inspect
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import HFCompressError
from .manifest import MANIFEST_FILE, read_manifest, write_manifest

logger = logging.getLogger(__name__)

STAGING_TAG = ".tmp-"   # .<name>.tmp-<pid>-<random>: being written
BACKUP_TAG = ".old-"    # .<name>.old-<pid>-<random>: the previous output while it is being replaced
COMMIT_FILE = "config.json"  # what makes a folder loadable with from_pretrained
# Weight files of a previous save that a new save into the same folder must not leave behind.
WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")


class CheckpointExistsError(HFCompressError):
    """The destination folder already holds files and overwrite was not requested."""


class OutputInUseError(HFCompressError):
    """Another process is writing the same output (it holds the output's lock)."""


LOCK_TAG = ".lock"  # .<name>.lock beside an output while a run that resumes into a fixed staging folder writes it


@contextlib.contextmanager
def exclusive_output(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` for the block (``flock`` on ``.<name>.lock`` beside it).

    For writers whose staging folder has a fixed name so that a killed run can resume (streaming
    quantization): two runs into the same output would otherwise write into one staging folder. A second run
    raises :class:`OutputInUseError` at once, naming the holder's pid; the lock dies with its process, so a
    killed run never leaves a stale one (its file, if left, is reused)."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}{LOCK_TAG}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputInUseError(f"{target} is being written by another hfcompress run (pid {holder}); wait "
                                   f"for it to finish, or write to another folder") from None
        try:  # the file may have been unlinked by a holder that just released it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def locked_output(parameter: str):
    """Decorator: run the function under :func:`exclusive_output` of its argument named ``parameter``."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with exclusive_output(signature.bind(*args, **kwargs).arguments[parameter]):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def check_destination(target: Path, overwrite: bool) -> None:
    if target.is_symlink():
        raise CheckpointExistsError(f"cannot save to {str(target)!r}: it is a symbolic link; save to a real folder")
    if target.exists() and not target.is_dir():
        raise CheckpointExistsError(f"cannot save to {str(target)!r}: it is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointExistsError(f"{str(target)!r} is not empty; choose another folder or pass overwrite=True "
                                    "(--overwrite) to replace it")


# --------------------------------------------------------------------------------------------------------
# Small filesystem primitives
# --------------------------------------------------------------------------------------------------------
def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(path: Path, tag: str) -> int | None:
    try:
        return int(path.name.rpartition(tag)[2].split("-")[0])
    except ValueError:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so the rename never publishes unwritten data."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root) / name)
        _fsync(Path(root))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc/Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def interrupted_saves(target: str | os.PathLike) -> list[Path]:
    """Staging folders of ``target`` left by processes that no longer run (the next save removes them)."""
    target = Path(target)
    return sorted(p for p in target.parent.glob(f".{target.name}{STAGING_TAG}*")
                  if (pid := _owner_pid(p, STAGING_TAG)) is not None and not _pid_alive(pid))


def clean_stale(target: Path) -> None:
    """Remove staging folders of ``target`` left by dead processes; put back a previous output whose
    replacement was killed between its two renames (only where the atomic exchange is unavailable)."""
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(f".{target.name}{BACKUP_TAG}*"):
        pid = _owner_pid(path, BACKUP_TAG)
        if pid is None or _pid_alive(pid):
            continue
        if not target.exists():
            logger.warning("restoring %s from %s (a replacement of it was interrupted)", target, path.name)
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in interrupted_saves(target):
        logger.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------------
def publish(staged: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False,
            manifest: bool = True) -> Path:
    """Move the finished folder ``staged`` to ``target`` in one atomic step (manifest written, data flushed).

    ``staged`` must be on the same filesystem as ``target`` (a sibling). A non-empty ``target`` is replaced only
    with ``overwrite=True``; otherwise :class:`CheckpointExistsError` is raised and ``staged`` is left as is.
    """
    staged, target = Path(staged), Path(target)
    if manifest:
        write_manifest(staged)
    fsync_tree(staged)
    check_destination(target, overwrite)  # the target may have been filled meanwhile
    if target.is_dir() and any(target.iterdir()):
        if _exchange(staged, target):
            shutil.rmtree(staged, ignore_errors=True)  # now holds the previous output
        else:
            backup = _sibling(target, BACKUP_TAG)
            os.replace(target, backup)
            os.replace(staged, target)
            shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staged, target)  # rename(2) replaces an empty folder atomically
    _fsync(target.parent)
    return target


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False, manifest: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block finishes, publish it as ``target``.

    An exception (or a kill) inside the block leaves ``target`` as it was. ``target`` must not be a non-empty
    folder unless ``overwrite=True`` (checked before and after the block)::

        with atomic_folder("out/model") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    """
    target = Path(target).expanduser().absolute()
    check_destination(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    staged = _sibling(target, STAGING_TAG)
    staged.mkdir()
    try:
        yield staged
        publish(staged, target, overwrite=overwrite, manifest=manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def publish_files(staged: str | os.PathLike, folder: str | os.PathLike, commit_file: str = COMMIT_FILE) -> Path:
    """Move every file of ``staged`` into ``folder``, which may hold other things that must stay.

    Order: the staged files are hashed and flushed; ``folder``'s ``commit_file`` (``config.json``) and manifest
    are removed, so the folder stops being a loadable model; the previous save's files that this one does not
    rewrite are removed (those in its manifest, and stale weight shards); the new files are moved in, then the
    manifest, then ``commit_file`` last. Killed at any point, ``folder`` is the previous complete save, a folder
    without ``config.json`` (which nothing loads), or the new complete save.
    """
    staged, folder = Path(staged), Path(folder)
    write_manifest(staged)
    fsync_tree(staged)
    new = {path.relative_to(staged).as_posix() for path in staged.rglob("*") if path.is_file()}
    old_manifest = read_manifest(folder) or {"files": {}}
    for name in (commit_file, MANIFEST_FILE):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    _fsync(folder)
    stale = set(old_manifest["files"]) | {p.name for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)}
    for name in sorted(stale - new):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (folder / name).unlink()
    last = [name for name in (MANIFEST_FILE, commit_file) if name in new]
    for name in sorted(new - set(last)) + last:
        destination = folder / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, destination)
        if name in last:
            _fsync(folder)
    shutil.rmtree(staged, ignore_errors=True)
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write one small file so that readers see the old content or the new one, never a truncated mix."""
    path = Path(path)
    staged = _sibling(path, STAGING_TAG)
    try:
        with open(staged, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise
    return path

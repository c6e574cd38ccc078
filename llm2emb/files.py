"""Files that appear whole or not at all: a killed process never leaves a partial file under the target's name."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llm2emb.errors import UserError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write; renamed over `target` when the block ends without an error.

    The rename is atomic on one filesystem, so readers see the old file or the whole new one. On an error the
    temporary file is removed and `target` is left as it was; a SIGKILL can leave only a hidden `.<name>.*.tmp`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    staging = Path(name)
    # mkstemp makes it 0600, which the rename would keep: a model folder another user (a serving container) must
    # read gets the permissions any written file gets
    staging.chmod(0o666 & ~current_umask())
    try:
        yield staging
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A temporary folder beside `target` to fill; it replaces `target` (and whatever was there) when the block ends
    without an error, so a crash never leaves half a folder under the final name. On an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; a saved folder gets the usual permissions
    try:
        yield staging
        readable = 0o666 & ~current_umask()
        for path in staging.rglob("*"):
            # safetensors (and our own atomic writes) create 0600 files; a model folder is data that a serving
            # container or another user reads, so every file gets the permissions a plain write would give it
            if path.is_file() and not path.is_symlink():
                path.chmod(readable)
            elif path.is_dir():
                path.chmod(0o777 & ~current_umask())
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, OSError) and disk_full(exc, target.parent):
            # safetensors and torch.save report a full disk in their own exception types
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc
        raise


DISK_FULL_MESSAGES = ("No space left on device", "os error 28")
"""How writers that do not raise OSError say it: safetensors' Rust I/O error, the C library's strerror."""


def disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a failed write failed for want of space: ENOSPC or its message anywhere in the exception chain, or
    under 1 MiB left where it wrote (torch.save's C++ writer says only "iostream error")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if any(text in str(seen) for text in DISK_FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = Path(where)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free < 1 << 20
    except OSError:
        return False


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_non_empty(folder: str | Path, overwrite: bool, option: str = "--overwrite") -> None:
    """The one check before writing a folder: an existing non-empty one is replaced only with `overwrite`."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise UserError(f"{folder}: folder exists and is not empty (pass {option} to replace it)")


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(target)


def save_npy_atomic(target: str | Path, array) -> Path:
    """A float32 .npy written whole or not at all (no pickled objects)."""
    import numpy as np

    with atomic_path(target) as staging, staging.open("wb") as handle:
        np.save(handle, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return Path(target)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str, subject: str | Path) -> Iterator[None]:
    """Hold an flock on the file `path` for the block; a second holder is refused at once, naming `what` and
    `subject` and the holder's pid. The kernel drops the lock when the process dies, so a killed run never leaves
    it stuck; the lock file is removed again when the block ends."""
    import fcntl

    path = Path(path)
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{what}: {subject} is in use by a running process ({holder}); wait for it or choose another")\
                from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the holder before us removed the file between our open and our lock: take the new one
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: a newcomer that opened it sees the inode change


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the block; a second holder is refused at once.

    The lock is `<folder>/.lock` (see `exclusive_lock`). A folder this call created and left holding nothing is
    removed again, so a run that fails before writing anything leaves nothing behind. `what` names the folder in
    the refusal.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(folder / LOCK_NAME, what, folder):
            yield
    finally:
        if created and not any(folder.iterdir()):
            folder.rmdir()


def damaged_file(folder: str | Path) -> str | None:
    """What is wrong with the first damaged file in `folder` (truncated, or not what its name says), else None.

    Cheap structural checks, no full reads: a safetensors file must be as long as its header says, a torch file
    (a zip archive since torch 1.6) must have its central directory, a JSON file must parse, and nothing may be empty.
    """
    import json
    import struct
    import zipfile

    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        size = path.stat().st_size
        name = path.relative_to(folder)
        if size == 0:
            return f"{name} is empty"
        try:
            if path.suffix == ".safetensors":
                with path.open("rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    if length > size - 8:  # a header longer than the file: read nothing of it
                        return f"{name} is truncated or corrupt"
                    header = json.loads(handle.read(length))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if size != 8 + length + end:
                    return f"{name} is truncated ({size} of {8 + length + end} bytes)"
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (zipfile.BadZipFile, ValueError, struct.error, KeyError, TypeError, IndexError, UnicodeDecodeError):
            return f"{name} is truncated or corrupt"
    return None

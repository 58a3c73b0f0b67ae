"""One fuyou process per folder: an exclusive OS file lock on a run's output_dir or an export's folders.

Beside the checkpoint stage: `fuyou finetune` (a new run or --resume) and `fuyou export` hold it for as
long as they write, so a second process cannot cut a live run's metrics, prune its checkpoints or
overwrite it. flock() dies with its process, so a SIGKILL leaves no stale lock (only a stale file,
which the next holder takes over). Imports nothing of fuyou's but errors; no torch.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fuyoucli.errors import FuyouError, InputError

LOCK_FILE = ".fuyou.lock"


class FolderBusy(FuyouError):
    """Another live process holds the folder's lock."""

    exit_code = 1


def _holder_pid(path: Path) -> str:
    # The holder writes its PID right after it locks: poll briefly in case we looked in between.
    deadline = time.monotonic() + 1.0
    while True:
        try:
            text = path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            text = ""
        if text.isdigit() or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.01)


def _open_locked(path: Path, folder: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{what} {folder} is in use by another fuyou process (PID {_holder_pid(path)}); "
                             "wait for it to finish or stop it, or choose another folder") from None
        # A holder unlinks the file as it lets go: the inode we locked must still be the one at the path,
        # or a third process could lock a fresh file there at the same time as us.
        try:
            st = os.stat(path)
            mine = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def folder_lock(folder: str | Path, *, what: str = "folder") -> Iterator[Path]:
    """Hold `folder`'s lock (creating the folder if needed); yields the lock file's path. A folder this
    call created is removed again if it is left empty (a refused start leaves nothing behind)."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError
        path = folder / LOCK_FILE
        fd = _open_locked(path, folder, what)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{what} {folder} is a file (or lies under one); point it at a folder") from None
    except PermissionError as e:
        raise InputError(f"{what} {folder}: cannot write there ({e.strerror}); choose another folder") from None
    except OSError as e:
        raise InputError(f"{what} {folder}: cannot write there ({e.strerror or e}); choose another folder") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                path.unlink()  # before the unlock, so that no one locks a file that is about to vanish
        except OSError:
            pass
        os.close(fd)
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass  # it holds what this process wrote


def holds_only_lock(folder: Path) -> bool:
    """True for an empty folder or one holding only a lock file."""
    return all(p.name == LOCK_FILE for p in folder.iterdir())

"""The store's lock file: ``<dir>/lock`` with ``fcntl.flock``.

A writer takes ``LOCK_EX``, read-only opens take ``LOCK_SH``, both
non-blocking: a conflicting open fails at once with an OffloadIOError naming
the lock file and the holder (the writer writes its pid into the file; the pid
is only for the message, the flock is the lock). flock locks belong to the open
file description, so the kernel drops them when the holder dies, even by
``kill -9``: a dead writer never blocks a reopen.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from longattn.errors import OffloadIOError

LOCK_NAME = "lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"writer pid {text}" if text.isdigit() else "read-only process(es)"


class StoreLock:
    """flock on ``<directory>/lock``; ``exclusive`` for the writer."""

    def __init__(self, directory: Path, *, exclusive: bool):
        self.path = Path(directory) / LOCK_NAME
        self.exclusive = exclusive
        self.fd: int | None = None
        flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY
        try:
            try:
                fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if exclusive:
                    raise
                # A read-only open of a store whose lock file is gone: create it if we may.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OffloadIOError(f"{self.path}: cannot open the lock file: {e.strerror}") from e
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                want = "for writing" if exclusive else "read-only"
                raise OffloadIOError(
                    f"{self.path}: store is locked by {_holder(self.path)}; cannot open it {want} "
                    "while that process has it open"
                ) from e
            raise OffloadIOError(f"{self.path}: cannot lock: {e.strerror}") from e
        self.fd = fd
        if exclusive:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            except OSError:
                pass  # the pid is only for messages; a full disk must not stop the open

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.exclusive:
                try:
                    os.ftruncate(fd, 0)  # no stale pid in later messages
                except OSError:
                    pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

"""Disk operations of disk and both modes, confined below one root directory.

Used by :mod:`girder_upload_stream.assembly.reassembly`. Two places are written:

* the *staging area*, ``root/.gus-staging/run-<random>/``: this process's own folder,
  where files are rebuilt under names that no message can choose. It is opened once and
  held under an exclusive ``flock`` for the life of the :class:`StagingArea`, so that
  another process starting on the same root never deletes files still in use, and every
  operation works relative to its open descriptor;
* final paths ``root/<subdir>/<name>`` (both mode): a verified staging file is renamed
  there by :meth:`SafeDir.publish`.

Defense in depth: names are validated before they get here, and here no symlink below
the root is ever followed (every directory is opened relative to its parent with
``O_NOFOLLOW``, and files with ``O_NOFOLLOW``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import weakref
from collections.abc import Callable
from pathlib import Path

__all__ = ["SafeDir", "StagingArea", "PATH_ERRNOS", "STAGING_DIR"]

_READ_BLOCK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: The staging folder, relative to the root. Message paths reaching it are refused.
STAGING_DIR = ".gus-staging"

#: errno values that mean "this file cannot exist here" (the file's fault: a name or a
#: size the file system refuses), as opposed to "the storage is failing" (ENOSPC, EIO,
#: EACCES...: transient). EFBIG and EOVERFLOW: an offset past the largest file the file
#: system (or RLIMIT_FSIZE) allows; EINVAL: an offset pwrite refuses (near 2**63).
PATH_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                         errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL, errno.EFBIG,
                         errno.EOVERFLOW})


class SafeDir:
    """Symlink-refusing access to folders below one root directory.

    Paths are given as a POSIX ``subdir`` (``""`` for the root) and a single file name.
    A symlink anywhere below the root makes the operation fail with ``ELOOP``/``ENOTDIR``
    instead of leaving the root. Callers validate names first.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve(strict=True)

    def open_dir(self, subdir: str, create: bool) -> int:
        """A descriptor of ``root/subdir`` (created if ``create``); the caller closes it."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in subdir.split("/") if subdir else ():
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def publish(self, src_fd: int, src_name: str, subdir: str, final: str) -> None:
        """Atomically rename ``src_name`` of the folder ``src_fd`` to ``subdir/final``,
        creating the folders (a symlink at ``final`` itself is replaced, not followed)."""
        dir_fd = self.open_dir(subdir, create=True)
        try:
            os.replace(src_name, final, src_dir_fd=src_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def _empty(fd: int) -> None:
    """Delete every file of the folder ``fd`` (a run folder holds files only)."""
    for entry in os.listdir(fd):
        with contextlib.suppress(OSError):
            os.unlink(entry, dir_fd=fd)


def _remove_run(base_fd: int, name: str) -> bool:
    """Delete the run folder ``name`` of the staging folder if no process holds it (its
    lock is free): its files belong to a run that ended. True if it was deleted."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
    except OSError:
        return False  # not a folder (or a symlink): not ours, left alone
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live run uses it
        _empty(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=base_fd)
    except OSError:
        return False
    return True


def _close_run(base_fd: int, fd: int, name: str) -> None:
    """At the end of a run: delete its folder and what is left in it, then drop the lock."""
    with contextlib.suppress(OSError):
        _empty(fd)
        os.rmdir(name, dir_fd=base_fd)
    os.close(fd)
    os.close(base_fd)


class StagingArea:
    """This process's locked folder ``root/.gus-staging/run-<random>/`` for partial files.

    Creating one deletes the run folders of runs that ended without :meth:`close`
    (crashed, killed) first: ``stale_removed`` says how many. A live run's folder is
    locked and never touched. :meth:`close` (also called when the object is collected,
    or at interpreter exit) deletes the run's own folder with what is left in it.

    Why deleting what a run leaves is safe: a staging file is either a file still being
    rebuilt, or a completed file waiting for (or done with) its upload. The messages of
    the first two kinds were not committed (a file's messages stay pending until its
    upload is settled), so the next run of the group reads them again and rebuilds the
    file; the last kind is in Girder already. Nothing else refers to these files.
    """

    def __init__(self, safe: SafeDir) -> None:
        base_fd = safe.open_dir(STAGING_DIR, create=True)
        try:
            # One start at a time: a starting run never sees another's folder between
            # its creation and its lock.
            fcntl.flock(base_fd, fcntl.LOCK_EX)
            self.stale_removed = sum(_remove_run(base_fd, entry) for entry in
                                     os.listdir(base_fd) if entry.startswith("run-"))
            name = f"run-{secrets.token_hex(8)}"
            os.mkdir(name, 0o700, dir_fd=base_fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(base_fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(base_fd)
            raise
        self.fd = fd
        self.path = safe.root / STAGING_DIR / name
        self._finalizer = weakref.finalize(self, _close_run, base_fd, fd, name)

    def close(self) -> None:
        """Delete this run's folder and every file in it, and drop the lock; idempotent.
        Only once no upload reads a completed file any more (the run has ended)."""
        self._finalizer()

    def path_of(self, name: str) -> Path:
        """The absolute path of one staging file."""
        return self.path / name

    def write(self, name: str, offset: int, data: bytes | memoryview, truncate: bool) -> None:
        """Write ``data`` at ``offset`` of the staging file ``name``, creating it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags | (os.O_TRUNC if truncate else 0), 0o600, dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    def truncate(self, name: str, size: int) -> None:
        """Cut the staging file ``name`` to ``size`` bytes."""
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def hash_range(self, name: str, start: int, end: int,
                   update: Callable[[memoryview], None]) -> None:
        """Stream bytes ``[start, end)`` of a staging file to ``update(block)``, in order;
        the block is a view of a reused buffer, valid only during the call."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            buffer = bytearray(_READ_BLOCK)
            view = memoryview(buffer)
            position = start
            while position < end:
                n_read = os.preadv(fd, [view[:min(_READ_BLOCK, end - position)]], position)
                if n_read <= 0:
                    raise OSError(errno.EIO, "file is shorter than expected")
                position += n_read
                update(view[:n_read])
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        """Delete a staging file if it exists; never raises."""
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self.fd)

    def names(self) -> list[str]:
        """The staging files there are now."""
        return os.listdir(self.fd)

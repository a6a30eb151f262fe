"""Write, read back, rename and delete files strictly below one root directory.

Used by :mod:`girder_upload_stream.reassembly` for disk mode. Defense in depth: names are
validated before they get here, and here no symlink below the root is ever followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["SafeDir", "PATH_ERRNOS"]

_READ_BLOCK = 1 << 20

#: errno values that mean "this path cannot exist here" (the file's fault), as opposed to
#: "the storage is failing" (ENOSPC, EIO, EACCES...: transient).
PATH_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                         errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL})


class SafeDir:
    """Symlink-refusing file operations confined below one root directory.

    Paths are given as a POSIX ``subdir`` (``""`` for the root) and a single file name.
    Every directory is opened relative to its parent with ``O_NOFOLLOW``, and files with
    ``O_NOFOLLOW``, so a symlink anywhere below the root makes the operation fail with
    ``ELOOP``/``ENOTDIR`` instead of leaving the root. Callers validate names first.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve(strict=True)

    def _open_dir(self, subdir: str, create: bool) -> int:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in subdir.split("/") if subdir else ():
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                child = os.open(part, flags, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, subdir: str, name: str, offset: int, data: bytes | memoryview,
              truncate: bool) -> None:
        """Write ``data`` at ``offset`` of ``subdir/name``, creating folders and the file."""
        dir_fd = self._open_dir(subdir, create=True)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags | (os.O_TRUNC if truncate else 0), 0o644, dir_fd=dir_fd)
            try:
                view = memoryview(data)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def hash_range(self, subdir: str, name: str, start: int, end: int,
                   update: Callable[[memoryview], None]) -> None:
        """Stream bytes ``[start, end)`` of a file to ``update(block)``, in order; the
        block is a view of a reused buffer, valid only during the call."""
        dir_fd = self._open_dir(subdir, create=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
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

    def publish(self, subdir: str, partial: str, final: str) -> None:
        """Atomically rename ``partial`` to ``final`` in ``subdir`` (a symlink is replaced)."""
        dir_fd = self._open_dir(subdir, create=False)
        try:
            os.replace(partial, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, subdir: str, name: str) -> None:
        """Delete ``subdir/name`` if it exists; never raises."""
        try:
            dir_fd = self._open_dir(subdir, create=False)
        except OSError:
            return
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass  # already gone, or never created
        finally:
            os.close(dir_fd)

"""One consumer per output folder: a lock taken before the consumer group is joined.

Two consumers started on one output folder would both write the same registry files
(each overwriting the other's rows) and, in disk mode, rebuild files in the same tree.
The second one must refuse before it joins the group (joining would already take
partitions from the first). The lock is an ``flock`` on a lock file, which the kernel
drops when the process ends however it ends (SIGKILL, a crash, a power cut): no stale
lock is ever left to clean up. A clean stop deletes the file while still holding the
lock, so that an ended run leaves nothing below the output folder; a process that
locked the file just before it was deleted sees that the path no longer names the
file it locked and starts again on a new one (so two can never both hold a lock).
After a SIGKILL the file stays, unlocked, and the next run takes it.

Where: ``{output_dir}/.gus-staging/consumer.lock``. ``.gus-staging`` is the consumer's
own folder, which no message may name (a reserved path, rejected in every mode), and
the staging clean-up only removes its ``run-*`` folders; so no file a producer sends can
be this file. When the logs folder (``--logger_file_path``) is outside the output folder,
it gets a lock of its own, ``{logs_dir}/.girder-upload-stream.lock``, beside the
registries it protects. The file holds the holder's pid, host and start time, for the
error message of the one that is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path

from girder_upload_stream.assembly.safe_disk import STAGING_DIR
from girder_upload_stream.errors import ConfigError, TerminalError

__all__ = ["FolderInUseError", "FolderLock", "RunFolderLocks", "lock_run_folders", "LOCK_NAME", "LOGS_LOCK_NAME"]

LOCK_NAME = "consumer.lock"
LOGS_LOCK_NAME = ".girder-upload-stream.lock"

#: Lock files deleted under the hand of the one locking them, at most, before giving up.
_ATTEMPTS = 5


class FolderInUseError(TerminalError):
    """Another live consumer holds the output (or logs) folder: this one must not start."""


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``path``, which guards ``folder`` (the
    ``what``: output folder or logs folder) for this process's run."""

    def __init__(self, folder: Path, path: Path, what: str) -> None:
        self.folder, self.path, self.what = folder, path, what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderInUseError` naming its holder."""
        for _ in range(_ATTEMPTS):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUseError(
                    f"another consumer is running on the {self.what} {self.folder} "
                    f"({holder}): two consumers on one folder would overwrite each other's "
                    f"registry rows; stop the other one, or give this one another "
                    f"--output_dir (and --logger_file_path)") from None
            if self._still_named(fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                              f"{datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # its holder deleted it as it stopped: lock the new one
        raise ConfigError(f"cannot lock the {self.what} {self.folder}: {self.path} keeps "
                          f"being replaced")

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600)
        except OSError as exc:  # not writable, or a symlink planted as the lock file
            raise ConfigError(f"cannot lock the {self.what} {self.folder}: {self.path}: "
                              f"{exc.strerror}") from None

    def _still_named(self, fd: int) -> bool:
        """Is the locked file still the one ``path`` names?"""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Delete the lock file, then drop the lock (idempotent): see the module's
        docstring for why in this order."""
        if self._fd is not None:
            if self._still_named(self._fd):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class RunFolderLocks:
    """The locks of one run (output folder, and logs folder when outside it)."""

    def __init__(self, locks: list[FolderLock]) -> None:
        self.locks = locks

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def lock_run_folders(output_dir: Path, logs_dir: Path) -> RunFolderLocks:
    """Lock the output folder, and the logs folder when it is not inside it; raise
    :class:`FolderInUseError` (holding nothing) if another consumer has either."""
    output_dir, logs_dir = Path(output_dir).absolute(), Path(logs_dir).absolute()
    wanted = [FolderLock(output_dir, output_dir / STAGING_DIR / LOCK_NAME, "output folder")]
    if not logs_dir.resolve().is_relative_to(output_dir.resolve()):
        wanted.append(FolderLock(logs_dir, logs_dir / LOGS_LOCK_NAME, "logs folder"))
    taken: list[FolderLock] = []
    try:
        for lock in wanted:
            taken.append(lock.acquire())
    except BaseException:
        RunFolderLocks(taken).release()
        raise
    return RunFolderLocks(taken)

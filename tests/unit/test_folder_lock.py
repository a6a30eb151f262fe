"""One consumer per output folder (issue 20 §6): the lock refuses a second run, names
its holder, never outlives its process (SIGKILL included), and sits where no file a
producer sends can be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from girder_upload_stream.assembly.chunk_rules import reserved_paths, reserved_problem
from girder_upload_stream.assembly.safe_disk import STAGING_DIR
from girder_upload_stream.folder_lock import (LOCK_NAME, LOGS_LOCK_NAME, FolderInUseError, FolderLock,
                                              lock_run_folders)
from girder_upload_stream.errors import ConfigError, TerminalError


def test_a_second_lock_on_one_output_folder_is_refused_with_its_holder(tmp_path: Path) -> None:
    first = lock_run_folders(tmp_path, tmp_path / "LOGS")
    with pytest.raises(FolderInUseError) as caught:
        lock_run_folders(tmp_path, tmp_path / "LOGS")
    text = str(caught.value)
    assert f"pid {os.getpid()}" in text and str(tmp_path) in text and "--output_dir" in text
    assert isinstance(caught.value, TerminalError)
    first.release()
    lock_run_folders(tmp_path, tmp_path / "LOGS").release()  # free again


def test_a_shared_logs_folder_outside_is_locked_too(tmp_path: Path) -> None:
    logs = tmp_path / "shared-logs"
    first = lock_run_folders(tmp_path / "out1", logs)
    assert (logs / LOGS_LOCK_NAME).is_file()
    with pytest.raises(FolderInUseError, match="logs folder"):
        lock_run_folders(tmp_path / "out2", logs)
    # the refused run holds nothing: out2 is free
    lock_run_folders(tmp_path / "out2", tmp_path / "other-logs").release()
    first.release()


def test_release_is_idempotent_and_deletes_the_files(tmp_path: Path) -> None:
    logs = tmp_path / "shared-logs"
    locks = lock_run_folders(tmp_path, logs)
    locks.release()
    locks.release()
    assert not (tmp_path / STAGING_DIR / LOCK_NAME).exists()
    assert not (logs / LOGS_LOCK_NAME).exists()


def test_a_lock_taken_on_a_file_deleted_meanwhile_moves_to_the_new_file(tmp_path: Path) -> None:
    # The race the delete-while-locked order guards: B opened the old file, A deleted it
    # and released; B's flock then succeeds on a file nobody else can find.
    first = lock_run_folders(tmp_path, tmp_path / "LOGS")
    lock = FolderLock(tmp_path, tmp_path / STAGING_DIR / LOCK_NAME, "output folder")
    stale_fd = os.open(lock.path, os.O_RDWR)
    first.release()
    assert not lock._still_named(stale_fd)
    os.close(stale_fd)
    lock.acquire()
    assert lock._still_named(lock._fd)
    with pytest.raises(FolderInUseError):
        lock_run_folders(tmp_path, tmp_path / "LOGS")
    lock.release()


_HOLDER = """
import sys, time
from pathlib import Path
from girder_upload_stream.folder_lock import lock_run_folders
lock_run_folders(Path(sys.argv[1]), Path(sys.argv[1]) / "LOGS")
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_does_not_outlive_a_sigkill(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):
            lock_run_folders(tmp_path, tmp_path / "LOGS")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    lock_run_folders(tmp_path, tmp_path / "LOGS").release()


def test_the_lock_file_is_a_reserved_path_no_message_can_name(tmp_path: Path) -> None:
    reserved = [tuple(p.split("/")) for p in reserved_paths(tmp_path, [tmp_path / "LOGS"])]
    for rel in (f"{STAGING_DIR}/{LOCK_NAME}", f"LOGS/{LOGS_LOCK_NAME}", STAGING_DIR):
        assert reserved_problem(rel, reserved), rel


def test_a_symlink_planted_as_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / STAGING_DIR).mkdir()
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / STAGING_DIR / LOCK_NAME).symlink_to(target)
    with pytest.raises(ConfigError, match="cannot lock the output folder"):
        lock_run_folders(tmp_path, tmp_path / "LOGS")
    assert target.read_text() == "keep"

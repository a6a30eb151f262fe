"""A registry file edited by hand or by a spreadsheet (issue 20 §6): the start stops
with one clear error (a ConfigError: exit status 2 from the command line), naming the
file and what is wrong with it, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from girder_upload_stream.errors import ConfigError
from girder_upload_stream.registry.recording import (RegistryFileError, RegistryRecorder,
                                                     check_registry_files)
from girder_upload_stream.registry.tables import in_progress_path, processed_path

T, G = "topic", "group"
PROCESSED_HEADER = "filename;rel_filepath;n_chunks;first_message;processed_at"
IN_PROGRESS_HEADER = "filename;rel_filepath;status;n_chunks;first_message;most_recent_message"
ROW = "'a.txt';'a.txt';1;'Mon Jun 03, 2024 at 14:05:09';'Mon Jun 03, 2024 at 14:05:10'"


def _write(path: Path, text: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path.read_bytes()


@pytest.mark.parametrize("which", ["processed", "in_progress"])
@pytest.mark.parametrize("text,hint", [
    (PROCESSED_HEADER.replace(";", ",") + "\n", "separated by ','"),
    (PROCESSED_HEADER.replace(";", "\t") + "\n", "separated by '\\t'"),
    ("file name;path;chunks\n" + ROW + "\n", "first line is 'file name;path;chunks'"),
    (PROCESSED_HEADER + ";note\n", "first line is"),
    ("", "first line is ''"),
    ("\n" + ROW + "\n", "first line is ''"),
])
def test_a_hand_edited_header_stops_the_start_with_a_clear_error(
        tmp_path: Path, which: str, text: str, hint: str) -> None:
    path = (processed_path if which == "processed" else in_progress_path)(tmp_path, T, G)
    before = _write(path, text)
    with pytest.raises(RegistryFileError) as caught:
        RegistryRecorder(tmp_path, T, G)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError)
    assert str(path) in message and "Nothing was changed" in message, message
    assert hint in message, message
    assert path.read_bytes() == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_header_with_binary_garbage_is_shown_escaped_and_bounded(tmp_path: Path) -> None:
    path = processed_path(tmp_path, T, G)
    _write(path, "\x1b[2J" + "z" * 5000 + "\n")
    with pytest.raises(RegistryFileError) as caught:
        check_registry_files(tmp_path, T, G)
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 1200


def test_an_unreadable_registry_file_is_a_clear_error(tmp_path: Path) -> None:
    path = processed_path(tmp_path, T, G)
    path.mkdir(parents=True)  # a folder where the file should be: cannot be opened
    with pytest.raises(RegistryFileError, match="cannot be read"):
        check_registry_files(tmp_path, T, G)


def test_files_as_written_and_a_spreadsheet_bom_still_start(tmp_path: Path) -> None:
    _write(processed_path(tmp_path, T, G), "\ufeff" + PROCESSED_HEADER + "\n" + ROW + "\n")
    _write(in_progress_path(tmp_path, T, G), "sep=;\n" + IN_PROGRESS_HEADER + "\n")
    check_registry_files(tmp_path, T, G)
    recorder = RegistryRecorder(tmp_path, T, G)
    assert ("a.txt", "") in recorder.processed_keys()


def test_other_topics_registry_files_do_not_matter(tmp_path: Path) -> None:
    _write(processed_path(tmp_path, "other", G), "garbage\n")
    check_registry_files(tmp_path, T, G)
